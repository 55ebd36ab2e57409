"""Training checkpoints: their names, their completion marker, and whether one is complete.

A checkpoint is `OUTPUT_DIR/checkpoint-N/` (N = optimizer step, Trainer's naming). It is complete
only once `openseek_checkpoint.json` (written last, atomically, after every file is fsynced) lists
each file with its size and the files on disk agree. The train stage writes markers and rotates;
the soup and resume read `status`. Nothing else parses checkpoint names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openseek_cpt.artifacts.fileio import fsync_tree, read_json, write_json_atomic

PREFIX = "checkpoint-"
MARKER = "openseek_checkpoint.json"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def name_for(step: int) -> str:
    return f"{PREFIX}{step}"


def step_of(path: str | Path) -> int | None:
    """N of a `checkpoint-N` directory name, None for any other name."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N directories of a run, oldest step first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class Status:
    """complete: marker and files agree; missing: no readable marker; damaged: `files` disagree."""

    state: Literal["complete", "missing", "damaged"]
    files: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def read_marker(ckpt: str | Path) -> dict[str, Any] | None:
    marker = read_json(Path(ckpt, MARKER))
    return marker if marker and isinstance(marker.get("files"), dict) else None


def status(ckpt: str | Path) -> Status:
    marker = read_marker(ckpt)
    if marker is None:
        return Status("missing")
    bad = tuple(
        name
        for name, size in marker["files"].items()
        if not Path(ckpt, name).is_file() or Path(ckpt, name).stat().st_size != size
    )
    return Status("damaged", bad) if bad else Status("complete")


def write_marker(ckpt: str | Path, info: dict[str, Any]) -> None:
    """Declare `ckpt` complete: fsync its files, then write the marker listing them (atomically)."""
    ckpt = Path(ckpt)
    fsync_tree(ckpt)
    files = {
        p.relative_to(ckpt).as_posix(): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    write_json_atomic(ckpt / MARKER, {**info, "files": files})


def newest_complete(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = [c for c in list_checkpoints(output_dir) if status(c).complete]
    return complete[-1] if complete else None
