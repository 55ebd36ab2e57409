"""Aux-loss-free MoE load balancing (DeepSeek-V3's `noaux_tc`) during training, and its metrics.

OpenSeek-Small-v1 routes with a per-expert bias (`mlp.gate.e_score_correction_bias`, a persistent
buffer) added to the router scores for top-k selection only. DeepSeek-V3 (and Megatron's
`moe_router_enable_expert_bias`) update it after every optimizer step:

    bias += rate * sign(mean_load - load)      (per MoE layer, per expert)

where `load` is the number of tokens routed to each expert during the step, summed over every
micro-batch and every rank. transformers treats it as a frozen buffer, so nothing moved it.

Guarantees:
- loads are counted by forward hooks on the routers in training mode only (evaluation does not
  count); integer counts are summed over ranks with one all-reduce per optimizer step, so every
  rank applies the same update and DDP's buffer broadcast (rank 0 -> all) changes nothing, and 1
  rank x accumulation 2 updates exactly like 2 ranks x 1;
- with activation checkpointing the recomputed forward counts each token twice: the update uses
  only sign(mean - load) and the metric max/mean, both unchanged by a common factor;
- the bias is a model buffer, so checkpoints, resume (bit-identical), the final model and the
  soup carry it like any tensor; the counters are per step and hold nothing to save;
- rate 0 freezes the bias (loads are still measured and logged).
Logged with the loss (the callback records them itself: `record_metrics`, the train stage's metric
callback event): per MoE layer `moe/layer{i}_load_imbalance` (max load / mean load, averaged over
the steps since the last log; 1.0 = balanced) and `moe/layer{i}_bias_norm`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

BIAS_NAME = "e_score_correction_bias"


def find_routers(model: Any) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router) for every module holding an expert score-correction bias, in layer order."""
    found: list[tuple[int, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, BIAS_NAME, None), torch.Tensor):
            parts = name.split(".")
            layer = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers"), len(found))
            found.append((layer, module))
    return found


def bias_update(loads: torch.Tensor, rate: float) -> torch.Tensor:
    """rate * sign(mean - load) per layer (rows) and expert (columns); loads (layers, experts)."""
    loads = loads.double()
    return rate * torch.sign(loads.mean(dim=-1, keepdim=True) - loads)


class RouterBalanceCallback(TrainerCallback):
    """Counts expert loads during each optimizer step, then moves the router bias toward balance."""

    def __init__(self, model: Any, rate: float):
        self.rate = float(rate)
        self.routers = find_routers(model)
        self.layers = [layer for layer, _ in self.routers]
        self.counts = self._zero_counts()
        self._imbalance_sum = torch.zeros(len(self.routers), dtype=torch.float64)
        self._steps = 0
        self._handles = [
            router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(self.routers)
        ]

    def _zero_counts(self) -> torch.Tensor:
        """(layers, experts) int64 counters on the device the router biases are on now."""
        bias = getattr(self.routers[0][1], BIAS_NAME) if self.routers else torch.zeros(0)
        return torch.zeros(len(self.routers), bias.numel(), dtype=torch.int64, device=bias.device)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        # The Trainer has moved the model by now: the counters live on its device from the first
        # step on, so the hook never moves them (a tensor swap inside a hook recompiles under compile).
        self.counts = self._zero_counts()

    def _hook(self, row: int):
        def count(module, inputs, output) -> None:
            if not module.training:
                return
            indices = output[2].reshape(-1)  # (router_logits, topk_weights, topk_indices)
            # scatter_add_, not bincount: no device sync
            self.counts[row].scatter_add_(0, indices, torch.ones_like(indices, dtype=torch.int64))

        return count

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        if not self.routers:
            return
        loads = self.step_loads()
        if self.rate:
            delta = bias_update(loads, self.rate)
            with torch.no_grad():
                for row, (_, router) in enumerate(self.routers):
                    bias = getattr(router, BIAS_NAME)
                    bias.add_(delta[row].to(device=bias.device, dtype=bias.dtype))
        loads = loads.double().cpu()
        self._imbalance_sum += loads.max(dim=-1).values / loads.mean(dim=-1).clamp(min=1e-12)
        self._steps += 1

    def step_loads(self) -> torch.Tensor:
        """This step's loads summed over ranks (layers, experts); resets the counters."""
        loads = self.counts.clone()
        self.counts.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)
        return loads

    def take_metrics(self) -> dict[str, float]:
        """Per-layer load imbalance (mean over steps since the last take) and bias norm."""
        if not self.routers or self._steps == 0:
            return {}
        out = {}
        for row, (layer, router) in enumerate(self.routers):
            out[f"moe/layer{layer}_load_imbalance"] = float(self._imbalance_sum[row]) / self._steps
            out[f"moe/layer{layer}_bias_norm"] = float(getattr(router, BIAS_NAME).float().norm())
        self._imbalance_sum.zero_()
        self._steps = 0
        return out

    def record_metrics(self, args: Any, logs: dict[str, float]) -> None:
        """Add the metrics since the previous training log line to this one."""
        logs.update(self.take_metrics())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
