"""safetensors_stream: headers parsed once and checked, hashes from the reads in any order."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openseek_cpt.artifacts.safetensors_stream import INDEX_FILE, SINGLE_FILE, Reader, open_model
from openseek_cpt.errors import UserError


def _model(path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(40, 30, generator=gen).to(torch.bfloat16),
        "b.bias": torch.randn(17, generator=gen),
        "c.count": torch.arange(5, dtype=torch.int64),
        "d.weight": torch.randn(3, 64, generator=gen).to(torch.float16),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    return tensors


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_return_the_stored_bytes_and_hash_the_file_in_any_read_order(tmp_path):
    tensors = _model(tmp_path / "m")
    model = open_model(tmp_path / "m", "field")
    assert {k: (t.dtype, t.shape) for k, t in model.tensors.items()} == {
        "a.weight": ("BF16", (40, 30)), "b.bias": ("F32", (17,)), "c.count": ("I64", (5,)), "d.weight": ("F16", (3, 64)),
    }  # fmt: skip
    # Reverse key order and split reads: the hash cursor must jump ahead and fill the gaps.
    reader = Reader(model)
    plan = []
    for key in sorted(model.tensors, reverse=True):
        info = model.tensors[key]
        half = (info.end - info.start) // 2
        plan += [(key, 0, half), (key, half, info.end - info.start - half)]
    tickets = [(key, reader.ticket(key, off, n)) for key, off, n in plan]
    got: dict[str, bytes] = {}
    buf, scratch = bytearray(1 << 16), bytearray(7)  # a tiny scratch: gaps hashed in many blocks
    for key, t in tickets:
        got[key] = got.get(key, b"") + bytes(reader.read(t, buf, scratch))
    for key, tensor in tensors.items():
        assert got[key] == tensor.contiguous().view(torch.uint8).numpy().tobytes(), key
    assert reader.finish(scratch) == {SINGLE_FILE: _sha(tmp_path / "m" / SINGLE_FILE)}
    assert reader.rehashed_bytes > 0  # the reversed order forced re-reads for the hash


def test_in_order_reads_hash_without_reading_anything_twice(tmp_path):
    _model(tmp_path / "m")
    model = open_model(tmp_path / "m", "field")
    reader = Reader(model)
    buf = bytearray(1 << 16)
    for key in sorted(model.tensors, key=lambda k: model.tensors[k].start):
        info = model.tensors[key]
        reader.read(reader.ticket(key, 0, info.end - info.start), buf, bytearray(16))
    assert reader.finish(bytearray(16)) == {SINGLE_FILE: _sha(tmp_path / "m" / SINGLE_FILE)}
    assert reader.rehashed_bytes == 0


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda raw: raw[:4], "shorter than 8 bytes"),
        (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "does not fit"),
        (lambda raw: raw[:8] + b"x" * (len(raw) - 8), "not JSON"),
        (lambda raw: raw[:-10], "outside the file"),
    ],
)
def test_a_damaged_file_is_a_one_line_user_error(tmp_path, damage, words):
    _model(tmp_path / "m")
    path = tmp_path / "m" / SINGLE_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=words) as info:
        open_model(tmp_path / "m", "soup.checkpoints")
    assert "\n" not in str(info.value) and str(info.value).startswith("soup.checkpoints: ")


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    _model(tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": SINGLE_FILE}}))
    with pytest.raises(UserError, match="does not match its shard files"):
        open_model(tmp_path / "m", "f")


def _hand_made(path: Path, entries: dict[str, tuple[int, int]], data_bytes: int) -> Path:
    """A safetensors file written by hand: 8-byte length, JSON header (F32 [n] tensors), bytes."""
    header = {
        k: {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]} for k, (a, b) in entries.items()
    }
    blob = json.dumps(header).encode()
    path.mkdir(parents=True, exist_ok=True)
    (path / SINGLE_FILE).write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(range(256))[:data_bytes])
    return path


def test_a_hand_made_file_that_tiles_its_data_is_read(tmp_path):
    model = open_model(_hand_made(tmp_path / "m", {"b": (8, 16), "a": (0, 8)}, 16), "f")
    assert sorted(model.tensors) == ["a", "b"]


@pytest.mark.parametrize(
    ("entries", "data_bytes", "words"),
    [
        ({"a": (0, 8), "b": (0, 8)}, 8, r"b and a share the same bytes 0\.\.8 \(aliased keys\)"),
        ({"a": (0, 8), "b": (4, 12)}, 12, r"b \(bytes 4\.\.12\) overlaps a \(bytes 0\.\.8\)"),
        ({"a": (0, 4), "b": (8, 12)}, 12, r"b starts at byte 8, leaving bytes 4\.\.8 of no key"),
        ({"a": (0, 8)}, 12, r"bytes 8\.\.12 of the data section belong to no key"),
        ({"a": (0, 8), "b": (8, 16)}, 12, r"b spans bytes 8\.\.16, outside the file"),
    ],
    ids=["aliased", "overlapping", "gap", "trailing-bytes", "out-of-bounds"],
)
def test_offsets_are_checked_as_strictly_as_the_safetensors_library(tmp_path, entries, data_bytes, words):
    path = _hand_made(tmp_path / "m", entries, data_bytes)
    with pytest.raises(Exception):  # noqa: B017 - the library refuses it too, with its own error
        load_file(path / SINGLE_FILE)
    with pytest.raises(UserError, match=words) as info:
        open_model(path, "soup.checkpoints")
    assert "\n" not in str(info.value) and f"{path / SINGLE_FILE}" in str(info.value)


def test_a_key_given_twice_in_a_header_is_refused(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    blob = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (path / SINGLE_FILE).write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    with pytest.raises(UserError, match="key 'a' appears twice in the header"):
        open_model(path, "f")
