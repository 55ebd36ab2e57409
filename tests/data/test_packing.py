"""The packing table: each strategy's declared properties hold for what its `pack` really does.

Parametrized over `packing.STRATEGIES`, so a new entry is tested by this file without an edit.
"""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE

from openseek_cpt.config import load_recipe
from openseek_cpt.data import packing
from openseek_cpt.errors import UserError

MAX_LENGTH = 6
# Document lengths: one longer than MAX_LENGTH, several that fit; every token id is unique.
DOC_LENGTHS = [10, 3, 5, 2, 4, 1]


def _documents():
    from datasets import Dataset

    ids = [[100 * d + j for j in range(n)] for d, n in enumerate(DOC_LENGTHS)]
    starts = [[1] + [0] * (n - 1) for n in DOC_LENGTHS]
    return Dataset.from_dict({"input_ids": ids, "doc_start": starts})


def _pack(strategy: packing.Strategy) -> list[list[int]]:
    rows = strategy.reference(_documents(), MAX_LENGTH, {"load_from_cache_file": False})
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


@pytest.mark.parametrize("name", packing.NAMES)
def test_packing_by_index_gives_the_rows_trl_gives(name):
    """The stage packs by index over document lengths (packing.plan); TRL's pack_dataset on the
    same documents, in its default map batches, is the reference: the same rows, the same segments."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(7)
    max_length = 16
    # ties, documents of exactly max_length, longer ones, and more than one packing batch
    lengths = np.concatenate([rng.integers(1, 3 * max_length, 2300), [max_length] * 5, [1] * 5])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = [list(range(s, s + n)) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    doc_start = [[1] + [0] * (n - 1) for n in lengths.tolist()]
    docs = Dataset.from_dict({"input_ids": ids, "doc_start": doc_start})
    reference = (
        packing.get(name).reference(docs, max_length, {"load_from_cache_file": False}).with_format(None)
    )
    plan = packing.plan(name, lengths, max_length)
    flat = np.arange(int(lengths.sum()))
    rows = [
        [
            flat[starts[d] + s : starts[d] + s + n].tolist()
            for d, s, n in zip(
                plan.seg_doc[a:b].tolist(),
                plan.seg_start[a:b].tolist(),
                plan.seg_len[a:b].tolist(),
                strict=True,
            )
        ]
        for a, b in zip(plan.row_offsets[:-1].tolist(), plan.row_offsets[1:].tolist(), strict=True)
    ]
    assert [sum(r, []) for r in rows] == reference["input_ids"]
    if "seq_lengths" in reference.column_names:
        assert [[len(s) for s in r] for r in rows] == reference["seq_lengths"]
    assert plan.row_documents().tolist() == [sum(x) for x in reference["doc_start"]]
    assert plan.row_tokens().tolist() == [len(r) for r in reference["input_ids"]]


@pytest.mark.parametrize("name", packing.NAMES)
def test_a_token_store_supplies_the_eos_its_documents_leave_out(name, tmp_path):
    """The encoder's array paths hand the token store each document without its final eos (no copy of
    every id to insert it): the rows gathered from the store are those of the documents with their eos
    in place, whatever a segment cuts, documents holding their eos themselves mixed in."""
    import numpy as np

    from openseek_cpt.data.token_store import TokenStore

    eos, max_length = 99_999, 16
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 3 * max_length, 500)  # eos included
    docs = [list(rng.integers(0, 1000, int(n) - 1)) + [eos] for n in lengths]
    stored = lengths - (rng.random(len(lengths)) < 0.8)  # most leave their eos out
    store = TokenStore(tmp_path / "tokens.bin", eos)
    for part in np.array_split(np.arange(len(docs)), 3):  # appended batch by batch
        held = [d[: int(stored[i])] for i, d in zip(part, (docs[i] for i in part), strict=True)]
        store.append(np.array(sum(held, []), np.int32), lengths[part], stored[part])
    assert store.close().tolist() == lengths.tolist()
    plan = packing.plan(name, lengths, max_length)
    got = store.gather(plan.seg_doc, plan.seg_start, plan.seg_len).tolist()
    want = sum(
        (
            docs[d][s : s + n]
            for d, s, n in zip(
                plan.seg_doc.tolist(), plan.seg_start.tolist(), plan.seg_len.tolist(), strict=True
            )
        ),
        [],
    )
    assert got == want and got.count(eos) == sum(
        s + n == lengths[d] for d, s, n in zip(plan.seg_doc, plan.seg_start, plan.seg_len, strict=True)
    )
    with pytest.raises(ValueError):
        TokenStore(tmp_path / "bad.bin", eos).append(np.zeros(3, np.int32), np.array([5]), np.array([3]))
