"""Provenance: `provenance.json` says what produced an artifact, and `verify` checks it still holds.

It records the stage, the recipe hash, package versions, git revision, input fingerprints and the
sha256 of every file, so `openseek-cpt verify DIR` can tell whether a directory is intact. Written
last, inside the atomic directory (atomic.py), once every other file is there. Its `seal` holds the
hash of each of its own fields, so an edit to provenance.json itself (the recipe, the fingerprint, the
stage) shows as damage naming the field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from openseek_cpt import __version__
from openseek_cpt.artifacts.fileio import canonical_hash, read_json
from openseek_cpt.errors import UserError

PROVENANCE_FILE = "provenance.json"
SEAL = "seal"  # {field: canonical hash of its value} for every other field of provenance.json
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
    prov = json.loads(json.dumps(prov))  # the values as verify will read them back (tuples as lists)
    prov[SEAL] = seal_of(prov)
    Path(directory, PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return prov


def seal_of(prov: dict[str, Any]) -> dict[str, str]:
    """The canonical hash of every field of `prov` except the seal itself."""
    return {key: canonical_hash(value) for key, value in prov.items() if key != SEAL}


def seal_problems(prov: dict[str, Any]) -> list[str]:
    """What in `prov` no longer matches its seal, and a fingerprint that is not that of its `files`."""
    seal = prov[SEAL] if isinstance(prov.get(SEAL), dict) else {}
    actual = seal_of(prov)
    edited = sorted(key for key in actual.keys() | seal.keys() if actual.get(key) != seal.get(key))
    problems = (
        [f"modified: {PROVENANCE_FILE} (field {', '.join(edited)} edited after it was written)"]
        if edited
        else []
    )
    files = prov.get("files")
    if not isinstance(files, dict) or prov.get("fingerprint") != fingerprint_of_hashes(files):
        problems.append(f"modified: {PROVENANCE_FILE} (fingerprint is not the hash of its files)")
    return problems


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    return read_json(Path(directory, PROVENANCE_FILE))


def verify(directory: str | Path) -> tuple[bool, list[str]]:
    """Recompute every file hash; returns (no damage found, lines describing the directory and any damage)."""
    status, lines = verify_status(directory)
    return status != "DAMAGED", lines


def verify_status(directory: str | Path) -> tuple[str, list[str]]:
    """Recompute every file hash and check provenance.json against its seal.

    Returns ("intact" | "unsealed" | "DAMAGED", lines describing the directory and any damage).
    "unsealed": every file matches, but provenance.json has no seal (written before seals existed), so
    its own content (recipe, stage, inputs) cannot be checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"verify: {str(directory)!r} is not a directory; pass an artifact directory")
    prov = read_provenance(directory)
    if prov is None:
        raise UserError(
            f"verify: {directory} has no readable {PROVENANCE_FILE}; it was not made by openseek-cpt"
        )
    files = prov.get("files")
    recorded: dict[str, str] = files if isinstance(files, dict) else {}
    actual = file_hashes(directory)
    sealed = SEAL in prov
    problems = seal_problems(prov) if sealed else []
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
    if problems:
        return "DAMAGED", about + problems
    if not sealed:
        note = f"unsealed: {PROVENANCE_FILE} has no {SEAL} (written before openseek-cpt sealed it)"
        return "unsealed", about + [note + "; its own content is not checked"]
    return "intact", about
