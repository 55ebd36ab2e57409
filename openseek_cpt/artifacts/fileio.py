"""Small-file I/O every module shares: JSON read/write, canonical hashes, and the fsync policy.

The fsync policy (one for every artifact): file data is fsynced before the name that makes it
visible (a rename, a marker) is written, and that name's directory is fsynced after, so a crash
leaves either the old state or the new one, never a complete-looking half. Temp names come from
temps.py, so a killed writer's leftovers are swept like every other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import UserError, first_line

# Sidecars (provenance, manifests, markers, configs) are small; a bigger file is not one of ours,
# and reading it whole would only cost memory.
MAX_JSON_BYTES = 64 << 20


def parse_json(raw: str | bytes, **kwargs: Any) -> Any:
    """json.loads that raises ValueError for every bad document: also for hostile nesting
    (`[` * 100000), where json's decoder raises RecursionError."""
    try:
        return json.loads(raw, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_json(path: str | Path, *, field: str = "", fix: str = "restore or rewrite the file") -> Any:
    """The JSON value in `path`; a UserError naming the file (after `field`, the key that pointed
    there) when it is unreadable or damaged."""
    path = Path(path)
    where = f"{field}: {path}" if field else str(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(
                f"{path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} a sidecar may have"
            )
        return parse_json(path.read_bytes())
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc}); {fix}") from None
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{where}: not valid JSON ({first_line(exc)}); {fix}") from None


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable, damaged or not an object
    (callers treat all of these as "no such sidecar")."""
    try:
        value = load_json(path)
    except UserError:
        return None
    return value if isinstance(value, dict) else None


def canonical_json(obj: Any) -> str:
    """Sorted-key JSON (non-JSON values via str): the form that is hashed."""
    return json.dumps(obj, sort_keys=True, default=str)


def canonical_hash(obj: Any) -> str:
    """sha256 hex of `canonical_json(obj)`: equal settings give equal hashes across runs."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (before a rename or marker declares it complete)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_dir(dirpath)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write pretty JSON to `path` via a temp file, fsync, rename, fsync of the directory.

    A dead writer's temp file of `path` is swept first."""
    path = Path(path)
    sweep_leftovers(path.parent, path.name)
    tmp = temp_path(path, "tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
