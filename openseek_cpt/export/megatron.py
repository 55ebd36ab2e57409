"""Export a prepared dataset as Megatron-LM's `PREFIX.bin/.idx`, for Megatron-LM and MindSpore Transformers.

The format itself (and reading it back as a source) lives in `artifacts/megatron_format`; this
finds the split and its vocabulary, writes, and records what was exported beside the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from openseek_cpt.artifacts import megatron_format, prepared
from openseek_cpt.artifacts.atomic import check_output_files, check_output_prefix
from openseek_cpt.artifacts.sidecar import sidecar_path, write_sidecar
from openseek_cpt.export import STAGE
from openseek_cpt.logs import get_logger

log = get_logger(STAGE)


def export_megatron(dataset_dir: str | Path, prefix: str | Path, split: str = "train") -> Path:
    """Write `split` of a prepared dataset as PREFIX.bin/.idx; returns PREFIX.

    One Megatron sequence (= document) per document segment of each packed row, so Megatron's
    GPT dataset and MindSpore Transformers see the same documents our `train` does. Token dtype
    from the vocabulary size (uint16 below 65,500, else int32), as Megatron chooses it.
    PREFIX.provenance.json records what was exported: the two files are the artifact, so there is
    no directory for `atomic_output_dir` (each file is renamed into place instead). Existing files
    are replaced only when that sidecar says an earlier export wrote them.
    """
    check_output_prefix(prefix, "export-megatron: PREFIX")
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    check_output_files(
        [bin_path, idx_path],
        sidecar=sidecar_path(prefix),
        stage=STAGE,
        inputs=[dataset_dir],
        field="export-megatron: PREFIX",
    )
    dataset = prepared.load_split(dataset_dir, split, "DATASET_DIR")
    manifest = prepared.read_manifest(dataset_dir)
    vocab_size = _vocab_size(manifest, dataset, dataset_dir)
    fields = megatron_format.export_dataset(dataset, prefix, vocab_size)
    write_sidecar(prefix, stage=STAGE, dataset_dir=dataset_dir, split=split, fields=fields)
    log.info(f"export-megatron: {len(dataset)} rows of {dataset_dir}[{split}] -> {prefix}.bin/.idx")
    return Path(prefix)


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
