"""`verify` detects damage to any file of an artifact, and a directory without provenance is a usage error."""

from __future__ import annotations

import json

from conftest import run_cli

from openseek_cpt.artifacts.provenance import verify, verify_status, write_provenance


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_detects_a_flipped_byte_in_a_weight_file(tiny_workdir):
    model_dir = tiny_workdir / "models" / "tiny-openseek"
    assert verify(model_dir)[0]
    r = run_cli("verify", str(model_dir), cwd=tiny_workdir)
    assert r.returncode == 0 and "intact" in r.stdout and "stage: download" in r.stdout
    _flip_one_byte(model_dir / "model.safetensors")
    ok, lines = verify(model_dir)
    assert not ok and "modified: model.safetensors" in lines
    r = run_cli("verify", str(model_dir), cwd=tiny_workdir)
    assert r.returncode == 1 and "DAMAGED" in r.stdout


def test_verify_detects_a_flipped_byte_in_a_data_file(tiny_workdir):
    sources = tiny_workdir / "models" / "tiny" / "sources"
    arrow = next((sources / "code").glob("*.arrow"))
    assert verify(sources)[0]
    _flip_one_byte(arrow)
    ok, lines = verify(sources)
    assert not ok and f"modified: code/{arrow.name}" in lines


def test_verify_of_a_directory_without_provenance_is_a_usage_error(tmp_path):
    r = run_cli("verify", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "no readable provenance.json" in r.stderr


def _edit_provenance(directory, edit):
    path = directory / "provenance.json"
    prov = json.loads(path.read_text())
    edit(prov)
    path.write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")


def _seeded_dir(tmp_path):
    directory = tmp_path / "artifact"
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(b"\x00\x01" * 64)
    write_provenance(directory, stage="data", extra={"recipe": {"train": {"learning_rate": 1e-4}}})
    return directory


def test_verify_detects_an_edit_to_the_recipe_inside_provenance(tmp_path):
    directory = _seeded_dir(tmp_path)
    assert verify_status(directory)[0] == "intact"
    _edit_provenance(directory, lambda p: p["recipe"]["train"].update(learning_rate=1.0))
    status, lines = verify_status(directory)
    assert status == "DAMAGED"
    assert any(line.startswith("modified: provenance.json (field recipe ") for line in lines), lines
    r = run_cli("verify", str(directory), cwd=tmp_path)
    assert r.returncode == 1 and "DAMAGED" in r.stdout and "field recipe" in r.stdout


def test_verify_detects_a_zeroed_fingerprint_and_a_changed_stage(tmp_path):
    directory = _seeded_dir(tmp_path)
    _edit_provenance(directory, lambda p: p.update(fingerprint="0" * 64, stage="soup"))
    ok, lines = verify(directory)
    assert not ok
    assert "modified: provenance.json (field fingerprint, stage edited after it was written)" in lines
    assert "modified: provenance.json (fingerprint is not the hash of its files)" in lines


def test_verify_detects_an_edited_seal_and_an_added_field(tmp_path):
    directory = _seeded_dir(tmp_path)
    _edit_provenance(directory, lambda p: p.update(note="hand-written"))
    assert not verify(directory)[0]
    directory2 = _seeded_dir(tmp_path / "two")
    _edit_provenance(directory2, lambda p: p["seal"].update(stage="0" * 64))
    status, lines = verify_status(directory2)
    assert status == "DAMAGED" and any("field stage" in line for line in lines)


def test_provenance_without_a_seal_is_unsealed_not_intact(tmp_path):
    directory = _seeded_dir(tmp_path)
    _edit_provenance(directory, lambda p: p.pop("seal"))
    status, lines = verify_status(directory)
    assert status == "unsealed" and any(line.startswith("unsealed: provenance.json") for line in lines)
    r = run_cli("verify", str(directory), cwd=tmp_path)
    assert r.returncode == 0 and f"{directory}: unsealed" in r.stdout and "intact" not in r.stdout
    (directory / "weights.bin").write_bytes(b"changed")
    assert verify_status(directory)[0] == "DAMAGED"
