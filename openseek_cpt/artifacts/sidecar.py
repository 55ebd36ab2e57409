"""`OUTPUT.provenance.json`: the provenance of an output that is files, not a directory.

A Megatron copy (`PREFIX.bin/.idx`, from `data.megatron_prefix` or `export-megatron`) and a MindRecord
export (`PATH`, `PATH.db`) have no directory to hold a provenance.json, so one sidecar sits beside
them. It says who wrote the files (the output guard lets a stage replace only files whose sidecar
names it) and what they were made from. One format, whoever writes it:

    stage          the stage that wrote the files: "data" or "export"
    created        UTC time
    inputs         {"dataset_dir", "split", "fingerprint"}: the prepared dataset and split written,
                   and that dataset's fingerprint (its provenance.json)
    recipe_hash    the hash of the recipe that built that dataset (null if its provenance has none)
    versions       package versions, as in provenance.json
    git_revision   the checkout's commit, when there is one
    format, ...    the format and its parameters (megatron: vocab_size, dtype; mindrecord:
                   max_length, pad_token_id, rows)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts import provenance
from openseek_cpt.artifacts.fileio import read_json, write_json_atomic

SUFFIX = ".provenance.json"


def sidecar_path(output: str | Path) -> Path:
    """The sidecar of `output` (a Megatron PREFIX, a MindRecord PATH): `OUTPUT.provenance.json`."""
    return Path(f"{output}{SUFFIX}")


def written_by(sidecar: str | Path) -> str | None:
    """The stage a sidecar names as the writer of its files; None when there is no readable one."""
    stage = (read_json(sidecar) or {}).get("stage")
    return stage if isinstance(stage, str) else None


def write_sidecar(
    output: str | Path,
    *,
    stage: str,
    dataset_dir: str | Path,
    split: str,
    fields: dict[str, Any],
    dataset_provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `output`'s sidecar atomically, once its files are complete; returns what was written.

    `fields`: the format and its parameters. `dataset_provenance`: the dataset's provenance as just
    written, when its directory does not have its final name yet (the data stage); else it is read
    from `dataset_dir`.
    """
    prov = dataset_provenance if dataset_provenance is not None else provenance.read_provenance(dataset_dir)
    prov = prov or {}
    info = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "dataset_dir": str(dataset_dir),
            "split": split,
            "fingerprint": prov.get("fingerprint") or provenance.directory_fingerprint(dataset_dir),
        },
        "recipe_hash": prov.get("recipe_hash"),
        "versions": provenance.package_versions(),
        "git_revision": provenance.git_revision(),
        **fields,
    }
    write_json_atomic(sidecar_path(output), info)
    return info
