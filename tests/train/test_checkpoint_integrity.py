"""Checkpoint content integrity on one real tiny run: real bit flips in its files (same size, headers
intact) make resume fall back to the previous checkpoint, `verify` name the file and the soup refuse
the input; a copy under a higher step's name is never resumed from nor counted by rotation; a run
cut off mid-save is refused by the soup. The soup cases live here to share the trained run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, assert_same_final_weights, copy_workdir, run_cli

from openseek_cpt.artifacts import checkpoints

SETS = ("train.args.save_steps=2", "train.args.eval_strategy='no'", "train.args.max_steps=10")
# What each damaged checkpoint of the resumed run holds: (step, file flipped).
DAMAGE = ((10, "model.safetensors"), (8, "optimizer.pt"), (6, "trainer_state.json"), (4, "rng_state.pth"))


def _train(work: Path, *sets: str):
    return run_cli("train", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)], cwd=work)


def flip_bit(path: Path, offset: int | None = None) -> None:
    """Flip the lowest bit of one byte of `path` in place (the middle byte unless `offset`)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        at = size // 2 if offset is None else offset
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))


def flip_tensor_bit(safetensors_file: Path) -> None:
    """Flip a bit in the middle of the tensor data (after the header, which stays intact)."""
    with open(safetensors_file, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    data_start = 8 + header
    flip_bit(safetensors_file, data_start + (safetensors_file.stat().st_size - data_start) // 2)


@pytest.fixture(scope="module")
def trained(tiny_prepared_dir, tmp_path_factory) -> Path:
    """One real run of 10 steps with checkpoints 2, 4, 6, 8 and 10 (all kept) and final/."""
    work = copy_workdir(tiny_prepared_dir, tmp_path_factory, "integrity")
    r = _train(work, *SETS, "train.args.save_total_limit=null")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [checkpoints.step_of(p) for p in checkpoints.list_checkpoints(work / "runs/tiny")] == [
        2,
        4,
        6,
        8,
        10,
    ]
    return work


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory):
    """A copy of the run whose checkpoints 4..10 each have one file damaged (DAMAGE), with a
    `cp -r checkpoint-2 checkpoint-12` and checkpoint-2's marker stripped of its hashes (an older
    run's), trained again to step 10 keeping one checkpoint: (workdir, completed process)."""
    work = copy_workdir(trained, tmp_path_factory, "integrity-resume")
    run = work / "runs/tiny"
    shutil.rmtree(run / "final")
    for step, name in DAMAGE:
        target = run / f"checkpoint-{step}" / name
        if name == "model.safetensors":
            flip_tensor_bit(target)
        else:
            flip_bit(target, 0 if name.endswith(".json") else None)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-12")
    marker = json.loads((run / "checkpoint-2" / checkpoints.MARKER).read_text())
    for field in ("hashes", "content_hash"):
        marker.pop(field, None)
    (run / "checkpoint-2" / checkpoints.MARKER).write_text(json.dumps(marker))
    r = _train(work, *SETS, "train.args.save_total_limit=1")
    return work, r


def _lines(r, *words: str) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if all(w in ln for w in words)]


def test_a_flipped_bit_in_the_newest_weights_makes_resume_fall_back_saying_so_once(resumed):
    _, r = resumed
    assert r.returncode == 0, r.stderr[-3000:]
    said = _lines(r, "runs/tiny/checkpoint-10", "model.safetensors")
    assert len(said) == 1 and "content differs" in said[0], said
    assert _lines(r, "resuming from runs/tiny/checkpoint-2"), r.stderr[-3000:]


@pytest.mark.parametrize("step,name", DAMAGE[1:])
def test_a_damaged_optimizer_trainer_state_or_rng_state_makes_resume_fall_back(resumed, step, name):
    _, r = resumed
    said = _lines(r, f"runs/tiny/checkpoint-{step}", name)
    assert len(said) == 1 and "removing" in said[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.returncode == 0, r.stderr[-3000:]


def test_the_fallback_run_ends_bitwise_where_the_undamaged_run_did(trained, resumed):
    work, r = resumed
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_lines(r, "records no content hashes")) == 1  # checkpoint-2's older marker, said once
    assert_same_final_weights(trained / "runs/tiny", work / "runs/tiny")
    assert checkpoints.verify(work / "runs/tiny/checkpoint-10").complete


