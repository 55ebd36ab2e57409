"""`verify` detects damage to any file of an artifact, and a directory without provenance is a usage error."""

from __future__ import annotations

from conftest import run_cli

from openseek_cpt.artifacts.provenance import verify


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
