"""export-mindrecord (export/mindrecord.py): MindSpore's own reader reads our export back row for row (those
tests need the `mindspore` extra, marked `mindspore`); without MindSpore the command says how to install it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli

from openseek_cpt.export.mindrecord import export_mindrecord
from tests.export.test_megatron_export import ROWS, make_prepared


@pytest.fixture
def mindspore_installed() -> None:
    """Skips the test without the `mindspore` extra."""
    pytest.importorskip("mindspore.mindrecord")


def _read_all(path) -> list[dict]:
    mindrecord = pytest.importorskip("mindspore.mindrecord")
    reader = mindrecord.FileReader(str(path))
    try:
        return list(reader.get_next())
    finally:
        reader.close()


@pytest.mark.mindspore
@pytest.mark.usefixtures("mindspore_installed")
def test_mindspore_filereader_reads_padded_rows_in_order(tmp_path):
    prepared = make_prepared(tmp_path, manifest={"max_length": 8, "vocab_size": 64, "pad_token_id": 63})
    path = export_mindrecord(prepared, tmp_path / "out" / "mix.mindrecord")
    rows = _read_all(path)
    assert [sorted(r) for r in rows] == [["input_ids"]] * len(ROWS)
    for row, expected in zip(rows, ROWS, strict=True):
        ids = row["input_ids"]
        assert ids.dtype == np.int32 and ids.shape == (8,)
        assert ids.tolist() == expected + [63] * (8 - len(expected))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mix.mindrecord",
        "mix.mindrecord.db",
        "mix.mindrecord.provenance.json",
    ]
    assert json.loads((tmp_path / "out" / "mix.mindrecord.provenance.json").read_text())["max_length"] == 8


@pytest.mark.mindspore
@pytest.mark.usefixtures("mindspore_installed")
def test_mindrecord_row_length_comes_from_the_recipe_and_pad_falls_back_to_eos(tmp_path):
    prepared = make_prepared(tmp_path, manifest={"eos_token_id": 1})
    (prepared / "provenance.json").write_text(json.dumps({"recipe": {"data": {"max_length": 10}}}))
    path = export_mindrecord(prepared, tmp_path / "eval.mindrecord", split="eval")
    rows = _read_all(path)
    assert [r["input_ids"].tolist() for r in rows] == [ROWS[0] + [1] * 3]


@pytest.mark.mindspore
@pytest.mark.usefixtures("mindspore_installed")
def test_mindrecord_export_overwrites_and_mindspore_dataset_loads_it(tmp_path):
    prepared = make_prepared(tmp_path)
    path = tmp_path / "mix.mindrecord"
    export_mindrecord(prepared, path)
    export_mindrecord(prepared, path)  # a second export replaces the first
    md = pytest.importorskip("mindspore.dataset")
    loaded = md.MindDataset(str(path), columns_list=["input_ids"], shuffle=False)
    got = [row["input_ids"].tolist() for row in loaded.create_dict_iterator(output_numpy=True, num_epochs=1)]
    assert got == [r + [0] * (8 - len(r)) for r in ROWS]


@pytest.mark.mindspore
@pytest.mark.usefixtures("mindspore_installed")
def test_cli_export_mindrecord_of_a_prepared_dataset(tmp_path):
    prepared = make_prepared(tmp_path)
    r = run_cli("export-mindrecord", str(prepared), "mr/mix.mindrecord", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [r["input_ids"].tolist() for r in _read_all(tmp_path / "mr" / "mix.mindrecord")] == [
        r + [0] * (8 - len(r)) for r in ROWS
    ]
    r = run_cli("export-mindrecord", str(prepared), "mr/mix.mindrecord.db", cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_cli_export_mindrecord_without_mindspore_says_how_to_install(tmp_path):
    prepared = make_prepared(tmp_path)
    # Hide mindspore (installed or not) the way a missing package looks: `import mindspore` fails.
    code = (
        "import sys; sys.modules['mindspore'] = None; from openseek_cpt.cli import main; "
        f"sys.exit(main(['export-mindrecord', {str(prepared)!r}, 'out.mindrecord']))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "pip install 'openseek-cpt[mindspore]'" in r.stderr
