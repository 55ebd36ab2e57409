"""How a recipe key is declared, and what every stage takes from the whole recipe beside its section.

Each stage declares its own section beside its code (`data/config.py`, `train/config.py`,
`soup/config.py`, the assets section in `download.py`) with `setting(default, doc, ...)`: the doc,
choices and range live in the declaration, so `openseek-cpt recipe --keys` (keys.py) and the key
table are generated from the place the values are checked (checks.py). `openseek_cpt/config.py`
assembles the sections; this layer never imports a stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from openseek_cpt.artifacts.fileio import canonical_hash


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: Collection[str] = (),
    above: float | None = None,
    at_least: float | None = None,
    required: bool = False,
    explain: Callable[[str, str], Any] | None = None,
    item_types: Callable[[], dict[str, Any]] | None = None,
    item_docs: Callable[[], dict[str, str]] | None = None,
) -> Any:
    """A recipe field: its default, its doc (shown by `recipe --keys`), choices, range, non-empty.

    `choices` may be the owner's live table (a dict: its keys). `explain(value, key)` raises the
    one-line reason a value outside `choices` is refused. A mapping whose keys belong to another
    schema declares `item_types()` and `item_docs()` (key -> annotation, key -> doc): `--set`
    parses its items by type and `recipe --keys` lists them.
    A class, list or dict default becomes a default_factory (a fresh one per recipe).
    """
    meta = {
        "doc": doc,
        "choices": choices,
        "above": above,
        "at_least": at_least,
        "required": required,
        "explain": explain,
        "item_types": item_types,
        "item_docs": item_docs,
    }
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def recipe_hash(recipe: Any) -> str:
    """sha256 of the canonical JSON of a recipe (a dataclass): identifies the run's settings."""
    return canonical_hash(dataclasses.asdict(recipe))


@dataclass(frozen=True)
class RunRecord:
    """What a stage takes from the whole recipe beside its own section: the seed, and the recipe as
    its artifacts' provenance records it (`hash()`, `to_dict()`), written down, never read."""

    seed: int
    recipe_hash: str
    settings: dict[str, Any]

    def hash(self) -> str:
        return self.recipe_hash

    def to_dict(self) -> dict[str, Any]:
        return self.settings
