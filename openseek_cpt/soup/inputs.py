"""The soup's inputs: checkpoint paths and globs expanded, each model directory opened and checked.

Any HF causal-LM checkpoint set stored as safetensors will do. A checkpoint the train stage did
not finish writing, a path given twice, an empty glob, or weights that do not match the inputs
are one-line errors before anything is read.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from openseek_cpt.artifacts import checkpoints
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
    return SoupInput(p, role, step, files, bool(config.get("tie_word_embeddings")))


def _check_complete(ckpt: Path) -> None:
    """Refuse a checkpoint the train stage did not finish writing (its marker is written last).

    Checkpoints from elsewhere have no marker at all; only a run whose other checkpoints have one
    (or a marker that disagrees with the files) shows that this one was cut off mid-save.
    """
    st = checkpoints.status(ckpt)
    if st.complete:
        return
    if st.state == "damaged":
        reason = f"{st.files[0]} differs from its {checkpoints.MARKER}"
    elif any(checkpoints.read_marker(sib) for sib in checkpoints.list_checkpoints(ckpt.parent)):
        reason = f"no {checkpoints.MARKER}, unlike the other checkpoints of the run"
    else:
        return
    raise UserError(
        f"soup.checkpoints: {ckpt} is incomplete ({reason}): training was cut off while saving it; "
        "leave it out (or let `openseek-cpt train` resume, which removes it)"
    )


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
    values = to_fp32(raw, info.dtype, info.numel, np.empty(info.numel, np.float32))
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
