"""Temp names and their sweep: what a writer leaves beside its output while it works, and who removes it.

Every temporary entry beside an output is named by `temp_path`: `.NAME.KIND-PID` (hidden, next to
NAME, tagged with the writer's process id). `tmp` is the output being written (renamed to NAME
at the end), `work` is scratch (or a directory on its way out), `old` is the previous NAME moved
aside for the swap, `modules` holds a tokenizer's remote code while the data stage loads it. A killed writer leaves such entries behind; `sweep_leftovers` removes those
whose process is gone, so one pattern covers every kind. Imports nothing of the package: both the
fsync policy (fileio) and the atomic directories build on it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Literal

Kind = Literal["tmp", "work", "old", "modules"]
KINDS: tuple[Kind, ...] = ("tmp", "work", "old", "modules")
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?:{'|'.join(KINDS)})-(?P<pid>\d+)$")


def temp_path(final: str | Path, kind: Kind, pid: int | None = None) -> Path:
    """`.NAME.KIND-PID` beside `final` (default PID: this process): the one spelling of a temp name."""
    if kind not in KINDS:
        raise ValueError(f"temp kind {kind!r} is not one of {KINDS}")
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid() if pid is None else pid}"


def sweep_leftovers(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove the `temp_path` entries in `directory` (of `name` only, if given) whose process is gone.

    They are what a killed writer leaves (atomic dirs, atomic files, scratch); a live PID's are kept.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        m = _LEFTOVER.match(entry.name)
        if not m or (name is not None and m.group("name") != name) or pid_alive(int(m.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
