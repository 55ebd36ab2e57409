"""Loading a recipe: the YAML file (or the defaults), `--set KEY=VALUE` overrides, then the checks.

Each override's value is parsed against the type of the key it sets (values.py), so a typo in any
stage's settings fails at load, for every stage, as one line (checks.py).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from openseek_cpt.errors import UserError, first_line
from openseek_cpt.recipe.checks import validate
from openseek_cpt.recipe.schema import Recipe
from openseek_cpt.recipe.values import build, parse_value


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when path is None), apply KEY=VALUE overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe: file {str(path)!r} does not exist; pass --recipe PATH to a YAML file")
        raw = read_yaml(p)
    for item in overrides:
        apply_override(raw, item)
    recipe = build(Recipe, raw, "")
    validate(recipe)
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"recipe: {self.name}: key {key!r} is given twice (lines {seen[key]} and {line}); "
                    "keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file as a mapping; one-line errors for bad bytes, bad YAML and repeated keys."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"recipe: {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise UserError(f"recipe: {path} holds NUL bytes: it is not a YAML text file")
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise UserError(f"recipe: {path} is not valid YAML ({first_line(exc)}); fix the syntax") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value`, the value parsed against the key's declared type (list items by index).

    A string-typed key takes the text as is (no YAML 1.1 surprises: `no` stays "no", `1e3` stays
    "1e3"); numbers and booleans are parsed as such; lists, mappings and untyped keys as YAML.
    """
    if "=" not in item:
        raise UserError(f"--set: {item!r} is not KEY=VALUE; write e.g. --set data.max_length=2048")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    value = parse_value(text, declared_type(parts))
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, parts[: i + 1])]
        elif isinstance(node, dict):
            if node.get(part) is None:  # absent, or an empty YAML section (`soup:`)
                node[part] = {}
            node = node[part]
        else:
            break
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set: {'.'.join(parts[:-1])} is not a section, cannot set {key!r}")


def _index(part: str, node: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set: {'.'.join(parts)} needs a list index in 0..{len(node) - 1}, got {part!r}")
    return int(part)


def declared_type(parts: list[str]) -> Any:
    """The annotation of the dotted key `parts` (Any when it is not a declared key)."""
    tp: Any = Recipe
    item_types = None  # the last field's, when its items are typed by another schema (train.args)
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            fields = {f.name: f for f in dataclasses.fields(tp)}
            if part not in fields:
                return Any
            item_types = fields[part].metadata.get("item_types")
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif item_types is not None and i == len(parts) - 1:
            return item_types().get(part, Any)
        else:
            return Any
    return tp
