"""Recipe checks: every declared choice, range and non-empty key, then each section's own checks.

The declarations (`setting(...)`) are checked here, the same way for every section; what spans
several keys of one section (ratios that sum to 1, soup weights, `train.args` against
TrainingArguments) is that section's `check()`, beside its declaration in the stage's config module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from openseek_cpt.errors import UserError


def validate(recipe: Any) -> None:
    """Every declared field's choices and range, then the recipe's own `check()` (its sections')."""
    for where, f, value in _declared(recipe, ""):
        _check_field(where, f, value)
    check = getattr(recipe, "check", None)
    if check is not None:
        check()


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
