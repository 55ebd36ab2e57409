"""Every output path is checked before any work, for every command, in one line naming the key and
the path: a file where a directory goes, a directory where a file prefix goes, a file among the
parents, a read-only or unwritable place. The checks run before the stage's inputs are read, so
these tests need no prepared data (a stand-in `dataset_dict.json` gets `train` that far)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, refused_in_one_line, run_cli

from openseek_cpt.artifacts.atomic import check_output_dir
from openseek_cpt.errors import UserError


@pytest.fixture()
def work(tmp_path) -> Path:
    """A workdir with a file `notes.txt` and a stand-in prepared dataset at the tiny recipe's path."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "datasets" / "tiny-mix").mkdir(parents=True)
    (tmp_path / "datasets" / "tiny-mix" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return tmp_path


@pytest.fixture()
def readonly(tmp_path) -> Path:
    """A directory this process cannot write in: a read-only tmpfs (root ignores mode bits), or a
    chmod 555 directory for any other user."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def train(work: Path, output_dir: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--recipe", str(TINY_RECIPE), "--set", f"train.output_dir={output_dir}", cwd=work)


def test_train_output_dir_that_is_a_file_is_refused_and_the_file_kept(work):
    refused_in_one_line(
        train(work, "notes.txt"), "train.output_dir", "'notes.txt' exists and is not a directory"
    )
    assert (work / "notes.txt").read_text() == "my notes\n"


def in_process(stage: str, work: Path, key: str, value: str, monkeypatch) -> None:
    """Run `stage`'s entry on the tiny recipe with `key=value` as the CLI would, in this process
    (the CLI cases above show that such a UserError is one line with exit 2)."""
    from openseek_cpt import download
    from openseek_cpt.config import load_recipe
    from openseek_cpt.train.setup import setup_run

    monkeypatch.chdir(work)
    recipe = load_recipe(TINY_RECIPE, [f"{key}={value}"])
    (setup_run if stage == "train" else download.run)(**recipe.stage_args(stage))


@pytest.mark.parametrize("stage", ["train", "download"])
def test_an_output_under_a_file_or_on_a_read_only_filesystem_is_refused(work, readonly, stage, monkeypatch):
    key = {"train": "train.output_dir", "download": "assets.model_dir"}[stage]
    with pytest.raises(
        UserError, match=rf"{key}: 'notes.txt/out' cannot be created: '.*notes.txt' is a file"
    ):
        in_process(stage, work, key, "notes.txt/out", monkeypatch)
    why = "a read-only filesystem" if os.geteuid() == 0 else "permission denied"
    with pytest.raises(UserError, match=rf"{key}: cannot write in '{readonly}' \({why}\)"):
        in_process(stage, work, key, f"{readonly}/runs/out", monkeypatch)


def test_download_model_dir_under_a_file_is_refused_before_fetching(work):
    r = run_cli(
        "download", "--recipe", str(TINY_RECIPE), "--set", "assets.model_dir=notes.txt/model", cwd=work
    )
    refused_in_one_line(
        r, "assets.model_dir", "'notes.txt/model' cannot be created", "is a file, not a directory"
    )


def test_tiny_workdir_that_is_a_file_or_under_one_is_refused(work):
    r = run_cli("tiny", "--workdir", "notes.txt", cwd=work)
    refused_in_one_line(r, "tiny --workdir", "'notes.txt' exists and is not a directory")
    r = run_cli("tiny", "--workdir", "notes.txt/w", cwd=work)
    refused_in_one_line(r, "tiny --workdir", "'notes.txt/w' cannot be created")
    assert (work / "notes.txt").read_text() == "my notes\n"


def test_tiny_workdir_on_a_read_only_filesystem_is_refused(work, readonly):
    refused_in_one_line(
        run_cli("tiny", "--workdir", str(readonly), cwd=work),
        "tiny --workdir",
        f"cannot write in '{readonly}'",
    )


@pytest.mark.parametrize("prefix", ["export", "export/"])
def test_export_megatron_to_a_directory_prefix_is_refused(work, prefix):
    (work / "export").mkdir()
    r = run_cli("export-megatron", "datasets/tiny-mix", prefix, cwd=work)
    refused_in_one_line(r, f"PREFIX '{prefix}' is a directory", "'export/train_text_document'")
    assert not list((work / "export").iterdir())


def test_export_megatron_prefix_on_a_read_only_filesystem_is_refused(work, readonly):
    r = run_cli("export-megatron", "datasets/tiny-mix", f"{readonly}/x", cwd=work)
    refused_in_one_line(r, "export-megatron: PREFIX", f"cannot write in '{readonly}'")


@pytest.mark.parametrize("stage", ["soup", "data", None])
def test_check_output_dir_refuses_a_file_a_file_parent_and_a_read_only_place(
    work, readonly, stage, monkeypatch
):
    """The one helper every directory output goes through (soup.output_dir, data.output_dir, ...)."""
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match=r"f: 'notes.txt' exists and is not a directory"):
        check_output_dir("notes.txt", stage=stage, field="f")
    with pytest.raises(UserError, match=r"f: 'notes.txt/soup' cannot be created: '.*notes.txt' is a file"):
        check_output_dir("notes.txt/soup", stage=stage, field="f")
    with pytest.raises(UserError, match=rf"f: cannot write in '{readonly}'"):
        check_output_dir(readonly / "soup", stage=stage, field="f")
    check_output_dir(work / "new" / "soup", stage=stage, field="f")  # a writable place: no error
