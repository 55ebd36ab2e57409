"""The packing strategies of the data stage: one table, one entry per strategy, with its properties.

The data stage asks this table (never a strategy's name) what a strategy does: whether it drops
the tokens of a document past `max_length`, whether it makes one row per document, whether a
document can continue in another row. Recipe validation takes its choices from the same table.
Adding a strategy = one `Strategy` entry here; tests/data/test_packing.py then checks its declared
properties against what its `pack` function really does to a dataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Strategy:
    """A way of turning tokenized documents (`input_ids`, `doc_start`) into rows of <= max_length tokens."""

    name: str
    doc: str
    # Tokens of a document past max_length are dropped (counted as tokens_dropped).
    truncates_documents: bool
    # Each row is exactly one document (no packing): rows needed = documents needed.
    one_row_per_document: bool
    # A document can continue in another row (its tail, or, for wrapped, whatever crosses a row end).
    splits_documents: bool
    # pack(documents Dataset, max_length, map_kwargs) -> Dataset of rows (columns carried through).
    pack: Callable[[Any, int, dict[str, Any]], Any]


def _trl(strategy: str) -> Callable[[Any, int, dict[str, Any]], Any]:
    def pack(docs: Any, max_length: int, map_kwargs: dict[str, Any]) -> Any:
        from trl import pack_dataset

        return pack_dataset(docs, max_length, strategy=strategy, map_kwargs=map_kwargs)

    return pack


def _truncate(docs: Any, max_length: int, map_kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():  # TRL moved truncate_dataset to experimental; it does the job as is
        warnings.simplefilter("ignore")
        from trl.experimental.utils import truncate_dataset

    return truncate_dataset(docs, max_length, map_kwargs=map_kwargs)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "bfd_split",
            "best-fit-decreasing bins; documents longer than max_length are split, no token lost",
            truncates_documents=False,
            one_row_per_document=False,
            splits_documents=True,
            pack=_trl("bfd_split"),
        ),
        Strategy(
            "bfd",
            "best-fit-decreasing bins; documents longer than max_length are truncated",
            truncates_documents=True,
            one_row_per_document=False,
            splits_documents=False,
            pack=_trl("bfd"),
        ),
        Strategy(
            "wrapped",
            "concatenate all documents and cut every max_length tokens (rows cross documents)",
            truncates_documents=False,
            one_row_per_document=False,
            splits_documents=True,
            pack=_trl("wrapped"),
        ),
        Strategy(
            "truncate",
            "no packing: one row per document, truncated to max_length",
            truncates_documents=True,
            one_row_per_document=True,
            splits_documents=False,
            pack=_truncate,
        ),
    )
}
NAMES = tuple(STRATEGIES)


def get(name: str) -> Strategy:
    """The strategy called `name` (recipe validation has already rejected unknown names)."""
    return STRATEGIES[name]
