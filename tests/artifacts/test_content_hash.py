"""Content hashes: the streaming hasher (the soup's) and the parallel one (the marker's) agree across
block boundaries, and one flipped bit changes the hash."""

from __future__ import annotations

import mmap
import os

import pytest

from openseek_cpt.artifacts import content_hash


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 14000])
def test_streamed_pieces_of_any_size_give_the_parallel_hash(tmp_path, monkeypatch, size):
    monkeypatch.setattr(content_hash, "BLOCK", mmap.ALLOCATIONGRANULARITY)  # several blocks, small file
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    want = content_hash.hash_files(tmp_path, ["f"], workers=3)["f"]
    for piece in (1, 333, 4096, 5000):
        h = content_hash.BlockHasher()
        for i in range(0, len(data), piece):
            h.update(memoryview(data)[i : i + piece])
        assert h.hexdigest() == want, (size, piece)


def test_one_flipped_bit_changes_the_hash(tmp_path):
    data = bytearray(os.urandom(3 << 20))
    (tmp_path / "a").write_bytes(data)
    data[len(data) // 2] ^= 1
    (tmp_path / "b").write_bytes(data)
    hashes = content_hash.hash_files(tmp_path, ["a", "b"])
    assert hashes["a"] != hashes["b"] and len(hashes["a"]) == 32
