"""Artifacts: atomic directories with a provenance.json that says what produced them.

Every stage writes its output into a temporary sibling directory and renames it into place
at the end (after an fsync of its files, the fileio policy), so a directory with the final name
is always complete. A stage never replaces what it did not write: an existing output directory
must be a previous output of the same stage, and an output may not be, lie inside, or contain
one of the stage's inputs (`atomic_output_dir(stage=, inputs=)`). `provenance.json` records
the recipe hash, package versions, git revision, input fingerprints and the sha256 of every
file, so `openseek-cpt verify DIR` can tell whether a directory is intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from openseek_cpt import __version__
from openseek_cpt.artifacts.fileio import canonical_hash, fsync_dir, fsync_tree, read_json
from openseek_cpt.errors import UserError

PROVENANCE_FILE = "provenance.json"
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "trl",
    "safetensors",
    "tokenizers",
    "numpy",
    "pyarrow",
)


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
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)  # the fsync policy (fileio): data on disk before the rename makes it visible
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(
    final: str | Path, *, stage: str | None, inputs: Iterable[str | Path] = (), field: str | None = None
) -> None:
    """UserError unless writing `stage`'s output to `final` can replace nothing it did not write."""
    final = Path(final)
    field = field or (f"{stage}: output" if stage else "output")
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
    if stage is None or not (final.exists() or final.is_symlink()):
        return
    if not final.is_dir():
        raise UserError(
            f"{field}: {str(final)!r} exists and is not a directory; {stage} will not replace it; "
            "choose another path or remove it yourself"
        )
    prov = read_provenance(final)
    written_by = prov.get("stage") if prov else None
    if written_by != stage and any(final.iterdir()):
        what = f"an output of the {written_by} stage" if written_by else "not an openseek-cpt artifact"
        raise UserError(
            f"{field}: {str(final)!r} exists and is {what}; {stage} replaces only its own earlier "
            "output; choose another path or remove it yourself"
        )


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|work|old)-(?P<pid>\d+)$")


def sweep_leftovers(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.work-PID` / `.NAME.old-PID` entries whose process is gone.

    They are what a killed writer leaves (atomic dirs, atomic files); a live PID's are kept.
    """
    directory = Path(directory)
    removed = []
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


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: str | Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file under `directory` (relative POSIX paths), except provenance.json itself.

    `known`: hashes the stage computed from the bytes as it wrote them (the soup's shards), not read again.
    """
    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != PROVENANCE_FILE:
            rel = p.relative_to(directory).as_posix()
            out[rel] = (known or {}).get(rel) or sha256_file(p)
    return out


def fingerprint_of_hashes(hashes: dict[str, str]) -> str:
    return canonical_hash(hashes)


def directory_fingerprint(directory: str | Path) -> str:
    """The fingerprint recorded in a directory's provenance, or one computed from its files."""
    prov = read_provenance(directory)
    if prov and prov.get("fingerprint"):
        return prov["fingerprint"]
    return fingerprint_of_hashes(file_hashes(directory))


def git_revision() -> str | None:
    """The git commit of the package checkout (None when not in a git tree, e.g. in a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("OPENSEEK_CPT_GIT_REVISION")
    if out.returncode != 0:
        return os.environ.get("OPENSEEK_CPT_GIT_REVISION")
    rev = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    versions = {"openseek-cpt": __version__}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_provenance(
    directory: str | Path,
    *,
    stage: str,
    recipe: Any | None = None,
    inputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    known_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Hash every file in `directory` and write provenance.json there; returns what was written.

    Call it last, inside the atomic directory, once all other files are written. `known_hashes`
    (file -> sha256 from the bytes as written) spares reading those files again.
    """
    hashes = file_hashes(directory, known_hashes)
    prov = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe_hash": recipe.hash() if recipe is not None else None,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "inputs": inputs or {},
        "fingerprint": fingerprint_of_hashes(hashes),
        "files": hashes,
    }
    if extra:
        prov.update(extra)
    Path(directory, PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return prov


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    return read_json(Path(directory, PROVENANCE_FILE))


def verify(directory: str | Path) -> tuple[bool, list[str]]:
    """Recompute every file hash; returns (intact, lines describing the directory and any damage)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"verify: {str(directory)!r} is not a directory; pass an artifact directory")
    prov = read_provenance(directory)
    if prov is None:
        raise UserError(
            f"verify: {directory} has no readable {PROVENANCE_FILE}; it was not made by openseek-cpt"
        )
    recorded: dict[str, str] = prov.get("files", {})
    actual = file_hashes(directory)
    problems = []
    for name, digest in recorded.items():
        if name not in actual:
            problems.append(f"missing: {name}")
        elif actual[name] != digest:
            problems.append(f"modified: {name}")
    problems += [f"unexpected: {name}" for name in actual if name not in recorded]
    about = [
        f"stage: {prov.get('stage')}  created: {prov.get('created')}",
        f"recipe_hash: {prov.get('recipe_hash')}  git: {prov.get('git_revision')}",
        f"versions: {', '.join(f'{k}={v}' for k, v in sorted(prov.get('versions', {}).items()))}",
        f"inputs: {json.dumps(prov.get('inputs', {}), sort_keys=True)}",
        f"files: {len(recorded)}  fingerprint: {prov.get('fingerprint')}",
    ]
    return (not problems), about + problems
