"""Megatron-LM's own code reads our exports exactly, and we read what its builder writes exactly.

Needs `pip install --no-deps megatron-core` (only `megatron.core.datasets.indexed_dataset` is used).
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pytest
import torch

from openseek_cpt.artifacts import megatron_format
from openseek_cpt.export.megatron import export_megatron
from openseek_cpt.testing import megatron_files
from tests.export.test_megatron_export import ROWS, SEGMENTS, make_prepared, segments_of

pytestmark = pytest.mark.megatron

with warnings.catch_warnings():  # megatron-core warns that Transformer Engine/Apex are absent
    warnings.simplefilter("ignore")
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _random_documents(seed: int, high: int, count: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(n)) for n in rng.integers(1, 40, size=count)]


@pytest.mark.parametrize("vocab_size", [64, 151851], ids=["uint16", "int32"])
def test_megatron_indexed_dataset_reads_our_export_exactly(tmp_path, vocab_size):
    prepared = make_prepared(tmp_path, manifest={"vocab_size": vocab_size})
    prefix = export_megatron(prepared, tmp_path / "mix_text_document")
    theirs = indexed_dataset.IndexedDataset(str(prefix))
    expected = segments_of(ROWS, SEGMENTS)
    assert theirs.index.dtype is (np.uint16 if vocab_size < 65500 else np.int32)
    assert len(theirs) == len(expected)
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    assert theirs.document_indices.tolist() == list(range(len(expected) + 1))
    assert [s.tolist() for s in theirs[0 : len(expected)]] == expected  # its contiguous-slice path


def test_our_reader_reads_megatron_builder_output_exactly(tmp_path):
    docs = _random_documents(0, 151851)
    prefix = str(tmp_path / "built_text_document")
    builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    ours = megatron_files.read_documents(prefix)
    assert [list(x) for x in ours["input_ids"][:]] == [d.tolist() for d in docs]
    assert ours.features["input_ids"].feature.dtype == "int32"


def test_our_reader_handles_multi_sequence_documents_and_merged_indexes(tmp_path):
    """Megatron documents may hold several sequences (sentence splitting) and files may be merged."""
    parts = []
    for k in range(2):
        prefix = str(tmp_path / f"part{k}")
        builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
        docs = _random_documents(k + 1, 65000, count=12)
        for a, b in zip(docs[::2], docs[1::2], strict=True):
            builder.add_document(torch.from_numpy(np.concatenate([a, b])), [len(a), len(b)])
        builder.finalize(f"{prefix}.idx")
        parts.append((prefix, docs))
    merged = str(tmp_path / "merged")
    builder = indexed_dataset.IndexedDatasetBuilder(f"{merged}.bin", dtype=np.uint16)
    for prefix, _ in parts:
        builder.add_index(prefix)
    builder.finalize(f"{merged}.idx")
    ours = megatron_files.read_documents(merged)
    expected = [d.tolist() for _, docs in parts for d in docs]
    assert [list(x) for x in ours["input_ids"][:]] == expected  # one row per Megatron sequence
    assert megatron_format.read_index(merged).document_indices.tolist() == list(range(0, 25, 2))


def test_our_writer_output_equals_megatron_builder_output_byte_for_byte(tmp_path):
    docs = _random_documents(3, 60000)
    megatron_files.write_documents(tmp_path / "ours", docs, vocab_size=60000)
    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_read_documents_feeds_datasets_like_any_source(tmp_path):
    """read_documents (tests, small files) gives an in-memory Dataset that datasets can shuffle and map."""
    docs = _random_documents(4, 1000)
    megatron_files.write_documents(tmp_path / "p", docs, vocab_size=1000)
    ds = megatron_files.read_documents(tmp_path / "p")
    lengths = ds.shuffle(seed=233).map(lambda b: {"n": [len(x) for x in b["input_ids"]]}, batched=True)
    assert sorted(lengths["n"]) == sorted(len(d) for d in docs)
    assert isinstance(ds, datasets.Dataset)
