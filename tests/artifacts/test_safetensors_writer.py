"""safetensors_writer: shards byte for byte as safetensors writes them, hashed as written, in key order only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from openseek_cpt.artifacts import safetensors_writer
from openseek_cpt.artifacts.safetensors_stream import INDEX_FILE, open_model
from openseek_cpt.artifacts.safetensors_writer import ShardWriter
from tests.artifacts.test_safetensors_stream import _model, _sha


def test_shard_writer_writes_what_safetensors_reads_back_with_an_index_and_hashes(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_writer, "SYNC_EVERY", 500)  # background fdatasync mid-shard too
    tensors = _model(tmp_path / "m")
    entries = [(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}[t.dtype],
                tuple(t.shape)) for k, t in sorted(tensors.items())]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, entries, max_shard_size=1000)
    for key, _, _ in entries:
        data = tensors[key].contiguous().view(torch.uint8).numpy().tobytes()
        for i in range(0, len(data), 333):  # in pieces, as the merge writes chunks
            writer.write_bytes(key, memoryview(data[i : i + 333]))
    hashes = writer.finish()
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(hashes) == sorted([*shards, INDEX_FILE])
    assert hashes == {name: _sha(out / name) for name in hashes}
    back = {}
    for name in shards:
        back.update(load_file(out / name))
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert open_model(out, "f").tensors.keys() == tensors.keys()


def test_a_write_out_of_order_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, [("a", "F32", (2,)), ("b", "F32", (2,))], max_shard_size=100)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write_bytes("b", memoryview(bytes(8)))
