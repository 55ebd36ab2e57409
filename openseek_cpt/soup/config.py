"""The soup stage's section of the recipe (`soup:`), with what it checks across its keys.

`soup.method` takes its choices from `methods.METHODS`, `soup.dtype` from OUTPUT_DTYPES below. This
module imports no numpy when it is imported: the soup command sets OPENBLAS_NUM_THREADS after the
recipe is loaded, before numpy's first import.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from openseek_cpt.errors import UserError
from openseek_cpt.recipe.schema import setting
from openseek_cpt.soup import methods

# soup.dtype -> the safetensors dtype written.
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class SoupConfig:
    base_dir: str | None = setting(None, "Base model directory; default: assets.model_dir.")
    checkpoints: list[str] = setting(
        [], "Checkpoint directories: a list of paths and/or globs (sorted by step)."
    )
    weights: list[float] | None = setting(
        None, "Weights of [base, *checkpoints]; null = uniform average.", at_least=0
    )
    output_dir: str = setting("models/OpenSeek_Small_v1-soup", "Output directory of the soup.", required=True)
    method: str = setting(
        "linear",
        "How the inputs are combined, key by key: "
        + "; ".join(f"{name}: {methods.summary(name)}" for name in methods.METHODS)
        + ".",
        choices=methods.METHODS,
    )
    dtype: str = setting("bfloat16", "Dtype of the written tensors.", choices=OUTPUT_DTYPES)
    allow_non_finite: bool = setting(
        False,
        "Average inputs that hold NaN/inf (the soup is then non-finite there); default: refuse, "
        "naming the input and the key.",
    )
    allow_partial: bool = setting(
        False, "Merge only keys present (with the same shape) everywhere, and record the rest."
    )
    max_shard_size: str | int = setting(
        "2GB", 'Maximum shard size of the output (bytes or a string like "2GB").'
    )
    evaluate: bool = setting(False, "Evaluate base, checkpoints and soup on the prepared eval split.")
    eval_dataset_dir: str | None = setting(None, "Prepared dataset for evaluation; default: data.output_dir.")
    eval_max_sequences: int = setting(
        0, "Sequences of the eval split used for evaluation (0 = all).", at_least=0
    )

    def check(self) -> None:
        """What spans keys: finite weights that do not sum to 0, a shard size that parses."""
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise UserError(
                f"recipe: soup.weights={self.weights} has a non-finite weight; weights must be finite"
            )
        if self.weights is not None and self.weights and sum(self.weights) <= 0:
            raise UserError(
                f"recipe: soup.weights={self.weights} sum to 0; give at least one positive weight"
            )
        parse_size(self.max_shard_size)


def parse_size(value: str | int) -> int:
    """`2GB`, `500MB`, `1GiB` or a number of bytes -> bytes (GB = 10**9, GiB = 2**30, as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise UserError(
                f"soup.max_shard_size={value!r} is not a size; write e.g. 2GB, 500MB or a byte count"
            )
        unit = m.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1 if unit else 0))
    if size <= 0:
        raise UserError(f"soup.max_shard_size={value!r} must be > 0")
    return size
