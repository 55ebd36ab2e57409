"""Typed values: a value read and checked against the annotation of the key it sets.

`--set` text is parsed as its key's type says (`--set train.args.eval_strategy=no` is the string
"no", `--set assets.revision=1e3` stays "1e3"); a YAML mapping becomes its section's dataclass,
rejecting unknown keys (suggesting the nearest valid one), wrong types and conflicting keys (a
section's `CONFLICTS`: pairs of keys that must not both be given, the second would be unused).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from typing import Any

import yaml

from openseek_cpt.errors import UserError


def parse_value(text: str, tp: Any) -> Any:
    """`--set` text -> value, read as the declared type `tp` says (see apply_override)."""
    members = _members(tp)
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:  # a quoted YAML string ('no', "1e3"): the string inside, whatever the type
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return text
    if type(None) in members and stripped in ("null", "~", "Null", "NULL"):
        return None
    if str in members and not (stripped.startswith(("[", "{")) and ({list, dict} & set(members))):
        scalar = [m for m in members if m in (bool, int, float)]
        for m in scalar:  # str | int (soup.max_shard_size): a number where it reads as one
            value = _scalar(text, m)
            if value is not None:
                return value
        return text
    if members and all(m in (bool, int, float, type(None)) for m in members):
        for m in members:
            value = _scalar(text, m)
            if value is not None:
                return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _members(tp: Any) -> list[Any]:
    """The plain types a value of annotation `tp` may have (enums count as str; [] for Any)."""
    if tp is Any:
        return []
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    origin = typing.get_origin(tp)
    if origin is not None:
        return [origin]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str]
    return [tp]


def _scalar(text: str, tp: type) -> Any:
    """`text` as a bool/int/float, or None when it does not read as one."""
    s = text.strip()
    if tp is bool:
        return {"true": True, "false": False}.get(s.lower())
    if tp is int:
        return int(s) if re.fullmatch(r"[-+]?\d[\d_]*", s) else None
    if tp is float:  # an integer literal stays an int, as YAML reads it (same recipe hash as in a file)
        if re.fullmatch(r"[-+]?\d[\d_]*", s):
            return int(s)
        try:
            return float(s)
        except ValueError:
            return None
    return None


def build(cls: type, raw: Any, where: str) -> Any:
    """Turn a mapping into the dataclass `cls`, rejecting unknown keys, wrong types and conflicts."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise UserError(f"recipe: unknown key {dotted!r}{hint} (valid: {', '.join(sorted(known))})")
        kwargs[key] = coerce(hints[key], value, dotted)
    for a, b, why in getattr(cls, "CONFLICTS", ()):
        if raw.get(a) is not None and b in raw:
            raise UserError(f"recipe: {where} sets both {a} and {b}; {why}: remove one of them")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (ints become floats where floats are expected)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `Enum | str`: the string must still name a member
            return coerce(enums[0], value, where)
        errors = []
        for arg in sorted(args, key=lambda a: a is not str or not isinstance(value, bool)):
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, where)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise UserError(f"recipe: {where} must be a list, got {value!r}")
        return [coerce(args[0] if args else Any, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"recipe: {where} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [str(e.value) for e in tp]
        if value not in allowed:
            raise UserError(f"recipe: {where}={value!r} is not one of {', '.join(allowed)}")
        return value
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-5 (no dot) as a string; YAML 1.2 and the user mean a number.
        number = _scalar(value, float) if re.fullmatch(r"\s*[-+]?[\d.]+[eE][-+]?\d+\s*", value) else None
        if number is not None:
            return number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"recipe: {where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"recipe: {where} must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        quote = "; quote it in YAML (no/yes/on/off/1e3 are read as non-strings)" if value is not None else ""
        raise UserError(f"recipe: {where} must be a string, got {value!r}{quote}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, float)):
        raise UserError(f"recipe: {where} must be a float, got {value!r}")
    return value
