"""The checkpoint lifecycle the project owns: rotation after the marker, sweeping of dead writers'
leftovers, one writer per run (a lock), and preemption during evaluation (CPU, tiny recipe)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, WatchedProcess, copy_workdir, run_cli
from conftest import fresh_workdir as fresh

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.artifacts.temps import sweep_leftovers
from openseek_cpt.errors import EXIT_PREEMPTED, UserError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "lifecycle")


class Train(WatchedProcess):
    """One `openseek-cpt train` of the tiny recipe with overrides, output read in a thread."""

    def __init__(self, work: Path, *sets: str):
        cmd = [sys.executable, "-m", "openseek_cpt", "train", "--recipe", str(TINY_RECIPE)]
        super().__init__(cmd + [a for s in sets for a in ("--set", s)], work, ENV)


def _fake_checkpoint(run: Path, step: int, complete: bool) -> Path:
    ckpt = run / checkpoints.name_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * step)
    if complete:
        checkpoints.write_marker(ckpt, {"step": step})
    return ckpt


def test_rotation_deletes_only_older_complete_checkpoints_and_keeps_the_newest_complete(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        _fake_checkpoint(run, step, complete)
    removed = checkpoints.rotate(run, keep=1, protect=[run / "checkpoint-4"])
    assert [p.name for p in removed] == ["checkpoint-2"]
    # 4 is protected (best model), 6 is the newest complete, 8 is being written: none is touched
    assert [p.name for p in checkpoints.list_checkpoints(run)] == [
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert not list(run.glob(".*"))  # the renamed-then-deleted directory is gone too
    assert checkpoints.rotate(run, keep=None) == []


def test_incomplete_checkpoints_are_removed_and_the_newest_complete_one_is_the_resume_point(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        _fake_checkpoint(run, step, complete)
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"cut")  # damaged: size differs
    assert checkpoints.newest_complete(run) == run / "checkpoint-4"
    removed = checkpoints.remove_incomplete(run)
    assert [(p.name, why) for p, why in removed] == [
        ("checkpoint-2", "damaged: model.safetensors"),
        ("checkpoint-6", f"no {checkpoints.MARKER}"),
    ]
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-4"]


def _run_info(**changes) -> checkpoints.RunInfo:
    info = checkpoints.RunInfo("datasets/d", "f" * 64, "h" * 64, 2, "MULTI_CPU", 8, "bf16-mixed")
    return dataclasses.replace(info, **changes)


def test_resume_refuses_another_dataset_or_fsdp_ddp_and_notes_another_world_size_or_recipe(tmp_path):
    ckpt = tmp_path / checkpoints.name_for(3)
    ckpt.mkdir()
    checkpoints.write_marker(ckpt, checkpoints.marker_info(3, _run_info()))
    assert checkpoints.read_marker(ckpt)["distributed_type"] == "MULTI_CPU"

    def check(**changes):
        return checkpoints.check_resume(
            ckpt, _run_info(**changes), force_resume=False, accelerate_config="c.yaml"
        )

    assert check(distributed_type="DDP") == []
    with pytest.raises(UserError, match="written by a MULTI_CPU run .* this run is FSDP"):
        check(distributed_type="FSDP")
    with pytest.raises(UserError, match="force_resume"):
        check(dataset_fingerprint="0" * 64)
    assert (
        checkpoints.check_resume(
            ckpt, _run_info(dataset_fingerprint="0" * 64), force_resume=True, accelerate_config="c.yaml"
        )
        == []
    )
    notes = check(world_size=1, recipe_hash="0" * 64)
    assert [level for level, _ in notes] == [logging.INFO, logging.WARNING]
    assert "was written at world size 2; resuming at 1" in notes[0][1]


def test_leftovers_of_dead_writers_are_swept_and_a_live_writers_are_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    for name in (f".final.tmp-{dead_pid}", f".checkpoint-4.work-{dead_pid}", f".final.tmp-{os.getpid()}"):
        (tmp_path / name).mkdir()
    (tmp_path / f".openseek_checkpoint.json.tmp-{dead_pid}").write_text("{")
    (tmp_path / "checkpoint-4").mkdir()  # not a leftover name
    removed = sorted(p.name for p in sweep_leftovers(tmp_path))
    assert removed == sorted([f".final.tmp-{dead_pid}", f".checkpoint-4.work-{dead_pid}",
                              f".openseek_checkpoint.json.tmp-{dead_pid}"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".final.tmp-{os.getpid()}", "checkpoint-4"])


def test_with_save_total_limit_1_every_restart_after_a_save_resumes_from_a_checkpoint(prepared, tmp_path):
    """kill -9 at moments around saves (mid-write, right after the marker, mid-rotation, between)."""
    work = fresh(prepared, tmp_path)
    run = work / "runs" / "tiny"
    sets = ("train.args.max_steps=12", "train.args.save_steps=2", "train.args.save_total_limit=1",
            "train.args.eval_strategy='no'")  # fmt: skip
    rng = random.Random(7)

    def incomplete() -> bool:
        return any(not checkpoints.status(p).complete for p in checkpoints.list_checkpoints(run))

    def newest_step() -> int:
        newest = checkpoints.newest_complete(run)
        return checkpoints.step_of(newest) if newest else 0

    def rotating() -> bool:
        return any(run.glob(".checkpoint-*.work-*"))

    moments = [
        "during_write",
        "after_marker",
        "during_rotation",
        "after_steps",
        "during_write",
        "after_marker",
    ]
    kills, log = 0, []
    for moment in moments:
        had_checkpoint = checkpoints.newest_complete(run) is not None
        w = Train(work, *sets)
        # mid-write / mid-rotation moments count only once this start trains (a killed earlier start
        # may have left an incomplete checkpoint or a rotation leftover that this start cleans up)
        if moment == "during_write":
            hit = w.wait_for(lambda w=w: w.losses >= 1 and incomplete())
        elif moment == "after_marker":
            before = newest_step()
            hit = w.wait_for(lambda b=before: newest_step() > b)
        elif moment == "during_rotation":
            hit = w.wait_for(lambda w=w: w.losses >= 1 and rotating(), timeout=60)
        else:
            target = rng.randint(1, 3)
            hit = w.wait_for(lambda t=target, w=w: w.losses >= t)
        if hit and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)
            kills += 1
        w.finish()
        resumed = "resuming from runs/tiny/checkpoint-" in w.output
        log.append(f"{moment}: killed={hit}, had a checkpoint={had_checkpoint}, resumed={resumed}, "
                   f"on disk {sorted(p.name for p in run.iterdir() if 'checkpoint' in p.name)}")  # fmt: skip
        if had_checkpoint:
            assert resumed, "\n".join(log) + "\n" + w.output[-3000:]
        if had_checkpoint:  # once a save completed, a kill anywhere leaves a complete checkpoint
            assert checkpoints.newest_complete(run) is not None, "\n".join(log)
    print("\n".join(log))
    assert kills >= 5, log
    w = Train(work, *sets)
    assert w.finish() == 0, w.output[-3000:]
    assert [p.name for p in checkpoints.list_checkpoints(run)] == ["checkpoint-12"]
    assert not list(run.glob(".checkpoint-*")) and (run / "final" / "model.safetensors").is_file()


def test_a_second_train_into_a_running_run_is_refused_naming_the_holder(prepared, tmp_path):
    work = fresh(prepared, tmp_path)
    sets = ("train.args.max_steps=400", "train.args.save_steps=200", "train.args.eval_strategy='no'")
    first = Train(work, *sets)
    try:
        assert first.wait_for(lambda: first.losses >= 1), first.output[-3000:]
        r = run_cli("train", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)], cwd=work)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("openseek-cpt train: error:")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "in use by another training run" in lines[0] and f'"pid": {first.proc.pid}' in lines[0], lines[
            0
        ]
        assert first.proc.poll() is None  # the running run is untouched
    finally:
        first.proc.kill()
        first.finish()


def test_sigusr1_during_an_evaluation_saves_right_after_it_and_exits_with_the_preemption_code(
    prepared, tmp_path
):
    """An evaluation after every step, over 64 rows (several times a step); the signal is sent just
    after step 2 is logged, i.e. as its evaluation starts: the run must save at step 2 right after
    that evaluation, not after one more step."""
    from datasets import DatasetDict, load_from_disk

    src = prepared / "datasets" / "tiny-mix"
    data = load_from_disk(str(src))
    big = tmp_path / "big-eval"
    DatasetDict({"train": data["train"], "eval": data["train"].select(range(64))}).save_to_disk(str(big))
    shutil.copy(src / "manifest.json", big / "manifest.json")
    rng = random.Random(3)
    outcomes = []
    for attempt in range(3):
        work = fresh(prepared, tmp_path / f"a{attempt}")
        w = Train(work, f"train.dataset_dir={big}", "train.args.max_steps=40", "train.args.save_steps=100",
                  "train.args.eval_steps=1")  # fmt: skip
        assert w.wait_for(lambda w=w: w.losses >= 2), w.output[-3000:]
        time.sleep(rng.uniform(0.02, 0.3))
        w.proc.send_signal(signal.SIGUSR1)
        assert w.finish() == EXIT_PREEMPTED, w.output[-3000:]
        at = next(i for i, ln in enumerate(w.lines) if "received signal" in ln)
        steps_before = sum("'loss'" in ln for ln in w.lines[:at])
        evals_before = sum("'eval_loss'" in ln for ln in w.lines[:at])
        saved = [checkpoints.step_of(p) for p in checkpoints.list_checkpoints(work / "runs" / "tiny")]
        in_eval = steps_before == evals_before + 1  # step N logged, its evaluation not finished
        outcomes.append((attempt, steps_before, evals_before, saved))
        if in_eval:
            # saved at the evaluated step N, right after the evaluation: no further step was taken
            assert saved == [steps_before], outcomes
            state = checkpoints.status(work / "runs" / "tiny" / checkpoints.name_for(steps_before))
            assert state.complete and not (work / "runs" / "tiny" / "final").exists()
            assert sum("'eval_loss'" in ln for ln in w.lines) == steps_before  # that evaluation finished
            break
        assert saved and saved[0] <= steps_before + 1, outcomes  # a signal between steps: the next step
    else:
        pytest.fail(f"the signal never landed during an evaluation in 3 attempts: {outcomes}")
    print(f"signal during the evaluation of step {steps_before}; checkpoint {saved}; attempts {outcomes}")
