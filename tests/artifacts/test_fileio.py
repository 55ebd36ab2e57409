"""Every sidecar the tool reads (provenance.json, manifest.json, markers, configs) goes through one
JSON reader, which survives hostile input: deep nesting, huge files, bytes that are not text."""

from __future__ import annotations

import pytest
from conftest import run_cli

from openseek_cpt.artifacts import fileio, prepared, safetensors_stream
from openseek_cpt.errors import UserError

HOSTILE = {
    "deep": "[" * 100_000,
    "deep-object": '{"a":' * 100_000,
    "cut": '{"stage": "data", "files": {"a": ',
    "binary": b"\xff\xfe\x00\x01",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_read_json_treats_hostile_json_as_no_sidecar(tmp_path, name):
    path = tmp_path / "provenance.json"
    raw = HOSTILE[name]
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    assert fileio.read_json(path) is None
    with pytest.raises(UserError, match=rf"{path}: not valid JSON"):
        fileio.load_json(path)


def test_a_sidecar_larger_than_any_of_ours_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MAX_JSON_BYTES", 16)
    path = tmp_path / "manifest.json"
    path.write_text('{"x": "' + "a" * 32 + '"}')
    with pytest.raises(
        UserError, match=r"manifest.json: not valid JSON \(41 bytes, more than the 16 a sidecar may have"
    ):
        fileio.load_json(path)


def test_a_damaged_manifest_is_named_not_taken_for_an_absent_one(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(UserError, match=r"manifest.json: not valid JSON \(nested too deeply\)"):
        prepared.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"manifest.json: not a JSON object \(list\)"):
        prepared.read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    assert prepared.read_manifest(tmp_path) == {}


def test_a_deeply_nested_safetensors_index_or_header_is_one_line(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000)
    with pytest.raises(UserError, match=r"is not a safetensors index"):
        safetensors_stream.open_model(tmp_path, "soup.checkpoints")
    (tmp_path / "model.safetensors.index.json").unlink()
    blob = b"[" * 50_000
    (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    with pytest.raises(UserError, match=r"header is not JSON"):
        safetensors_stream.open_model(tmp_path, "soup.checkpoints")


def test_verify_of_a_directory_whose_provenance_is_hostile_is_one_line_exit_2(tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "provenance.json").write_text("[" * 100_000)
    r = run_cli("verify", "artifact", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "openseek-cpt verify: error: verify: artifact has no readable provenance.json; "
        "it was not made by openseek-cpt"
    ]
