"""Every input is checked before use, one line naming the file: a model directory's JSON files
(tokenizer.json cut off by an interrupted copy), a directory that is not a model, and the Arrow
files of a prepared dataset (cut mid-batch, or exactly at a batch boundary, which Arrow itself
would read as fewer rows without a word)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, run_cli

from openseek_cpt import download
from openseek_cpt.artifacts import prepared
from openseek_cpt.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small prepared-dataset layout (DatasetDict train/eval, several record batches per file)."""
    from datasets import Dataset, DatasetDict

    rows = {"input_ids": [[i % 97] * 16 for i in range(400)], "seq_lengths": [[16]] * 400}
    path = tmp_path_factory.mktemp("prepared") / "ds"
    DatasetDict(train=Dataset.from_dict(rows), eval=Dataset.from_dict(rows)).save_to_disk(str(path))
    return path


def damaged_copy(dataset: Path, tmp_path: Path, keep: int) -> tuple[Path, Path]:
    """A copy of `dataset` whose train .arrow keeps only its first `keep` bytes (negative: all but)."""
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    arrow = next((copy / "train").glob("*.arrow"))
    raw = arrow.read_bytes()
    arrow.write_bytes(raw[:keep])
    return copy, arrow


def test_an_intact_dataset_loads(dataset):
    assert len(prepared.load_split(dataset, "train", "train.dataset_dir")) == 400


@pytest.mark.parametrize("keep", [-8, -100, 2000, 7])
def test_a_truncated_arrow_file_is_named(dataset, tmp_path, keep):
    copy, arrow = damaged_copy(dataset, tmp_path, keep)
    with pytest.raises(UserError, match=rf"train.dataset_dir: {arrow} is truncated or damaged"):
        prepared.load_split(copy, "train", "train.dataset_dir")


def test_export_megatron_from_a_truncated_arrow_is_one_line_exit_2(dataset, tmp_path):
    copy, arrow = damaged_copy(dataset, tmp_path, 2000)
    r = run_cli("export-megatron", str(copy), "out/train", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"openseek-cpt export-megatron: error: DATASET_DIR: {arrow} is truncated or damaged "
        f"(it does not end with Arrow's end-of-stream marker); rerun `openseek-cpt data` or restore the dataset"
    ]
    assert not (tmp_path / "out").exists()


def test_a_dataset_directory_as_base_model_is_named(dataset):
    with pytest.raises(
        UserError,
        match=r"assets.base_model='.*ds' is a directory without config.json \(it holds a prepared dataset\)",
    ):
        download.check_local_model(dataset)


def test_download_of_a_model_whose_tokenizer_json_is_cut_off_names_the_file(tmp_path):
    model = tmp_path / "hub" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {"a": 1, "b')
    r = run_cli("download", "--recipe", str(TINY_RECIPE), "--set", "assets.base_model=hub/m", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("openseek-cpt ")]
    assert lines == [
        "openseek-cpt download: error: assets.base_model: hub/m/tokenizer.json: not valid JSON "
        "(Unterminated string starting at: line 1 column 48 (char 47)); copy or download the model again"
    ], r.stderr


def test_a_hole_in_an_arrow_file_that_keeps_its_end_marker_is_named(dataset, tmp_path):
    copy, arrow = damaged_copy(dataset, tmp_path, -1)
    raw = next((dataset / "train").glob("*.arrow")).read_bytes()
    arrow.write_bytes(raw[:2000] + raw[-8:])
    with pytest.raises(UserError, match=rf"{arrow} is truncated or damaged \(Expected to be able to read"):
        prepared.load_split(copy, "train", "train.dataset_dir")
