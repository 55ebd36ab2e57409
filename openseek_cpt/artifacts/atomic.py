"""Atomic output directories and the guard that keeps a stage from replacing what it did not write.

Every stage writes its output into a temporary sibling directory (`temp_path(final, "tmp")`) and
renames it into place at the end, after an fsync of its files (the fileio policy), so a directory
with the final name is always complete. A stage never replaces what it did not write: an existing
output directory must be a previous output of the same stage (its provenance.json says so), and an
output may not be, lie inside, or contain one of the stage's inputs (`atomic_output_dir(stage=,
inputs=)`). Leftovers of killed writers are swept first (temps.py). File outputs (a Megatron
PREFIX.bin/.idx, a MindRecord file) follow the same rule through `check_output_files`: an existing
file may be replaced only when its sidecar `*.provenance.json` says this stage wrote it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from openseek_cpt.artifacts.fileio import fsync_dir, fsync_tree
from openseek_cpt.artifacts.provenance import read_provenance
from openseek_cpt.artifacts.sidecar import written_by as sidecar_writer
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import UserError


@contextlib.contextmanager
def atomic_output_dir(
    final: str | Path,
    *,
    stage: str | None = None,
    inputs: Iterable[str | Path] = (),
    field: str | None = None,
) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it replaces `final`, on error it is removed.

    Outputs never destroy inputs: with `stage`, an existing `final` must be empty or a previous
    output of the same stage (its provenance.json says so); `final` may not be, lie inside, or
    contain any of `inputs`. Either is a UserError naming `field` before anything is written.
    Leftover temp dirs of `final` from dead processes are swept first.
    """
    final = Path(final)
    check_output_dir(final, stage=stage, inputs=inputs, field=field)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final.parent, final.name)
    tmp = temp_path(final, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)  # the fsync policy (fileio): data on disk before the rename makes it visible
    old = temp_path(final, "old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(
    final: str | Path, *, stage: str | None, inputs: Iterable[str | Path] = (), field: str | None = None
) -> None:
    """UserError unless writing `stage`'s output to `final` can replace nothing it did not write, and
    can be written at all: not a file, no file among its parents, a writable (not read-only) place.
    `stage=None` (train's run directory, tiny's workdir): only those last checks, and `final` is
    written in place, not renamed into it."""
    final = Path(final)
    field = field or (f"{stage}: output" if stage else "output")
    _check_not_an_input(final, inputs, field)
    if (final.exists() or final.is_symlink()) and not final.is_dir():
        raise UserError(
            f"{field}: {str(final)!r} exists and is not a directory; {stage or 'openseek-cpt'} will not "
            "replace it; choose another path or remove it yourself"
        )
    if final.is_dir():
        check_writable(final, field)
    if stage is not None or not final.is_dir():  # a stage's output is a temp sibling renamed into place
        check_writable(_nearest_existing(final.absolute().parent, final, field), field)
    if stage is None or not final.exists():
        return
    prov = read_provenance(final)
    written_by = prov.get("stage") if prov else None
    if written_by != stage and any(final.iterdir()):
        what = f"an output of the {written_by} stage" if written_by else "not an openseek-cpt artifact"
        raise UserError(
            f"{field}: {str(final)!r} exists and is {what}; {stage} replaces only its own earlier "
            "output; choose another path or remove it yourself"
        )


def check_output_files(
    files: Iterable[str | Path],
    *,
    sidecar: str | Path,
    stage: str,
    inputs: Iterable[str | Path] = (),
    field: str,
) -> None:
    """UserError unless `stage` may write `files` and their `sidecar` (which records who wrote them).

    Each may not be, or lie inside, one of `inputs` (give a Megatron source as its .bin and .idx);
    an existing one is replaced only when `sidecar` exists and names `stage` as its writer (this
    stage's own earlier output); none may be a directory; the nearest existing parent must be a
    writable directory. Called before any work, so a refusal costs nothing."""
    sidecar = Path(sidecar)
    inputs = list(inputs)
    outputs = [Path(f) for f in files] + [sidecar]
    for path in outputs:
        _check_not_an_input(path, inputs, field)
        if path.is_dir():
            raise UserError(
                f"{field}: {str(path)!r} is a directory; {stage} writes a file there; choose another path"
            )
    written_by = sidecar_writer(sidecar)
    existing = [p for p in outputs if p.exists() or p.is_symlink()]
    if existing and written_by != stage:
        what = (
            f"written by the {written_by} stage"
            if written_by
            else f"not written by {stage} (no {sidecar.name} says so)"
        )
        raise UserError(
            f"{field}: {str(existing[0])!r} exists and was {what}; {stage} replaces only its own earlier "
            "output; choose another path or remove it yourself"
        )
    check_writable(_nearest_existing(outputs[0].absolute().parent, outputs[0], field), field)


def check_output_prefix(prefix: str | Path, field: str) -> None:
    """UserError when a file PREFIX (PREFIX.bin/.idx) names a directory: `DIR/` would write the
    hidden `DIR/.bin`, and `DIR` files beside the directory the user meant to write into."""
    if Path(prefix).is_dir() or str(prefix).endswith(("/", os.sep)):
        raise UserError(
            f"{field} {str(prefix)!r} is a directory; give a file prefix inside it, e.g. "
            f"{str(Path(prefix) / 'train_text_document')!r} (writes that name's .bin and .idx)"
        )


def _nearest_existing(parent: Path, target: Path, field: str) -> Path:
    """The nearest existing directory at or above `parent`, which `target` will be created under;
    a file there means `target` can never be created."""
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(
            f"{field}: {str(target)!r} cannot be created: {str(parent)!r} is a file, not a directory; "
            "choose another path"
        )
    return parent


def check_writable(directory: Path, field: str) -> None:
    """UserError naming `field` unless this process can create files in `directory` (access(2)
    answers for a read-only filesystem too, where root's bypass of the mode bits does not help)."""
    if os.access(directory, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "a read-only filesystem" if read_only else "permission denied"
    raise UserError(f"{field}: cannot write in {str(directory)!r} ({why}); choose another path")


def _check_not_an_input(final: Path, inputs: Iterable[str | Path], field: str) -> None:
    target = final.resolve()
    for item in inputs:
        if not Path(item).exists():  # a hub name, or nothing there: nothing to destroy
            continue
        source = Path(item).resolve()
        if target == source or source in target.parents:
            raise UserError(
                f"{field}: {str(final)!r} is {'' if target == source else 'inside '}the input {str(item)!r}; "
                "writing there would destroy it; choose another output path"
            )
        if target in source.parents:
            raise UserError(
                f"{field}: {str(final)!r} contains the input {str(item)!r}; replacing it would destroy "
                "the input; choose another output path"
            )
