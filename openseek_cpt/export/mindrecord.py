"""Export a prepared dataset as one MindRecord file, what MindSpore Transformers' pretraining reads.

Each packed row is padded to `data.max_length`; document boundaries travel as the eos that ends
every document. The file is written in a temp directory beside it (`temp_path`) and moved in, so
a half-written export never has the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from openseek_cpt.artifacts import prepared, provenance
from openseek_cpt.artifacts.atomic import check_output_files
from openseek_cpt.artifacts.fileio import fsync_dir, fsync_tree
from openseek_cpt.artifacts.sidecar import sidecar_path, write_sidecar
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import UserError
from openseek_cpt.export import STAGE
from openseek_cpt.logs import get_logger

log = get_logger(STAGE)


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
    path = Path(path)
    if path.suffix == ".db":
        raise UserError(
            f"export-mindrecord: PATH {path} ends in .db, the name MindRecord gives its index; pass the data file name"
        )
    check_output_files(
        [path, Path(f"{path}.db")],
        sidecar=sidecar_path(path),
        stage=STAGE,
        inputs=[dataset_dir],
        field="export-mindrecord: PATH",
    )
    try:
        from mindspore.mindrecord import FileWriter
    except ImportError as exc:
        raise UserError(
            f"export-mindrecord needs MindSpore ({exc.name or 'mindspore'} is not importable); install it with `pip install 'openseek-cpt[mindspore]'`"
        ) from None
    dataset = prepared.load_split(dataset_dir, split, "DATASET_DIR")
    manifest = prepared.read_manifest(dataset_dir)
    max_length = _max_length(manifest, dataset_dir, dataset)
    if manifest.get("pad_token_id") is None and manifest.get("eos_token_id") is None:
        raise UserError(
            f"{dataset_dir}/manifest.json records no pad_token_id or eos_token_id; rebuild the dataset with `openseek-cpt data`"
        )
    pad_id = prepared.pad_token_id(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    # MindRecord stores its file names inside the files, so write under the final name in a temp
    # directory beside it and move both files in (a half-written export never has the final name).
    sweep_leftovers(path.parent, path.name)  # a killed earlier export's temp directory
    tmp = temp_path(path, "tmp")
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
        fsync_tree(tmp)  # the fsync policy (fileio): data on disk before the rename shows it
        for name in (path.name, path.name + ".db"):
            os.replace(tmp / name, path.parent / name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fields = {"format": "mindrecord", "max_length": max_length, "pad_token_id": pad_id, "rows": len(dataset)}
    write_sidecar(path, stage=STAGE, dataset_dir=dataset_dir, split=split, fields=fields)
    log.info(f"export-mindrecord: {len(dataset)} rows of {dataset_dir}[{split}] -> {path}")
    return path


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
