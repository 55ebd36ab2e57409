"""Recipe checks: every declared choice and range, what spans several keys, and train.args.

`train.args` is checked against `transformers.TrainingArguments` (known field, not one the train
stage derives, typed, in range, accepted by its constructor), at load, for every stage; transformers
is imported only when train.args is non-empty.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from openseek_cpt.errors import UserError, first_line
from openseek_cpt.recipe.schema import STAGE_ARGS, Recipe, training_args_types
from openseek_cpt.recipe.values import coerce, parse_size

# TrainingArguments keys the train stage derives from the recipe -> the recipe key to set instead.
DERIVED_ARGS = {
    "output_dir": "train.output_dir",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "seed": "seed",
    "data_seed": "seed",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "bf16_full_eval": "train.precision",
    "fp16_full_eval": "train.precision",
    "use_cpu": "train.precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.output_dir (resume is automatic)",
    "remove_unused_columns": "nothing (the collator needs seq_lengths)",
}
# TrainingArguments keys that would undo a lever of the stage -> what to set instead.
CONFLICTING_ARGS = {
    # Trainer would apply Liger's own deepseek_v3 patch over the stage's loss and experts.
    "use_liger_kernel": "train.loss: liger (the fused Liger cross-entropy on the stage's own model)",
}
# `report_to` values -> the package each logger needs (TensorBoard ships with the stage).
REPORTER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "clearml": "clearml",
                     "neptune": "neptune", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}  # fmt: skip
# Ranges TrainingArguments does not check itself: key -> (lowest allowed, exclusive?, also allowed).
ARG_RANGES: dict[str, tuple[float, bool, tuple[Any, ...]]] = {
    "learning_rate": (0, False, ()),
    "max_steps": (0, True, (-1,)),
    "num_train_epochs": (0, True, ()),
    "save_steps": (0, True, ()),
    "eval_steps": (0, True, (None,)),
    "logging_steps": (0, True, ()),
    "save_total_limit": (0, True, (None,)),
    "warmup_steps": (0, False, ()),
    "weight_decay": (0, False, ()),
    "max_grad_norm": (0, False, ()),
    "adam_epsilon": (0, True, ()),
    "dataloader_num_workers": (0, False, ()),
    "eval_accumulation_steps": (0, True, (None,)),
}


def validate(recipe: Recipe) -> None:
    """Every section's values: declared choices and ranges, then what spans several keys."""
    for where, f, value in _declared(recipe, ""):
        _check_field(where, f, value)
    d = recipe.data
    for i, src in enumerate(d.sources):
        if src.formatting is not None and not re.fullmatch(r"[\w.]+:\w+", src.formatting):
            raise UserError(
                f"recipe: data.sources.{i}.formatting={src.formatting!r} is not 'module:function'; "
                "write e.g. my_package.formats:to_text"
            )
    if d.sources:
        total = sum(s.ratio for s in d.sources)
        if abs(total - 1.0) > 1e-6:
            listing = ", ".join(f"{s.label or s.path}={s.ratio:g}" for s in d.sources)
            raise UserError(f"recipe: data.sources ratios sum to {total:.6g}, not 1.0 ({listing}); fix them")
    s = recipe.soup
    if s.weights is not None and not all(math.isfinite(w) for w in s.weights):
        raise UserError(f"recipe: soup.weights={s.weights} has a non-finite weight; weights must be finite")
    if s.weights is not None and s.weights and sum(s.weights) <= 0:
        raise UserError(f"recipe: soup.weights={s.weights} sum to 0; give at least one positive weight")
    parse_size(s.max_shard_size)
    check_training_args(recipe.train.args)


def _declared(obj: Any, prefix: str) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every declared field, list items of sections included."""
    for f in dataclasses.fields(obj):
        where = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        yield where, f, value
        if dataclasses.is_dataclass(value):
            yield from _declared(value, where + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _declared(item, f"{where}.{i}.")


def _check_field(where: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if meta.get("required") and not (isinstance(value, str) and value.strip()):
        raise UserError(f"recipe: {where} is empty; give a value ({meta['doc']})")
    choices = meta.get("choices") or ()
    if choices and value is not None and value not in choices:
        if meta.get("explain"):
            meta["explain"](value, where)  # one line: why it is refused and what to use
        raise UserError(f"recipe: {where}={value!r} is not one of {', '.join(choices)}")
    numbers = value if isinstance(value, list) else [value]
    for number in (n for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)):
        if meta.get("above") is not None and not number > meta["above"]:
            raise UserError(f"recipe: {where}={value} must be > {meta['above']:g}")
        if meta.get("at_least") is not None and not number >= meta["at_least"]:
            raise UserError(f"recipe: {where}={value} must be >= {meta['at_least']:g}")


def check_training_args(args: dict[str, Any]) -> None:
    """train.args: known TrainingArguments fields, not derived ones, typed, in range, accepted by it.

    Runs at load for every stage; transformers is imported only when train.args is non-empty.
    """
    if not args:
        return
    from transformers import TrainingArguments

    known = training_args_types()
    for key, value in list(args.items()):
        where = f"train.args.{key}"
        if key in DERIVED_ARGS:
            raise UserError(
                f"{where} is set by the train stage; remove it and set {DERIVED_ARGS[key]} instead"
            )
        if key in CONFLICTING_ARGS and value:
            raise UserError(f"recipe: {where}={value!r} is refused; set {CONFLICTING_ARGS[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean train.args.{close[0]}?" if close else ""
            raise UserError(f"{where} is not a transformers.TrainingArguments field{hint}")
        number = coerce(known[key], value, where)
        if isinstance(value, str) and not isinstance(number, str):
            args[key] = number  # PyYAML's 1e-5 string; other values stay as written (the recipe hash)
        if key in ARG_RANGES and number not in ARG_RANGES[key][2]:
            low, exclusive, allowed = ARG_RANGES[key]
            if not (number > low if exclusive else number >= low):
                bound = f"> {low}" if exclusive else f">= {low}"
                also = f" (or {' or '.join(repr(v) for v in allowed)})" if allowed else ""
                raise UserError(f"recipe: {where}={value!r} must be {bound}{also}")
    check_reporters(args.get("report_to"))
    user = {k: v for k, v in args.items() if k not in STAGE_ARGS}
    saved = dict(os.environ)  # TrainingArguments writes ACCELERATE_* variables; keep this process clean
    try:
        TrainingArguments(output_dir="recipe-check", use_cpu=True, **user)
    except (ValueError, TypeError) as exc:
        raise UserError(f"recipe: train.args: {first_line(exc)}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_reporters(report_to: Any) -> None:
    """Each `report_to` logger's package is importable (Trainer would fail at its first step)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORTER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"recipe: train.args.report_to={name!r} needs the {package!r} package, which is not "
                f"installed; pip install {package}, or report_to: tensorboard"
            )
