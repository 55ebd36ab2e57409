"""The soup's inputs: checkpoint paths and globs expanded, each model directory opened and checked.

Any HF causal-LM checkpoint set stored as safetensors will do. A checkpoint the train stage did
not finish writing (or a copy under another step's name), a path given twice, an empty glob, or
weights that do not match the inputs are one-line errors before anything is read; a weight file
whose bytes differ from its checkpoint marker's content hash is one after the merge has read it
(`check_content`: the hash comes from the merge's own reads).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from openseek_cpt.artifacts import checkpoints, content_hash
from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.artifacts.safetensors_stream import ModelFiles, open_model
from openseek_cpt.errors import UserError


@dataclass
class SoupInput:
    """One model directory: its parsed files, and each key's (dtype, shape) as stored."""

    path: Path
    role: str
    step: int | None
    files: ModelFiles
    tied: bool
    # {file: content hash} from the checkpoint's marker (None: no marker, or one without hashes).
    hashes: dict[str, str] | None = None
    meta: dict[str, tuple[str, tuple[int, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.meta = {k: (t.dtype, t.shape) for k, t in self.files.tensors.items()}

    @property
    def label(self) -> str:
        return "base" if self.role == "base" else self.path.name


def open_input(path: str | Path, role: str, field_name: str = "soup.checkpoints") -> SoupInput:
    """Read the safetensors headers (and index) of a model directory; refuse other formats."""
    p = Path(path)
    if role == "checkpoint" and p.is_dir():
        _check_complete(p)
    files = open_model(p, field_name)
    config = read_json(p / "config.json") or {}
    step = checkpoints.step_of(p) if role == "checkpoint" else None
    marker = checkpoints.read_marker(p) or {}
    hashes = marker.get("hashes") if marker.get("content_hash") == content_hash.ALGORITHM else None
    tied = bool(config.get("tie_word_embeddings"))
    return SoupInput(p, role, step, files, tied, hashes if isinstance(hashes, dict) else None)


def _check_complete(ckpt: Path) -> None:
    """Refuse a checkpoint the train stage did not finish writing (its marker is written last).

    Checkpoints from elsewhere (and plain model directories) have no marker at all; one of a
    training run (its lock file, or other checkpoints with markers, beside it) without a marker was
    cut off mid-save. A marker of another step means a copied directory, not that step.
    """
    st = checkpoints.status(ckpt)
    if st.complete:
        return
    if st.state == "misnamed":
        raise UserError(
            f"soup.checkpoints: {ckpt} is not the checkpoint its name says ({st.why}); "
            f"give the original directory, or rename the copy to match its {checkpoints.MARKER}"
        )
    if st.state == "damaged":
        reason = f"{st.files[0]} differs from its {checkpoints.MARKER}"
    elif checkpoints.of_a_run(ckpt):
        reason = f"no {checkpoints.MARKER} in a training run's directory"
    else:
        return
    raise UserError(
        f"soup.checkpoints: {ckpt} is incomplete ({reason}): training was cut off while saving it; "
        "leave it out (or let `openseek-cpt train` resume, which removes it)"
    )


def check_content(inputs: list[SoupInput], content: list[dict[str, str]]) -> None:
    """Refuse an input whose weight file's content hash (from the merge's reads) is not the one
    its checkpoint marker records: the file was damaged after training saved it."""
    for inp, actual in zip(inputs, content, strict=True):
        for name, digest in actual.items():
            recorded = (inp.hashes or {}).get(name)
            if recorded is not None and recorded != digest:
                raise UserError(
                    f"{_field(inp)}: {inp.path / name} does not match its content hash in "
                    f"{checkpoints.MARKER} (damaged after it was saved); leave {inp.path} out "
                    "or restore the file"
                )


def damaged_input_message(inputs: list[SoupInput]) -> str | None:
    """The line `check_content` would give, found by reading the inputs with hashes again: for a
    merge stopped early (a NaN from a flipped bit), whose reads did not cover every byte."""
    for inp in inputs:
        st = checkpoints.verify(inp.path) if inp.hashes else None
        if st is not None and st.state == "damaged":
            return (
                f"{_field(inp)}: {inp.path / st.files[0]} does not match its {checkpoints.MARKER} "
                f"({st.detail or 'size differs'}); leave {inp.path} out or restore the file"
            )
    return None


def _field(inp: SoupInput) -> str:
    return "soup.base_dir" if inp.role == "base" else "soup.checkpoints"


def expand_checkpoints(items: Iterable[str]) -> list[Path]:
    """Paths and globs -> directories sorted by step (checkpoint-N), then by path."""
    items = list(items)
    if not items:
        raise UserError(
            "soup.checkpoints is empty; list checkpoint directories or a glob like runs/NAME/checkpoint-*"
        )
    out: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_dir())
            if not matches:
                raise UserError(
                    f"soup.checkpoints: glob {item!r} matches no directory (from {os.getcwd()}); "
                    "run `openseek-cpt train` first or fix the pattern"
                )
            out += matches
        else:
            out.append(Path(item))

    def order(p: Path) -> tuple[bool, int, str]:
        step = checkpoints.step_of(p)
        return (step is None, step or 0, str(p))

    return sorted(out, key=order)


def check_distinct(inputs: list[SoupInput]) -> None:
    seen: dict[Path, SoupInput] = {}
    for inp in inputs:
        real = inp.path.resolve()
        if real in seen:
            first = seen[real]
            raise UserError(
                f"soup.checkpoints: {inp.path} is listed twice (also as {first.role} {str(first.path)!r}); "
                "remove the duplicate so no input counts double"
            )
        seen[real] = inp


def weights_for(weights: list[float] | None, n: int) -> list[float]:
    """One weight per input (uniform when None). The values were checked at recipe load; only
    their count depends on the inputs, known once the globs are expanded."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UserError(
            f"soup.weights has {len(weights)} values but there are {n} inputs (base + {n - 1} checkpoints, "
            "sorted by step); give one weight per input or null for a uniform average"
        )
    return [float(w) for w in weights]


def non_finite_count(inp: SoupInput, key: str) -> int:
    """How many elements of `key` in `inp` are NaN or inf (reads that one tensor)."""
    import numpy as np

    from openseek_cpt.soup.numerics import to_fp32

    info = inp.files.tensors[key]
    with open(inp.files.path / info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.end - info.start)
    values = to_fp32(memoryview(raw), info.dtype, info.numel, np.empty(info.numel, np.float32))
    return int(info.numel - np.isfinite(values).sum())


def non_finite_message(inputs: list[SoupInput], key: str) -> str:
    """One line naming every input whose `key` holds NaN/inf, and the fix."""
    found = [
        f"{inp.path} ({n} of {inp.files.tensors[key].numel})"
        for inp in inputs
        if (n := non_finite_count(inp, key))
    ]
    where = ", ".join(found) or "the combination (values beyond float32's range)"
    return (
        f"soup: {key} holds NaN/inf in {where}; drop that input from soup.checkpoints (a diverged "
        "checkpoint), or set soup.allow_non_finite=true to average it anyway"
    )
