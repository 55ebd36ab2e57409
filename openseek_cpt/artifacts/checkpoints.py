"""Training checkpoints, their whole lifecycle: names, completion marker, status, the newest complete
one, removal of incomplete ones, rotation, and the rules for resuming from one.

A checkpoint is `OUTPUT_DIR/checkpoint-N/` (N = optimizer step, Trainer's naming). It is complete
only once `openseek_checkpoint.json` (written last, atomically, after every file is fsynced) lists
each file with its size, says step N, and the files on disk agree; beside the file list the marker
records each file's content hash (content_hash.py) and the run that wrote it (`RunInfo`), which
resume compares with the run that reads it. `status` checks sizes and the step (cheap: rotation and
listing use it); `verify` also compares every file's content with its hash (resume, the `verify`
command). The train stage writes markers, rotates and resumes; the soup reads `status` and the
hashes. Nothing else parses checkpoint names.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openseek_cpt.artifacts import content_hash
from openseek_cpt.artifacts.fileio import fsync_tree, read_json, write_json_atomic
from openseek_cpt.artifacts.run_lock import RunLock
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import UserError

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


# ---- marker and status ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What a marker records about the run that wrote the checkpoint (beside its file list)."""

    dataset_dir: str
    dataset_fingerprint: str
    recipe_hash: str
    world_size: int
    distributed_type: str  # "FSDP", else accelerate's type (MULTI_GPU, MULTI_CPU, NO); "DDP" when planned
    global_batch_size: int
    precision: str


def marker_info(step: int, run: RunInfo) -> dict[str, Any]:
    """What a checkpoint's marker records beside its file list (`write_marker` adds the list)."""
    return {"step": step, **dataclasses.asdict(run)}


@dataclass(frozen=True)
class Status:
    """complete: marker and files agree; missing: no readable marker; damaged: `files` disagree
    (size, or content with `verify`); misnamed: the marker is another step's (a copied directory)."""

    state: Literal["complete", "missing", "damaged", "misnamed"]
    files: tuple[str, ...] = ()
    detail: str = ""
    unhashed: bool = False  # complete, but the marker records no content hashes (an older run)

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def why(self) -> str:
        """Why it is not complete, in a few words (empty when complete)."""
        if self.state == "missing":
            return f"no {MARKER}"
        if self.state == "damaged":
            return f"damaged: {', '.join(self.files[:3])}" + (f"; {self.detail}" if self.detail else "")
        return self.detail


def read_marker(ckpt: str | Path) -> dict[str, Any] | None:
    marker = read_json(Path(ckpt, MARKER))
    return marker if marker and isinstance(marker.get("files"), dict) else None


def status(ckpt: str | Path) -> Status:
    """Marker, step and sizes (no file is read): what listing, rotation and the soup's check need."""
    marker = read_marker(ckpt)
    if marker is None:
        return Status("missing")
    named, said = step_of(ckpt), marker.get("step")
    if named is not None and isinstance(said, int) and said != named:
        return Status("misnamed", detail=f"its {MARKER} says step {said}: a copy of {name_for(said)}?")
    bad = tuple(
        name
        for name, size in marker["files"].items()
        if not Path(ckpt, name).is_file() or Path(ckpt, name).stat().st_size != size
    )
    return Status("damaged", bad) if bad else Status("complete")


def verify(ckpt: str | Path) -> Status:
    """`status`, then every file's content against the marker's hashes (reads every byte, in parallel)."""
    st = status(ckpt)
    if not st.complete:
        return st
    marker = read_marker(ckpt) or {}
    recorded = marker.get("hashes")
    if not isinstance(recorded, dict) or marker.get("content_hash") != content_hash.ALGORITHM:
        return Status("complete", unhashed=True)
    try:
        actual = content_hash.hash_files(ckpt, sorted(recorded))
    except OSError as exc:  # removed or unreadable while hashing
        return Status("damaged", (Path(exc.filename or "?").name,), "unreadable")
    bad = tuple(name for name in sorted(recorded) if actual[name] != recorded[name])
    return Status("damaged", bad, f"content differs from its hash in {MARKER}") if bad else st


