"""How long a DDP checkpoint of OpenSeek-Small-v1 takes to write here, and what Slurm settings it needs.

    python bench/checkpoint_save.py [--dir DIR] [--gb 2] [--repeats 2] [--fill random|untouched]

A checkpoint of the real model under bf16-mixed is fp32 weights (model.safetensors, tied head
stored once) + AdamW's two fp32 moments (optimizer.pt) + small files: its size is counted from the
6-layer model's parameter count on the meta device. Writing that much needs RAM this machine may
not have, so the bench writes `--gb` of the same kinds of file (`--gb 15.6 --fill untouched` writes the
real size from zero pages, which hold no RAM) (safetensors for weights, torch.save
for optimizer state, each fsynced, as the train stage's marker requires) and extrapolates at the
measured rate. It prints the estimated save time and the Slurm settings a preempted job needs:
SIGTERM (preemption, `scontrol requeue`) leaves `KillWait` seconds before SIGKILL; the time-limit
signal (`SIGNAL_BEFORE`, USR1) arrives that many seconds before the limit. The step in flight
finishes first, then the save; if SIGKILL comes before the marker, the previous complete checkpoint
is what resume uses (at most `save_steps` of work lost, never the run).

Each repeat saves twice, back to back: once fsynced only, once fsynced and hashed as the completion
marker does (`checkpoints.sync_and_hash`: the files hashed from the page cache while the fsync runs),
so the save with and without hashing, and their ratio, come from the same run. It also prints how
much faster the hashing threads are than one (above 1: xxhash releases the GIL while it hashes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

from openseek_cpt.artifacts import checkpoints, content_hash
from openseek_cpt.artifacts.fileio import fsync_tree
from openseek_cpt.testing.fixtures import real_shape_config


def real_checkpoint_bytes() -> tuple[int, int]:
    """(weights bytes, optimizer bytes) of a bf16-mixed DDP checkpoint of the 6-layer model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(real_shape_config(num_layers=6))
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    return params * 4, params * 4 * 2


def make_tensors(gigabytes: float, fill: str = "random") -> list[torch.Tensor]:
    """`gigabytes` of fp32 in 64 MiB tensors, like the large expert and embedding tensors: random, or
    (`fill="untouched"`) allocated and never written, so they read as zero pages and hold no RAM (the
    real checkpoint's size on a machine with less free RAM than that; hashing and writing cost the
    same per byte whatever the bytes)."""
    per_tensor = 64 << 20
    n = max(3, round(gigabytes * (1 << 30) / per_tensor))
    make = torch.randn if fill == "random" else torch.empty
    return [make(per_tensor // 4) for _ in range(n)]


def timed_save(directory: Path, tensors: list[torch.Tensor], hashing: bool) -> float:
    """Seconds to write 1/3 of `tensors` as safetensors weights and 2/3 as torch.save state and
    fsync them, and with `hashing` to hash them as the marker does (`checkpoints.sync_and_hash`:
    the fsync and the hashing overlap)."""
    directory.mkdir(parents=True)
    third = max(1, len(tensors) // 3)
    start = time.perf_counter()
    save_file({f"w{i}": t for i, t in enumerate(tensors[:third])}, str(directory / "model.safetensors"))
    torch.save({f"m{i}": t for i, t in enumerate(tensors[third:])}, directory / "optimizer.pt")
    if hashing:
        checkpoints.sync_and_hash(directory, sorted(p.name for p in directory.iterdir()))
    else:
        fsync_tree(directory)
    return time.perf_counter() - start


def thread_speedup(mib: int = 256, rounds: int = 8) -> float:
    """How much faster WORKERS threads hash in-memory buffers than one (> 1: xxhash drops the GIL)."""
    buf = os.urandom(mib << 20)

    def hash_rounds(k: int) -> None:
        for _ in range(k):
            xxhash.xxh3_128(buf).digest()

    start = time.perf_counter()
    hash_rounds(rounds)
    serial = time.perf_counter() - start
    per = max(1, rounds // content_hash.WORKERS)
    threads = [threading.Thread(target=hash_rounds, args=(per,)) for _ in range(content_hash.WORKERS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = time.perf_counter() - start
    return (serial / rounds) / (parallel / (per * content_hash.WORKERS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="filesystem to measure (default: a temp dir in /tmp)")
    parser.add_argument("--gb", type=float, default=2.0, help="bytes to write per repeat, in GiB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--fill",
        choices=("random", "untouched"),
        default="random",
        help="untouched: no RAM for --gb (zero pages)",
    )
    args = parser.parse_args()
    weights, optimizer = real_checkpoint_bytes()
    total = weights + optimizer
    print(f"[bench] uptime: {os.popen('uptime').read().strip()}")
    print(
        f"[bench] OpenSeek-Small-v1 DDP checkpoint (bf16-mixed): weights {weights / 2**30:.1f} GiB + "
        f"AdamW state {optimizer / 2**30:.1f} GiB = {total / 2**30:.1f} GiB"
    )
    speedup = thread_speedup()
    print(f"[bench] xxh3_128 on {content_hash.WORKERS} threads hashes {speedup:.2f}x as fast as on one")
    rates, ratios, alone = [], [], []
    for i in range(args.repeats):
        seconds, tensors = {}, make_tensors(args.gb, args.fill)
        for hashing in (False, True) if i % 2 == 0 else (True, False):  # same bytes, order alternated
            root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
            try:
                seconds[hashing] = timed_save(root / "checkpoint", tensors, hashing)
                if hashing:  # the hashing by itself, from the page cache: its cost if nothing overlapped
                    start, cpu = time.perf_counter(), time.process_time()
                    content_hash.hash_files(root / "checkpoint", ["model.safetensors", "optimizer.pt"])
                    seconds["alone"] = time.perf_counter() - start
                    seconds["cpu"] = time.process_time() - cpu
            finally:
                shutil.rmtree(root, ignore_errors=True)
        rates.append(args.gb * (1 << 30) / seconds[False])
        ratios.append(seconds[True] / seconds[False])
        alone.append(seconds["alone"] / seconds[False])
        print(
            f"[bench] repeat {i + 1}: {args.gb:.1f} GiB written + fsynced in {seconds[False]:.2f} s "
            f"without hashing, {seconds[True]:.2f} s with ({content_hash.ALGORITHM}, "
            f"{content_hash.WORKERS} threads): {seconds[True] / seconds[False]:.3f}x; hashing alone "
            f"{seconds['alone']:.2f} s = {alone[-1]:.1%} of the save ({seconds['cpu'] / args.gb:.2f} CPU-s/GiB)"
        )
    rate = max(rates)
    save_s = total / rate
    ratios.sort()
    alone.sort()
    print(f"[bench] write rate {rate / 2**30:.2f} GiB/s -> the real checkpoint takes ~{save_s:.0f} s here")
    print(
        f"[bench] save with hashing / without: median {ratios[len(ratios) // 2]:.3f}x "
        f"(repeats {ratios[0]:.3f}x to {ratios[-1]:.3f}x); hashing alone, not overlapped: median "
        f"{alone[len(alone) // 2]:.1%} of the save ({alone[0]:.1%} to {alone[-1]:.1%})"
    )
    need = save_s * 1.5 + 60  # margin for a slower shared filesystem moment + the step in flight
    print(
        f"[bench] preemption (SIGTERM): KillWait >= {need:.0f} s for the save to finish; "
        f"time limit: SIGNAL_BEFORE >= {need:.0f} s (Slurm may signal up to 60 s late)"
    )


if __name__ == "__main__":
    main()
