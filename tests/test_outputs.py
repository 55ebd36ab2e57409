"""Outputs never destroy inputs: no stage replaces a directory it did not write, or one of its inputs.

`atomic.atomic_output_dir(stage=, inputs=)` is the one guard every stage's output goes through;
each case below is tried as a user would type it, and the thing it would have replaced is compared
byte for byte afterwards.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from conftest import TINY_RECIPE, copy_workdir, refused_in_one_line, run_cli

from openseek_cpt.artifacts.provenance import file_hashes


@pytest.fixture(scope="module")
def work(tiny_prepared_dir, tmp_path_factory):
    """The tiny assets + dataset and a 2-step run with checkpoints 1 and 2 and final/."""
    work = copy_workdir(tiny_prepared_dir, tmp_path_factory, "outputs")
    r = run_cli("train", "--recipe", str(TINY_RECIPE), "--set", "train.args.max_steps=2",
                "--set", "train.args.save_steps=1", "--set", "train.args.eval_strategy='no'", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_soup_into_one_of_its_input_checkpoints_is_refused_and_the_checkpoint_is_untouched(work):
    ckpt = work / "runs" / "tiny" / "checkpoint-2"
    before = file_hashes(ckpt)
    r = run_cli("soup", "--recipe", str(TINY_RECIPE), "--set", "soup.output_dir=runs/tiny/checkpoint-2",
                "--set", "soup.evaluate=false", cwd=work)  # fmt: skip
    refused_in_one_line(r, "soup.output_dir", "runs/tiny/checkpoint-2", "input")
    assert file_hashes(ckpt) == before
    # inside the run that holds the inputs: the same refusal
    r = run_cli("soup", "--recipe", str(TINY_RECIPE), "--set", "soup.output_dir=runs/tiny",
                "--set", "soup.evaluate=false", cwd=work)  # fmt: skip
    refused_in_one_line(r, "soup.output_dir", "contains the input")
    assert file_hashes(ckpt) == before


def test_download_onto_an_existing_file_is_refused_and_the_file_is_untouched(work):
    notes = work / "notes.txt"
    notes.write_text("my notes\n")
    r = run_cli("download", "--recipe", str(TINY_RECIPE), "--set", "assets.model_dir=notes.txt", cwd=work)
    refused_in_one_line(r, "assets.model_dir", "notes.txt", "not a directory")
    assert notes.read_text() == "my notes\n"


def test_data_into_another_stages_directory_is_refused_and_it_is_untouched(work):
    final = work / "runs" / "tiny" / "final"
    before = file_hashes(final)
    r = run_cli("data", "--recipe", str(TINY_RECIPE), "--set", "data.output_dir=runs/tiny/final", cwd=work)
    refused_in_one_line(r, "data.output_dir", "runs/tiny/final", "train stage")
    assert file_hashes(final) == before


def test_train_output_inside_its_base_model_isrefused_in_one_line(work):
    model = work / "models" / "tiny-openseek"
    before = file_hashes(model)
    r = run_cli("train", "--recipe", str(TINY_RECIPE), "--set", "train.output_dir=models/tiny-openseek/run",
                cwd=work)  # fmt: skip
    refused_in_one_line(r, "train.output_dir", "inside the input")
    assert file_hashes(model) == before


def test_soup_of_a_safetensors_file_with_aliased_keys_is_one_line_exit_2(work):
    """Two keys on the same bytes (the safetensors library refuses such a file): refused, not merged."""
    bad = work / "models" / "aliased"
    shutil.copytree(work / "runs" / "tiny" / "final", bad)
    raw = (bad / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    by_shape: dict[str, list[str]] = {}
    for key, info in header.items():
        if key != "__metadata__":
            by_shape.setdefault(json.dumps([info["dtype"], info["shape"]]), []).append(key)
    first, second = sorted(
        next(k for k in by_shape.values() if len(k) > 1), key=lambda k: header[k]["data_offsets"]
    )[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= length
    blob = blob.ljust(length)  # the same length (padded with spaces): the data stays where it was
    (bad / "model.safetensors").write_bytes(raw[:8] + blob + raw[8 + length :])
    r = run_cli("soup", "--recipe", str(TINY_RECIPE), "--set", "soup.checkpoints=[runs/tiny/checkpoint-2, models/aliased]",
                "--set", "soup.output_dir=models/soup-aliased", "--set", "soup.evaluate=false", cwd=work)  # fmt: skip
    refused_in_one_line(r, "models/aliased/model.safetensors", f"{second} and {first} share the same bytes")
    assert not list((work / "models").glob("*soup-aliased*"))
