"""`openseek-cpt tiny`: the whole pipeline on a CPU, reproducible bit for bit, with a report."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from openseek_cpt.artifacts.provenance import read_provenance, sha256_file, verify


@pytest.fixture(scope="module")
def two_tiny_runs(tmp_path_factory):
    """The tiny pipeline run twice from scratch, in two empty directories."""
    runs = []
    for name in ("first", "second"):
        work = tmp_path_factory.mktemp(f"tiny-{name}")
        r = run_cli("tiny", "--workdir", str(work), cwd=work, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs.append((work, r.stdout))
    return runs


def test_tiny_prints_eval_losses_and_where_every_artifact_is(two_tiny_runs):
    work, out = two_tiny_runs[0]
    for word in ("base", "checkpoint-", "soup", "dataset", "report"):
        assert word in out
    assert f"[tiny] report       {work}/runs/tiny/report.md" in out
    merge_info = json.loads((work / "models/tiny-openseek-soup/merge_info.json").read_text())
    names = [row["name"] for row in merge_info["evaluation"]]
    assert names[0] == "base" and names[-1] == "soup" and len(names) >= 4


def test_tiny_report_has_curves_mix_and_soup_table(two_tiny_runs):
    work, _ = two_tiny_runs[0]
    report = (work / "runs/tiny/report.md").read_text()
    assert "| docs | 0.7 |" in report and "| code | 0.3 |" in report
    assert "| soup |" in report and "| base |" in report
    for png in ("loss_curves.png", "throughput.png"):
        data = (work / "runs/tiny" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_tiny_twice_gives_identical_dataset_and_soup(two_tiny_runs):
    (a, _), (b, _) = two_tiny_runs
    fp = [read_provenance(w / "datasets/tiny-mix")["fingerprint"] for w in (a, b)]
    assert fp[0] == fp[1]
    soups = [sorted((w / "models/tiny-openseek-soup").glob("*.safetensors")) for w in (a, b)]
    assert soups[0] and [p.name for p in soups[0]] == [p.name for p in soups[1]]
    assert [sha256_file(p) for p in soups[0]] == [sha256_file(p) for p in soups[1]]


def test_every_tiny_artifact_has_provenance_and_verifies(two_tiny_runs):
    work, _ = two_tiny_runs[0]
    for rel in ("models/tiny-openseek", "datasets/tiny-mix", "models/tiny-openseek-soup"):
        ok, lines = verify(work / rel)
        assert ok, lines
        assert read_provenance(work / rel)["recipe_hash"]


def test_verify_detects_a_flipped_byte_in_a_prepared_dataset(two_tiny_runs):
    work, _ = two_tiny_runs[1]
    arrow = next((work / "datasets/tiny-mix/train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0x10
    arrow.write_bytes(bytes(data))
    r = run_cli("verify", str(work / "datasets/tiny-mix"), cwd=work)
    assert r.returncode == 1 and f"modified: train/{arrow.name}" in r.stdout
