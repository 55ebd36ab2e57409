"""Loading a recipe: the YAML file (or the defaults), `--set KEY=VALUE` overrides, then the checks.

Each override's value is parsed against the type of the key it sets (values.py), so a typo in any
stage's settings fails at load, for every stage, as one line (checks.py). The schema (the assembled
sections, `openseek_cpt.config.Recipe`) is an argument: this layer knows no stage.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from openseek_cpt.errors import UserError, first_line
from openseek_cpt.recipe.checks import validate
from openseek_cpt.recipe.values import build, parse_value

T = TypeVar("T")

# Top-level keys starting with this hold YAML anchors for the sections to merge (`<<: *common`)
# or alias; they are not part of the recipe (docker compose's `x-` convention).
ANCHOR_PREFIX = "x-"


def load(schema: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read a recipe YAML (or the defaults when path is None) as `schema`, apply KEY=VALUE
    overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _check_readable(p)
        raw = {k: v for k, v in read_yaml(p).items() if not str(k).startswith(ANCHOR_PREFIX)}
    for item in overrides:
        apply_override(raw, item, schema)
    recipe = build(schema, raw, "")
    validate(recipe)
    return recipe


def _check_readable(p: Path) -> None:
    """A recipe is a regular file (or a pipe, for `--recipe <(...)`): name what it is otherwise."""
    if not p.exists():
        raise UserError(f"recipe: file {str(p)!r} does not exist; pass --recipe PATH to a YAML file")
    if p.is_dir():
        raise UserError(
            f"recipe: {str(p)!r} is a directory, not a YAML file; pass --recipe PATH to a YAML file"
        )
    if not (p.is_file() or p.is_fifo()):
        raise UserError(
            f"recipe: {str(p)!r} is not a regular file (a device or socket); pass --recipe PATH to a YAML file"
        )


MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently).

    Only the keys written in the mapping itself count: a key it also takes from a merge (`<<: *common`)
    is YAML's documented override, not a repetition."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
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
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_line(path, text, exc)) from None
    finally:
        loader.dispose()
    if raw is None:
        raise UserError(
            f"recipe: {path} is empty (no sections); write the run's assets/data/train/soup sections "
            "(e.g. start from recipes/tiny/config.yaml)"
        )
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def yaml_error_line(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the line and column, what YAML says, and for a tab in the
    indentation (YAML's own message only says a character "cannot start any token") that cause."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"recipe: {path} is not valid YAML ({first_line(exc)}); fix the syntax"
    lines = text.splitlines()
    for number in range(mark.line, -1, -1):  # the error's line, or the nearest tab-indented one above
        line = lines[number] if number < len(lines) else ""
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            return (
                f"recipe: {path} line {number + 1}: a tab in the indentation (column {indent.index(chr(9)) + 1}); "
                "YAML indents with spaces only: replace the tab with spaces"
            )
        if number < mark.line and line.strip():
            break
    what = "; ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
    return (
        f"recipe: {path} line {mark.line + 1}, column {mark.column + 1}: not valid YAML "
        f"({' '.join((what or first_line(exc)).split())}); fix the syntax"
    )


def apply_override(raw: dict[str, Any], item: str, schema: type) -> None:
    """Set `a.b.c=value`, the value parsed against the key's declared type (list items by index).

    A string-typed key takes the text as is (no YAML 1.1 surprises: `no` stays "no", `1e3` stays
    "1e3"); numbers and booleans are parsed as such; lists, mappings and untyped keys as YAML.
    """
    if "=" not in item:
        raise UserError(f"--set: {item!r} is not KEY=VALUE; write e.g. --set data.max_length=2048")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    value = parse_value(text, declared_type(parts, schema))
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


def declared_type(parts: list[str], schema: type) -> Any:
    """The annotation of the dotted key `parts` in `schema` (Any when it is not a declared key)."""
    tp: Any = schema
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
