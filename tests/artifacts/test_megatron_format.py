"""Megatron .bin/.idx (artifacts/megatron_format): our writer and reader agree, writes are atomic, bad files are one-line errors."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest

from openseek_cpt.artifacts import megatron_format
from openseek_cpt.errors import UserError
from openseek_cpt.testing import megatron_files
from tests.export.test_megatron_export import segments_of


def test_read_is_deterministic_and_content_addressed(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=int(n)) for n in rng.integers(1, 50, size=40)]
    megatron_files.write_documents(tmp_path / "a" / "p", docs, vocab_size=70000)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = megatron_files.read_documents(tmp_path / "a" / "p")
    again = megatron_files.read_documents(tmp_path / "a" / "p")
    copy = megatron_files.read_documents(tmp_path / "b" / "p")
    assert first._fingerprint == again._fingerprint == copy._fingerprint
    assert [list(x) for x in first["input_ids"][:]] == [d.tolist() for d in docs]
    megatron_files.write_documents(tmp_path / "a" / "p", docs[:-1], vocab_size=70000)
    changed = megatron_files.read_documents(tmp_path / "a" / "p")
    assert changed._fingerprint != first._fingerprint and len(changed) == len(docs) - 1


def test_read_rows_takes_only_the_asked_rows_in_order_and_follows_pointers(tmp_path):
    docs = [np.arange(i, i + 7) for i in range(30)]
    megatron_files.write_documents(tmp_path / "p", docs, vocab_size=100)
    index = megatron_format.read_index(tmp_path / "p")
    table = megatron_format.read_rows(index, f"{tmp_path / 'p'}.bin", np.array([29, 3, 3, 0]))
    assert table.column("input_ids").to_pylist() == [docs[i].tolist() for i in (29, 3, 3, 0)]
    assert table.schema.field("input_ids").type.value_type == "int32"
    ds = megatron_files.read_documents(tmp_path / "p")
    assert [list(x) for x in ds["input_ids"][:]] == [d.tolist() for d in docs]
    # A valid file need not store sequences in order: reverse them in .bin, point the index there.
    index = megatron_format.read_index(tmp_path / "p")
    rev = tmp_path / "rev"
    Path(f"{rev}.bin").write_bytes(b"".join(d.astype(np.uint16).tobytes() for d in reversed(docs)))
    idx = bytearray(Path(f"{tmp_path / 'p'}.idx").read_bytes())
    pointers = index.sequence_pointers[::-1].copy()
    start = megatron_format.HEADER_SIZE + 4 * len(docs)
    idx[start : start + 8 * len(docs)] = pointers.tobytes()
    Path(f"{rev}.idx").write_bytes(bytes(idx))
    ds = megatron_files.read_documents(rev)
    assert [list(x) for x in ds["input_ids"][:]] == [d.tolist() for d in docs]


def test_export_streams_batches_in_the_dataset_order(tmp_path, monkeypatch):
    monkeypatch.setattr(megatron_format, "_EXPORT_BATCH_ROWS", 2)
    rng = np.random.default_rng(1)
    rows, segs = [], []
    for _ in range(9):
        lengths = [int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 4)))]
        rows.append([int(t) for t in rng.integers(0, 50, size=sum(lengths))])
        segs.append(lengths)
    ds = datasets.Dataset.from_dict({"input_ids": rows, "seq_lengths": segs, "source": ["x"] * 9})
    ds = ds.select([8, 0, 3, 1, 2, 4, 5, 7, 6])  # an indices mapping, as after shuffle/select
    megatron_format.export_dataset(ds, tmp_path / "p", vocab_size=50)
    out = megatron_files.read_documents(tmp_path / "p")
    assert out["input_ids"][:] == segments_of(ds["input_ids"][:], ds["seq_lengths"][:])


def test_export_is_atomic_and_rejects_inconsistent_rows(tmp_path):
    megatron_files.write_documents(tmp_path / "p", [np.array([1, 2, 3])], vocab_size=10)
    before = Path(f"{tmp_path / 'p'}.bin").read_bytes()
    bad = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]], "seq_lengths": [[2], [2]]})
    with pytest.raises(UserError, match=r"row 1: seq_lengths \[2\] do not split its 3 tokens"):
        megatron_format.export_dataset(bad, tmp_path / "p", vocab_size=10)
    too_big = datasets.Dataset.from_dict({"input_ids": [[1, 99]], "seq_lengths": [[2]]})
    with pytest.raises(UserError, match=r"token id 99 lies outside the vocabulary \[0, 10\)"):
        megatron_format.export_dataset(too_big, tmp_path / "p", vocab_size=10)
    assert Path(f"{tmp_path / 'p'}.bin").read_bytes() == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.bin", "p.idx"]  # no temp files left


def test_export_checks_every_token_across_write_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(megatron_format, "_WRITE_BLOCK_TOKENS", 4)
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9, -1]]  # the bad id sits in the third block
    ds = datasets.Dataset.from_dict({"input_ids": rows, "seq_lengths": [[7], [3]]})
    with pytest.raises(UserError, match=r"token id -1 lies outside"):
        megatron_format.export_dataset(ds, tmp_path / "p", vocab_size=10)
    ok = datasets.Dataset.from_dict({"input_ids": rows[:1] + [[8, 9, 0]], "seq_lengths": [[7], [3]]})
    megatron_format.export_dataset(ok, tmp_path / "p", vocab_size=10)
    assert megatron_files.read_documents(tmp_path / "p")["input_ids"][:] == [
        rows[0],
        [8, 9, 0],
    ]


# --- damaged files -----------------------------------------------------------------------------


def _good(tmp_path: Path) -> Path:
    prefix = tmp_path / "corpus_text_document"
    megatron_files.write_documents(prefix, [np.array([1, 2, 3]), np.array([4, 5])], vocab_size=100)
    return prefix


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


CORRUPTIONS = {
    "truncated .bin": (
        lambda p: _truncate(Path(f"{p}.bin"), 8),
        r"sequence 1 ends at byte 10 but .* has 8 bytes",
    ),
    "wrong magic": (lambda p: _patch(Path(f"{p}.idx"), 0, b"TNTIDX\x00\x00\x00"), r"not the Megatron magic"),
    "wrong version": (lambda p: _patch(Path(f"{p}.idx"), 9, struct.pack("<Q", 2)), r"format version 2"),
    "float dtype code": (lambda p: _patch(Path(f"{p}.idx"), 17, b"\x06"), r"dtype code 6"),
    "unknown dtype code": (lambda p: _patch(Path(f"{p}.idx"), 17, b"\x63"), r"dtype code 99"),
    "pointer past the end": (
        lambda p: _patch(Path(f"{p}.idx"), megatron_format.HEADER_SIZE + 8 + 8, struct.pack("<q", 1 << 20)),
        r"sequence 1 ends at byte 1048580",
    ),
    ".idx shorter than its header": (
        lambda p: _truncate(Path(f"{p}.idx"), 20),
        r"less than the 34-byte header",
    ),
    ".idx shorter than its arrays": (
        lambda p: _truncate(Path(f"{p}.idx"), 50),
        r"header announces 2 sequences",
    ),
    "bad document indices": (
        lambda p: _patch(Path(f"{p}.idx"), megatron_format.HEADER_SIZE + 24, struct.pack("<q", 5)),
        r"document indices",
    ),
    "missing .bin": (lambda p: Path(f"{p}.bin").unlink(), r"\.bin does not exist"),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_damaged_megatron_files_are_one_line_errors(tmp_path, damage):
    prefix = _good(tmp_path)
    corrupt, message = CORRUPTIONS[damage]
    corrupt(prefix)
    with pytest.raises(UserError, match=message) as info:
        megatron_files.read_documents(prefix)
    assert "\n" not in str(info.value) and str(prefix) in str(info.value)
