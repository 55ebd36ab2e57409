"""`PATH.provenance.json` beside an export: an export is files, not a directory, so its provenance
sits next to them and names the prepared dataset it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openseek_cpt.artifacts import provenance
from openseek_cpt.artifacts.fileio import write_json_atomic
from openseek_cpt.export import STAGE


def write_sidecar(path: Path, dataset_dir: str | Path, split: str, extra: dict[str, Any]) -> None:
    """Record the exported split, its input's fingerprint, versions and `extra`, atomically."""
    info = {
        "stage": STAGE,
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
