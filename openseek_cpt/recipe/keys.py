"""`openseek-cpt recipe --keys` and `--markdown`: every declared key with its type, default and doc.

The schema (the assembled sections, `openseek_cpt.config.Recipe`) is an argument: this layer knows
no stage."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Key:
    """One dotted recipe key as `recipe --keys` lists it."""

    key: str
    type: str
    value: Any
    doc: str


def keys(schema: type, recipe: Any = None) -> list[Key]:
    """Every key `schema` declares, with its type and doc; values are `recipe`'s (its sources
    expanded) or the defaults."""
    out: list[Key] = []
    _keys(schema, recipe, "", out)
    return out


def _keys(cls: type, obj: Any, prefix: str, out: list[Key]) -> None:
    """Append the keys of section `cls` (values from `obj`, or defaults and `N` for list items when None)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, where = hints[f.name], f"{prefix}{f.name}"
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        value = getattr(obj, f.name) if obj is not None else _default(f)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            _keys(tp, value if obj is not None else None, where + ".", out)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            shown = f"{len(value)} items" if value else []
            out.append(Key(where, f"list[{item.__name__}]", shown, doc))
            if obj is None:
                _keys(item, None, f"{where}.N.", out)
            for i, one in enumerate(value):
                _keys(item, one, f"{where}.{i}.", out)
            continue
        item_types = f.metadata.get("item_types")
        shown = f"{len(value)} keys" if item_types and value else value
        out.append(Key(where, _type_name(tp), shown, doc))
        if item_types and value:
            types_, docs = item_types(), f.metadata["item_docs"]()
            for k in sorted(value):
                out.append(Key(f"{where}.{k}", _type_name(types_.get(k, Any)), value[k], docs.get(k, "")))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{f.name} has no default")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return tp.__name__


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def keys_text(schema: type, recipe: Any = None) -> str:
    """`recipe --keys`: one line per key: KEY  TYPE  DEFAULT (or the recipe's VALUE)  DOC."""
    rows = [(k.key, k.type, _show(k.value), k.doc) for k in keys(schema, recipe)]
    head = ("KEY", "TYPE", "VALUE" if recipe is not None else "DEFAULT", "DOC")
    widths = [min(max(len(r[i]) for r in [head, *rows]), 40) for i in range(3)]  # longer ones overflow
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in [head, *rows]
    )


def keys_markdown(schema: type) -> str:
    """docs/recipe.md's key table (generated: tests/test_docs.py checks docs/recipe.md holds exactly this)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in keys(schema):
        cells = [f"`{k.key}`", f"`{k.type}`", f"`{_show(k.value)}`", k.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
