"""The data stage's output checks run before any work, and `data.megatron_prefix` replaces only its own files.

A refusal comes before tokenizing (`prepare_source` is never called, no `.NAME.work-PID` dir is made);
the user's files and the stage's own Megatron sources are byte-identical afterwards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.data import stage as data
from openseek_cpt.errors import UserError
from openseek_cpt.testing import megatron_files
from tests.artifacts.test_sidecar import SIDECAR_KEYS
from tests.data.test_data import _recipe


@pytest.fixture
def no_work(monkeypatch):
    """Any tokenizing or a work dir fails the test: the refusal must come first."""

    def started(*args, **kwargs):
        raise AssertionError("the stage started work before refusing its output")

    monkeypatch.setattr(data, "prepare_source", started)
    monkeypatch.setattr(data, "load_tokenizer", started)


def _no_work_dir(workdir):
    assert not list((workdir / "datasets").glob(".tiny-mix.work-*"))


def test_megatron_prefix_onto_a_users_files_is_refused_before_any_work(tiny_workdir, monkeypatch, no_work):
    mine = {name: tiny_workdir / "mine" / name for name in ("corpus.bin", "corpus.idx")}
    mine["corpus.bin"].parent.mkdir()
    for path in mine.values():
        path.write_bytes(b"the user's own file\n")
    recipe = _recipe(tiny_workdir, "data.megatron_prefix=mine/corpus", monkeypatch=monkeypatch)
    with pytest.raises(
        UserError, match=r"data.megatron_prefix: 'mine/corpus.bin' exists and was not written by data"
    ):
        data.run(**recipe.stage_args("data"))
    assert all(p.read_bytes() == b"the user's own file\n" for p in mine.values())
    _no_work_dir(tiny_workdir)


def test_megatron_prefix_onto_one_of_the_stages_megatron_sources_is_refused(
    tiny_workdir, monkeypatch, no_work
):
    from datasets import load_from_disk

    monkeypatch.chdir(tiny_workdir)
    code = load_from_disk("models/tiny/sources/code")
    megatron_files.write_documents("meg/code", (np.asarray(x) for x in code["input_ids"]), 1024)
    before = {ext: (tiny_workdir / f"meg/code.{ext}").read_bytes() for ext in ("bin", "idx")}
    # A sidecar claiming the data stage wrote it does not make an input replaceable.
    (tiny_workdir / "meg/code.provenance.json").write_text('{"stage": "data"}\n')
    recipe = _recipe(tiny_workdir, "data.sources.1.path=meg/code", "data.megatron_prefix=meg/code")
    with pytest.raises(UserError, match=r"data.megatron_prefix: 'meg/code.bin' is the input 'meg/code.bin'"):
        data.run(**recipe.stage_args("data"))
    assert {ext: (tiny_workdir / f"meg/code.{ext}").read_bytes() for ext in ("bin", "idx")} == before


def test_output_dir_checks_come_before_any_work(tiny_workdir, monkeypatch, no_work):
    (tiny_workdir / "mine").mkdir()
    (tiny_workdir / "mine" / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match="data.output_dir: 'mine' exists and is not an openseek-cpt artifact"):
        data.run(**_recipe(tiny_workdir, "data.output_dir=mine", monkeypatch=monkeypatch).stage_args("data"))
    (tiny_workdir / "datasets").mkdir(exist_ok=True)
    (tiny_workdir / "datasets" / "to-model").symlink_to(tiny_workdir / "models" / "tiny-openseek")
    with pytest.raises(UserError, match="data.output_dir: 'datasets/to-model' is the input"):
        data.run(**_recipe(tiny_workdir, "data.output_dir=datasets/to-model").stage_args("data"))
    assert (tiny_workdir / "mine" / "notes.txt").read_text() == "mine\n"
    _no_work_dir(tiny_workdir)


def test_megatron_prefix_refusal_through_the_cli_is_one_line_and_a_rerun_replaces_its_own(tiny_workdir):
    (tiny_workdir / "datasets").mkdir(exist_ok=True)
    (tiny_workdir / "datasets" / "mine.idx").write_bytes(b"the user's index\n")
    r = run_cli(
        "data", "--recipe", str(TINY_RECIPE), "--set", "data.megatron_prefix=datasets/mine", cwd=tiny_workdir
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "datasets/mine.idx" in lines[0] and "remove it yourself" in lines[0], lines
    assert (tiny_workdir / "datasets" / "mine.idx").read_bytes() == b"the user's index\n"
    assert not (tiny_workdir / "datasets" / "tiny-mix").exists()
    for _ in range(2):  # its own earlier Megatron copy (the sidecar says so) is replaced
        r = run_cli(
            "data",
            "--recipe",
            str(TINY_RECIPE),
            "--set",
            "data.megatron_prefix=datasets/own",
            cwd=tiny_workdir,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    sidecar = json.loads((tiny_workdir / "datasets" / "own.provenance.json").read_text())
    dataset = json.loads((tiny_workdir / "datasets" / "tiny-mix" / "provenance.json").read_text())
    assert set(sidecar) == SIDECAR_KEYS | {"vocab_size", "dtype"}  # the format export-megatron writes
    assert (sidecar["stage"], sidecar["format"], sidecar["inputs"]["split"]) == ("data", "megatron", "train")
    assert sidecar["inputs"]["fingerprint"] == dataset["fingerprint"]
    assert sidecar["recipe_hash"] == dataset["recipe_hash"]


def test_a_megatron_prefix_that_is_a_directory_is_refused_before_any_work(tiny_workdir, monkeypatch):
    from openseek_cpt.data import stage
    from openseek_cpt.errors import UserError
    from tests.data.test_data import _recipe

    monkeypatch.chdir(tiny_workdir)
    (tiny_workdir / "megatron").mkdir()
    with pytest.raises(UserError) as err:
        stage.run(**_recipe(tiny_workdir, "data.megatron_prefix=megatron").stage_args("data"))
    assert "data.megatron_prefix 'megatron' is a directory" in str(err.value)
    assert not (tiny_workdir / "datasets/tiny-mix").exists()