def test_a_copy_under_a_higher_steps_name_is_ignored_and_rotation_keeps_the_complete_ones(resumed):
    work, r = resumed
    said = _lines(r, "runs/tiny/checkpoint-12")
    assert len(said) == 1 and "says step 2" in said[0], said
    run = work / "runs/tiny"
    # keep=1 counts complete checkpoints only: checkpoint-10 survives, the copy is left as found
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-10", "checkpoint-12"]
    assert checkpoints.newest_complete(run) == run / "checkpoint-10"


def _damaged_copy(work: Path) -> Path:
    """runs/damaged/checkpoint-4: checkpoint-4 with one bit of its tensor data flipped."""
    dst = work / "runs/damaged/checkpoint-4"
    if not dst.exists():
        shutil.copytree(work / "runs/tiny/checkpoint-4", dst)
        flip_tensor_bit(dst / "model.safetensors")
    return dst


def test_verify_names_the_damaged_file_of_a_checkpoint(trained):
    damaged = _damaged_copy(trained)
    r = run_cli("verify", "runs/tiny/checkpoint-2", str(damaged.relative_to(trained)), cwd=trained)
    assert r.returncode == 1, r.stdout + r.stderr  # as for a damaged artifact
    assert "runs/tiny/checkpoint-2: intact" in r.stdout, r.stdout
    assert "runs/damaged/checkpoint-4: DAMAGED" in r.stdout, r.stdout
    assert "modified: model.safetensors (content differs" in r.stdout, r.stdout


def _soup(work: Path, out: str, *ckpts: str):
    sets = (f"soup.checkpoints=[{', '.join(ckpts)}]", f"soup.output_dir=models/{out}", "soup.evaluate=false")
    return run_cli("soup", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)], cwd=work)


def _one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_the_soup_refuses_a_damaged_input_naming_the_file_and_writes_nothing(trained):
    damaged = _damaged_copy(trained)
    r = _soup(trained, "soup-damaged", "runs/tiny/checkpoint-2", str(damaged.relative_to(trained)))
    line = _one_line_error(r)
    assert "runs/damaged/checkpoint-4/model.safetensors does not match its content hash" in line, line
    assert not [p for p in (trained / "models").iterdir() if "soup-damaged" in p.name]


def test_the_soup_refuses_a_checkpoint_of_a_run_cut_off_mid_save(trained):
    """No marker, the run's lock file beside it, the optimizer not written yet."""
    cut = trained / "runs/cut"
    shutil.copytree(trained / "runs/tiny/checkpoint-6", cut / "checkpoint-6")
    shutil.copy(trained / "runs/tiny/.openseek_train.lock", cut / ".openseek_train.lock")
    for name in (checkpoints.MARKER, "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        (cut / "checkpoint-6" / name).unlink()
    line = _one_line_error(_soup(trained, "soup-cut", "runs/cut/checkpoint-6"))
    assert "runs/cut/checkpoint-6 is incomplete" in line, line


def test_the_soup_takes_intact_checkpoints_and_a_plain_model_dir_reading_each_byte_once(trained):
    plain = trained / "models/another-model"
    if not plain.exists():
        shutil.copytree(trained / "models/tiny-openseek", plain)
    r = _soup(trained, "soup-ok", "models/another-model", "runs/tiny/checkpoint-2", "runs/tiny/checkpoint-4")
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((trained / "models/soup-ok/merge_info.json").read_text())
    assert [i["path"] for i in info["inputs"]][1:] == ["runs/tiny/checkpoint-2", "runs/tiny/checkpoint-4",
                                                      "models/another-model"]  # fmt: skip
    assert info["io"]["bytes_read_again_for_hashes"] == 0
