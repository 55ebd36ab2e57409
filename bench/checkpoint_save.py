"""How long a DDP checkpoint of OpenSeek-Small-v1 takes to write here, and what Slurm settings it needs.

    python bench/checkpoint_save.py [--dir DIR] [--gb 2]

A checkpoint of the real model under bf16-mixed is fp32 weights (model.safetensors, tied head
stored once) + AdamW's two fp32 moments (optimizer.pt) + small files: its size is counted from the
6-layer model's parameter count on the meta device. Writing that much needs RAM this machine may
not have, so the bench writes `--gb` of the same kinds of file (safetensors for weights, torch.save
for optimizer state, each fsynced, as the train stage's marker requires) and extrapolates at the
measured rate. It prints the estimated save time and the Slurm settings a preempted job needs:
SIGTERM (preemption, `scontrol requeue`) leaves `KillWait` seconds before SIGKILL; the time-limit
signal (`SIGNAL_BEFORE`, USR1) arrives that many seconds before the limit. The step in flight
finishes first, then the save; if SIGKILL comes before the marker, the previous complete checkpoint
is what resume uses (at most `save_steps` of work lost, never the run).

Each repeat then hashes the files it wrote as the completion marker does (content_hash.hash_files,
from the page cache right after the save), so the save with and without hashing, and their ratio,
come from the same run; the hashing cost is extrapolated at its own rate, like the write.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from openseek_cpt.artifacts import content_hash
from openseek_cpt.artifacts.fileio import fsync_tree
from openseek_cpt.testing.fixtures import real_shape_config


def real_checkpoint_bytes() -> tuple[int, int]:
    """(weights bytes, optimizer bytes) of a bf16-mixed DDP checkpoint of the 6-layer model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(real_shape_config(num_layers=6))
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    return params * 4, params * 4 * 2


def timed_write(directory: Path, gigabytes: float) -> float:
    """Seconds to write `gigabytes` as 1/3 safetensors weights + 2/3 torch.save state, fsynced."""
    directory.mkdir(parents=True)
    per_tensor = 64 << 20  # 64 MiB tensors, like the large expert and embedding tensors
    n = max(3, round(gigabytes * (1 << 30) / per_tensor))
    tensors = [torch.randn(per_tensor // 4) for _ in range(n)]
    third = max(1, n // 3)
    start = time.perf_counter()
    save_file({f"w{i}": t for i, t in enumerate(tensors[:third])}, str(directory / "model.safetensors"))
    torch.save({f"m{i}": t for i, t in enumerate(tensors[third:])}, directory / "optimizer.pt")
    fsync_tree(directory)
    return time.perf_counter() - start


def timed_hash(directory: Path, workers: int = content_hash.WORKERS) -> float:
    """Seconds to hash every file of `directory` as `checkpoints.write_marker` does."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    start = time.perf_counter()
    content_hash.hash_files(directory, names, workers=workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="filesystem to measure (default: a temp dir in /tmp)")
    parser.add_argument("--gb", type=float, default=2.0, help="bytes to write per repeat, in GiB")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    weights, optimizer = real_checkpoint_bytes()
    total = weights + optimizer
    print(f"[bench] uptime: {os.popen('uptime').read().strip()}")
    print(
        f"[bench] OpenSeek-Small-v1 DDP checkpoint (bf16-mixed): weights {weights / 2**30:.1f} GiB + "
        f"AdamW state {optimizer / 2**30:.1f} GiB = {total / 2**30:.1f} GiB"
    )
    rates, hash_rates, ratios = [], [], []
    for i in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
        try:
            seconds = timed_write(root / "checkpoint", args.gb)
            hashing = timed_hash(root / "checkpoint")
            serial = timed_hash(root / "checkpoint", workers=1)  # threads only help if xxhash drops the GIL
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rates.append(args.gb * (1 << 30) / seconds)
        hash_rates.append(args.gb * (1 << 30) / hashing)
        ratios.append(hashing / seconds)
        print(
            f"[bench] repeat {i + 1}: {args.gb:.1f} GiB written + fsynced in {seconds:.2f} s without "
            f"hashing, {seconds + hashing:.2f} s with ({content_hash.ALGORITHM}, "
            f"{content_hash.WORKERS} threads: +{hashing:.2f} s = +{hashing / seconds:.1%}; "
            f"1 thread: {serial:.2f} s, so the threads hash {serial / hashing:.2f}x as fast)"
        )
    rate, hash_rate = max(rates), max(hash_rates)
    save_s, hash_s = total / rate, total / hash_rate
    print(f"[bench] write rate {rate / 2**30:.2f} GiB/s -> the real checkpoint takes ~{save_s:.0f} s here")
    print(
        f"[bench] hash rate {hash_rate / 2**30:.2f} GiB/s -> hashing it adds ~{hash_s:.1f} s "
        f"(+{hash_s / save_s:.1%}; per repeat +{min(ratios):.1%} to +{max(ratios):.1%})"
    )
    need = save_s * 1.5 + 60  # margin for a slower shared filesystem moment + the step in flight
    print(
        f"[bench] preemption (SIGTERM): KillWait >= {need:.0f} s for the save to finish; "
        f"time limit: SIGNAL_BEFORE >= {need:.0f} s (Slurm may signal up to 60 s late)"
    )


if __name__ == "__main__":
    main()
