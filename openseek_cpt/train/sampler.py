"""The data order: a fixed permutation per epoch, so a resumed run replays exactly the same batches."""

from __future__ import annotations

import torch


class EpochPermutationSampler(torch.utils.data.Sampler):
    """Indices of epoch e = randperm(n) seeded by (seed, e): a pure function of dataset, seed, step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
