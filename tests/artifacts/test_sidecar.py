"""`OUTPUT.provenance.json`: one format for every output that is files, whoever writes it; it names
its writer (what the output guard reads), the dataset and split, their fingerprint and recipe."""

from __future__ import annotations

import json

from openseek_cpt.artifacts.provenance import write_provenance
from openseek_cpt.artifacts.sidecar import sidecar_path, write_sidecar, written_by

SIDECAR_KEYS = {"stage", "created", "inputs", "recipe_hash", "versions", "git_revision", "format"}


class _Recipe:
    def hash(self) -> str:
        return "recipe-hash-1"

    def to_dict(self) -> dict:
        return {"seed": 1}


def test_a_sidecar_names_its_writer_and_the_datasets_fingerprint_and_recipe(tmp_path):
    dataset = tmp_path / "prepared"
    dataset.mkdir()
    (dataset / "rows.arrow").write_bytes(b"rows")
    prov = write_provenance(dataset, stage="data", recipe=_Recipe())
    output = tmp_path / "out" / "corpus"
    output.parent.mkdir()
    written = write_sidecar(output, stage="export", dataset_dir=dataset, split="eval", fields={"format": "x"})
    on_disk = json.loads(sidecar_path(output).read_text())
    assert on_disk == written and set(on_disk) == SIDECAR_KEYS
    assert on_disk["inputs"] == {
        "dataset_dir": str(dataset),
        "split": "eval",
        "fingerprint": prov["fingerprint"],
    }
    assert on_disk["recipe_hash"] == "recipe-hash-1"
    assert sidecar_path(output) == tmp_path / "out" / "corpus.provenance.json"
    assert written_by(sidecar_path(output)) == "export"


def test_the_data_stage_writes_one_before_its_dataset_has_its_final_name(tmp_path):
    not_yet = tmp_path / "prepared"  # still under its temp name: only its provenance is known
    prov = {"fingerprint": "fp", "recipe_hash": "rh"}
    info = write_sidecar(
        tmp_path / "copy", stage="data", dataset_dir=not_yet, split="train", fields={"format": "megatron"},
        dataset_provenance=prov,
    )  # fmt: skip
    assert info["inputs"]["fingerprint"] == "fp" and info["recipe_hash"] == "rh" and not not_yet.exists()
    assert written_by(sidecar_path(tmp_path / "copy")) == "data"


def test_no_sidecar_or_a_damaged_one_names_no_writer(tmp_path):
    assert written_by(tmp_path / "none.provenance.json") is None
    (tmp_path / "cut.provenance.json").write_text('{"stage": "da')
    (tmp_path / "odd.provenance.json").write_text('{"stage": ["data"]}')
    assert written_by(tmp_path / "cut.provenance.json") is None
    assert written_by(tmp_path / "odd.provenance.json") is None