def write_marker(ckpt: str | Path, info: dict[str, Any]) -> None:
    """Declare `ckpt` complete: fsync its files and hash them (`sync_and_hash`), then write the
    marker listing their sizes and hashes (atomically)."""
    ckpt = Path(ckpt)
    files = {
        p.relative_to(ckpt).as_posix(): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    hashes = sync_and_hash(ckpt, list(files))
    marker = {**info, "files": files, "content_hash": content_hash.ALGORITHM, "hashes": hashes}
    write_json_atomic(ckpt / MARKER, marker)


def sync_and_hash(ckpt: Path, names: list[str]) -> dict[str, str]:
    """fsync the checkpoint while its files are hashed from the page cache: the fsync waits on the
    disk and the hashing on the CPU, so the save takes about the longer of the two, not their sum."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        synced = pool.submit(fsync_tree, ckpt)
        hashes = content_hash.hash_files(ckpt, names)
        synced.result()
    return hashes


def is_checkpoint_dir(path: str | Path) -> bool:
    """A directory with a checkpoint marker, or named checkpoint-N without provenance.json."""
    p = Path(path)
    return p.is_dir() and (
        Path(p, MARKER).exists() or (step_of(p) is not None and not (p / "provenance.json").exists())
    )


def verify_status(ckpt: str | Path) -> tuple[str, list[str]]:
    """("intact" | "unhashed" | "DAMAGED", lines) for `openseek-cpt verify` of a checkpoint."""
    st = verify(ckpt)
    marker = read_marker(ckpt) or {}
    about = [f"checkpoint: step {marker.get('step')}, {len(marker.get('files', {}))} files"]
    if st.state == "missing":
        return "DAMAGED", about + [f"incomplete: no readable {MARKER} (a save cut off mid-write)"]
    if st.state == "misnamed":
        return "DAMAGED", about + [f"misnamed: {st.detail}"]
    if st.state == "damaged":
        what = st.detail or "missing, or its size differs from the marker"
        return "DAMAGED", about + [f"modified: {name} ({what})" for name in st.files]
    if st.unhashed:
        return "unhashed", about + [f"sizes match; {MARKER} records no content hashes (an older run)"]
    return "intact", about + [f"content hashes: {marker.get('content_hash')}, every file matches"]


def of_a_run(ckpt: str | Path) -> bool:
    """Whether `ckpt` sits in a training run's output dir (the run's lock file, or a sibling
    checkpoint with a marker): there a checkpoint without a marker was cut off mid-save."""
    parent = Path(ckpt).parent
    return (parent / RunLock.NAME).exists() or any(read_marker(sib) for sib in list_checkpoints(parent))


def newest_complete(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = [c for c in list_checkpoints(output_dir) if status(c).complete]
    return complete[-1] if complete else None


def newest_verified(
    output_dir: str | Path, *, remove: bool
) -> tuple[Path | None, Status, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose contents match their hashes, its `verify` status, and
    the newer complete ones that did not match, (path, why) each (deleted when `remove`).

    Every rank may call it: the outcome depends only on the files, so all ranks pick the same one.
    """
    rejected: list[tuple[Path, str]] = []
    for ckpt in reversed([c for c in list_checkpoints(output_dir) if status(c).complete]):
        st = verify(ckpt)
        if st.complete:
            return ckpt, st, rejected
        if remove:
            shutil.rmtree(ckpt, ignore_errors=True)
        rejected.append((ckpt, st.why))
    return None, Status("missing"), rejected


# ---- cleanup and rotation -------------------------------------------------------------------


def sweep(output_dir: str | Path) -> list[Path]:
    """Remove what killed writers left in the run directory and in each of its checkpoints."""
    swept = sweep_leftovers(output_dir)
    for ckpt in list_checkpoints(output_dir):
        swept += sweep_leftovers(ckpt)
    return swept


def remove_incomplete(output_dir: str | Path) -> list[tuple[Path, str]]:
    """Delete the checkpoints that are not complete (cut off mid-write, or damaged); (path, why) each.

    A misnamed one (a copy of another step's directory) is not ours to delete: see `misnamed`.
    """
    removed = []
    for ckpt in list_checkpoints(output_dir):
        state = status(ckpt)
        if state.state in ("missing", "damaged"):
            shutil.rmtree(ckpt, ignore_errors=True)
            removed.append((ckpt, state.why))
    return removed


def misnamed(output_dir: str | Path) -> list[tuple[Path, str]]:
    """The checkpoint directories whose marker is another step's: never resumed from nor rotated."""
    found = [(ckpt, status(ckpt)) for ckpt in list_checkpoints(output_dir)]
    return [(ckpt, st.why) for ckpt, st in found if st.state == "misnamed"]


def remove_all(output_dir: str | Path) -> None:
    """Delete every checkpoint of the run (a run that starts over from the base model)."""
    for ckpt in list_checkpoints(output_dir):
        shutil.rmtree(ckpt, ignore_errors=True)


def rotate(output_dir: Path, keep: int | None, protect: Sequence[Path] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep` complete ones (never `protect`).

    Runs after the new checkpoint's marker, so the newest complete checkpoint always survives; a
    checkpoint is first renamed to `.checkpoint-N.work-PID` (atomic), so a kill mid-delete leaves a
    leftover the next start sweeps, never a damaged checkpoint-N.
    """
    if keep is None:
        return []
    complete = [c for c in list_checkpoints(output_dir) if status(c).complete]
    removed = []
    for old in complete[:-keep]:
        if any(old.resolve() == p.resolve() for p in protect if p.exists()):
            continue
        trash = temp_path(old, "work")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(old)
    return removed


# ---- resume ---------------------------------------------------------------------------------


def check_resume(
    ckpt: Path, run: RunInfo, *, force_resume: bool, accelerate_config: str
) -> list[tuple[int, str]]:
    """Refuse a checkpoint of another dataset, or of another kind of run (FSDP vs DDP optimizer files).

    Another world size is fine: weights and optimizer state are saved whole, whatever the world.
    Returns (logging level, message) for each difference that is allowed, for the caller to log.
    """
    marker = read_marker(ckpt) or {}
    was, now = marker.get("distributed_type"), run.distributed_type
    if was is not None and (was == "FSDP") != (now == "FSDP"):
        raise UserError(
            f"train: {ckpt} was written by a {was} run (world size {marker.get('world_size')}) but this run "
            f"is {now} (train.accelerate_config={accelerate_config}); their optimizer files "
            "differ: resume with the config it was written with, or start another train.output_dir"
        )
    notes = []
    if marker.get("world_size") not in (None, run.world_size):
        said = f"{ckpt} was written at world size {marker['world_size']}; resuming at {run.world_size}"
        notes.append((logging.INFO, said))
    if marker.get("dataset_fingerprint") != run.dataset_fingerprint and not force_resume:
        raise UserError(
            f"train: {ckpt} was trained on dataset {str(marker.get('dataset_fingerprint'))[:12]} but "
            f"{run.dataset_dir} is {run.dataset_fingerprint[:12]}; use another train.output_dir, "
            "train.args.overwrite_output_dir=true, or train.force_resume=true"
        )
    if marker.get("recipe_hash") != run.recipe_hash:
        said = f"{ckpt} was written with another recipe (hash {str(marker.get('recipe_hash'))[:12]})"
        notes.append((logging.WARNING, said))
    return notes
