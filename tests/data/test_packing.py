"""The packing table: each strategy's declared properties hold for what its `pack` really does.

Parametrized over `packing.STRATEGIES`, so a new entry is tested by this file without an edit.
"""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE

from openseek_cpt.data import packing
from openseek_cpt.errors import UserError
from openseek_cpt.recipe.loader import load_recipe

MAX_LENGTH = 6
# Document lengths: one longer than MAX_LENGTH, several that fit; every token id is unique.
DOC_LENGTHS = [10, 3, 5, 2, 4, 1]


def _documents():
    from datasets import Dataset

    ids = [[100 * d + j for j in range(n)] for d, n in enumerate(DOC_LENGTHS)]
    starts = [[1] + [0] * (n - 1) for n in DOC_LENGTHS]
    return Dataset.from_dict({"input_ids": ids, "doc_start": starts})


def _pack(strategy: packing.Strategy) -> list[list[int]]:
    rows = strategy.pack(_documents(), MAX_LENGTH, {"load_from_cache_file": False})
    return [list(r) for r in rows.with_format(None)["input_ids"]]


@pytest.mark.parametrize("name", packing.NAMES)
def test_strategy_properties_match_what_pack_does(name):
    strategy = packing.get(name)
    assert strategy.name == name and strategy.doc
    rows = _pack(strategy)
    assert rows and all(0 < len(r) <= MAX_LENGTH for r in rows)
    tokens = [t for r in rows for t in r]
    assert len(tokens) == len(set(tokens)), "a token was duplicated"
    dropped = sum(DOC_LENGTHS) - len(tokens)
    assert (dropped > 0) == strategy.truncates_documents
    if strategy.truncates_documents:
        assert dropped == sum(max(n - MAX_LENGTH, 0) for n in DOC_LENGTHS)
    assert (len(rows) == len(DOC_LENGTHS)) == strategy.one_row_per_document
    rows_per_doc = [
        len({i for i, r in enumerate(rows) for t in r if t // 100 == d}) for d in range(len(DOC_LENGTHS))
    ]
    assert (max(rows_per_doc) > 1) == strategy.splits_documents


@pytest.mark.parametrize("name", packing.NAMES)
def test_recipe_accepts_every_strategy_of_the_table(name):
    assert load_recipe(TINY_RECIPE, [f"data.packing={name}"]).data.packing == name


def test_recipe_rejects_a_strategy_not_in_the_table_and_lists_the_table():
    with pytest.raises(UserError, match="data.packing='greedy' is not one of " + ", ".join(packing.NAMES)):
        load_recipe(TINY_RECIPE, ["data.packing=greedy"])
