"""Export a prepared dataset to the formats other trainers read: Megatron `.bin/.idx` and MindRecord.

One prepared mix can then feed Megatron-LM or MindSpore Transformers as well as our own `train`.
The Megatron format itself (and reading it back as a source) lives in the leaf module
`megatron_format`; this stage only finds the split, its vocabulary and padding, and writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from openseek_cpt.artifacts import megatron_format, prepared, provenance
from openseek_cpt.artifacts.fileio import write_json_atomic
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger

log = get_logger("interop")


def export_megatron(dataset_dir: str | Path, prefix: str | Path, split: str = "train") -> Path:
    """Write `split` of a prepared dataset as PREFIX.bin/.idx; returns PREFIX.

    One Megatron sequence (= document) per document segment of each packed row, so Megatron's
    GPT dataset and MindSpore Transformers see the same documents our `train` does. Token dtype
    from the vocabulary size (uint16 below 65,500, else int32), as Megatron chooses it.
    PREFIX.provenance.json records what was exported: the two files are the artifact, so there is
    no directory for `provenance.atomic_output_dir` (each file is renamed into place instead).
    """
    dataset, manifest = _load_split(dataset_dir, split)
    vocab_size = _vocab_size(manifest, dataset, dataset_dir)
    megatron_format.export_dataset(dataset, prefix, vocab_size)
    _write_sidecar(
        Path(f"{prefix}.provenance.json"),
        dataset_dir,
        split,
        {
            "format": "megatron",
            "vocab_size": vocab_size,
            "dtype": megatron_format.token_dtype(vocab_size).__name__,
        },
    )
    log.info(f"export-megatron: {len(dataset)} rows of {dataset_dir}[{split}] -> {prefix}.bin/.idx")
    return Path(prefix)


def export_mindrecord(dataset_dir: str | Path, path: str | Path, split: str = "train") -> Path:
    """Write `split` of a prepared dataset as one MindRecord file (plus its `.db` index); returns `path`.

    What MindSpore Transformers' pretraining reads (`CausalLanguageModelDataset` over a
    `MindDataset`, fed by files like its `llama_preprocess.py` writes): one column `input_ids`,
    int32, schema shape [-1], every row the same length `seq_length + 1` (the model takes tokens
    [:-1] as inputs and [1:] as labels). We write each packed row padded to `data.max_length` with
    the pad id, so set `seq_length: max_length - 1` in the MindSpore Transformers config. Document
    boundaries travel as the eos that ends every document: MindSpore Transformers' `eod_reset:
    True` with `eod_token_id: <eos id>` rebuilds the per-document positions and attention mask.
    Name the file `*.mindrecord`: its `dataset_dir` discovery only picks names matching
    `mindrecord\\d*$`.
    """
    try:
        from mindspore.mindrecord import FileWriter
    except ImportError as exc:
        raise UserError(
            f"export-mindrecord needs MindSpore ({exc.name or 'mindspore'} is not importable); install it with `pip install 'openseek-cpt[mindspore]'`"
        ) from None
    dataset, manifest = _load_split(dataset_dir, split)
    max_length = _max_length(manifest, dataset_dir, dataset)
    if manifest.get("pad_token_id") is None and manifest.get("eos_token_id") is None:
        raise UserError(
            f"{dataset_dir}/manifest.json records no pad_token_id or eos_token_id; rebuild the dataset with `openseek-cpt data`"
        )
    pad_id = prepared.pad_token_id(manifest)
    path = Path(path)
    if path.suffix == ".db":
        raise UserError(
            f"export-mindrecord: PATH {path} ends in .db, the name MindRecord gives its index; pass the data file name"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # MindRecord stores its file names inside the files, so write under the final name in a temp
    # directory beside it and move both files in (a half-written export never has the final name).
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = FileWriter(str(tmp / path.name), shard_num=1, overwrite=True)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "openseek-cpt packed rows")
        rows = dataset.select_columns(["input_ids"]).with_format("numpy")
        for start in range(0, len(rows), 256):
            batch = rows[start : start + 256]["input_ids"]
            writer.write_raw_data(
                [
                    {"input_ids": _pad(np.asarray(r), max_length, pad_id, start + i)}
                    for i, r in enumerate(batch)
                ]
            )
        writer.commit()
        for name in (path.name, path.name + ".db"):
            os.replace(tmp / name, path.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_sidecar(
        Path(f"{path}.provenance.json"),
        dataset_dir,
        split,
        {"format": "mindrecord", "max_length": max_length, "pad_token_id": pad_id, "rows": len(dataset)},
    )
    log.info(f"export-mindrecord: {len(dataset)} rows of {dataset_dir}[{split}] -> {path}")
    return path


# --- helpers ---------------------------------------------------------------------------------------


def _load_split(dataset_dir: str | Path, split: str) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The split and the manifest of a prepared dataset (through `prepared`, the one reader)."""
    return prepared.load_split(dataset_dir, split, "DATASET_DIR"), prepared.read_manifest(dataset_dir)


def _vocab_size(manifest: dict[str, Any], dataset: datasets.Dataset, dataset_dir: str | Path) -> int:
    vocab = manifest.get("vocab_size")
    if vocab is not None:
        return int(vocab)
    top = 0
    for batch in dataset.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=4096):
        values = batch.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if values.size:
            top = max(top, int(values.max()))
    log.warning(
        f"{dataset_dir}/manifest.json records no tokenizer vocab_size; using max token id + 1 = {top + 1}"
    )
    return top + 1


def _recipe_data(dataset_dir: str | Path) -> dict[str, Any]:
    prov = provenance.read_provenance(dataset_dir) or {}
    recipe = prov.get("recipe") or {}
    return recipe.get("data") or {}


def _max_length(manifest: dict[str, Any], dataset_dir: str | Path, dataset: datasets.Dataset) -> int:
    """The packed row length the dataset was built for (manifest, then recipe), else its longest row."""
    value = manifest.get("max_length") or _recipe_data(dataset_dir).get("max_length")
    if value is not None:
        return int(value)
    lengths = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"])
    longest = int(pc.max(lengths).as_py() or 0)
    log.warning(
        f"{dataset_dir}: no max_length in manifest.json or provenance.json; padding rows to the longest, {longest}"
    )
    return longest


def _pad(row: np.ndarray, max_length: int, pad_id: int, index: int) -> np.ndarray:
    if len(row) > max_length:
        raise UserError(
            f"export-mindrecord: row {index} has {len(row)} tokens, more than max_length {max_length}; rebuild the dataset"
        )
    out = np.full(max_length, pad_id, dtype=np.int32)
    out[: len(row)] = row
    return out


def _write_sidecar(path: Path, dataset_dir: str | Path, split: str, extra: dict[str, Any]) -> None:
    info = {
        "stage": "export",
        "inputs": {
            "dataset_dir": str(dataset_dir),
            "split": split,
            "fingerprint": provenance.directory_fingerprint(dataset_dir),
        },
        "versions": provenance.package_versions(),
        "git_revision": provenance.git_revision(),
        **extra,
    }
    write_json_atomic(path, info)
