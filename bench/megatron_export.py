"""Megatron export speed against a plain copy of the same bytes, measured in the same run.

    python bench/megatron_export.py [--tokens 50_000_000] [--max-length 4096] [--repeats 5]

Builds a prepared split on disk (packed rows of `max_length` tokens with random document
segments), exports it with `megatron_format.export_dataset` for a small vocabulary (uint16) and
the OpenSeek one (151,851: int32), and copies the resulting .bin with `shutil.copyfile`. Prints
MB/s of both and their ratio (target >= 0.5), plus the same for reading every sequence back in
place with `read_rows` (memory map of .bin, no conversion or cache). Best of `--repeats` interleaved
runs; the files sit in the page cache for both sides.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from openseek_cpt.artifacts import megatron_format


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench-megatron-") as tmp:
        root = Path(tmp)
        split = build_split(root / "prepared", args.tokens, args.max_length)
        print(
            f"prepared split: {len(split)} rows x {args.max_length} tokens ({args.tokens / 1e6:.0f}M tokens)"
        )
        print(f"{'vocab':>8} {'dtype':>6} {'MB':>8} {'export MB/s':>12} {'copy MB/s':>10} {'ratio':>6}")
        for vocab in (50_000, 151_851):
            prefix = root / f"out{vocab}"
            outputs = [f"{prefix}.bin", f"{prefix}.idx", root / "copy.bin"]
            export_s = copy_s = read_s = float("inf")
            for _ in range(args.repeats):  # interleaved, so load from other processes hits both sides
                export_s = min(
                    export_s,
                    timed(lambda p=prefix, v=vocab: megatron_format.export_dataset(split, p, v), outputs),
                )
                copy_s = min(
                    copy_s,
                    timed(lambda p=prefix: shutil.copyfile(f"{p}.bin", root / "copy.bin"), outputs[2:]),
                )
                read_s = min(read_s, timed(lambda p=prefix: read_all(p), ()))
            mb = Path(f"{prefix}.bin").stat().st_size / 1e6
            dtype = megatron_format.token_dtype(vocab).__name__
            print(
                f"{vocab:>8} {dtype:>6} {mb:>8.0f} {mb / export_s:>12.0f} {mb / copy_s:>10.0f} {copy_s / export_s:>6.2f}"
            )
            print(
                f"{'':>8} {'read':>6} {mb:>8.0f} {mb / read_s:>12.0f} {mb / copy_s:>10.0f} {copy_s / read_s:>6.2f}"
            )


def build_split(path: Path, tokens: int, max_length: int) -> datasets.Dataset:
    """Packed rows with 1-8 document segments each, written with save_to_disk and loaded back."""
    rng = np.random.default_rng(0)
    rows = tokens // max_length
    values = rng.integers(0, 50_000, size=rows * max_length, dtype=np.int32)
    offsets = np.arange(rows + 1, dtype=np.int32) * max_length
    seg_lists = []
    for _ in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, max_length), size=int(rng.integers(0, 8)), replace=False))
        seg_lists.append(np.diff(np.concatenate([[0], cuts, [max_length]])).tolist())
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "seq_lengths": pa.array(seg_lists, type=pa.list_(pa.int32())),
        }
    )
    datasets.Dataset(table).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def read_all(prefix: Path) -> None:
    """Every sequence of PREFIX read in place, as the data stage reads the rows it samples."""
    index = megatron_format.read_index(prefix)
    megatron_format.read_rows(index, f"{prefix}.bin", np.arange(len(index.sequence_lengths)))


def timed(func, outputs) -> float:
    """Seconds one call takes; `outputs` are deleted first (freeing old pages is not timed)."""
    for p in outputs:
        Path(p).unlink(missing_ok=True)
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
