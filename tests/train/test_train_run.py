"""Acceptance tests of the train stage as real processes on the tiny recipe (CPU).

One uninterrupted single-process run is the reference; every other run (2-process DDP, kill -9
and restart, SIGTERM and restart) is compared with it. 12 optimizer steps of 8 sequences x 128
tokens; checkpoints every 3 steps, 2 kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RECIPE, WatchedProcess, copy_workdir, fresh_workdir, run_cli
from conftest import assert_same_final_weights as assert_same_weights
from conftest import fresh_workdir as fresh

from openseek_cpt.errors import EXIT_PREEMPTED

DDP_CONFIG = str(REPO / "recipes" / "accelerate_configs" / "ddp.yaml")
STEPS = 12
# The short run every kill/resume test shares (test_fsdp too), and it under DDP.
RUN = [
    "--set", f"train.args.max_steps={STEPS}",
    "--set", "train.args.save_steps=3",
    "--set", "train.args.save_total_limit=2",
    "--set", "train.args.eval_steps=6",
]  # fmt: skip
BASE = [*RUN, "--set", f"train.accelerate_config={DDP_CONFIG}"]
# 1 process x grad accumulation 2 vs 2 gloo processes x 1: the same sequences in each step; the
# gradient sum runs in another order (local accumulation vs all-reduce), so the curves may drift by
# float rounding. Tolerance: 1e-4 relative per step.
DDP_LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    """A private copy of the tiny assets + prepared tiny dataset."""
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "train-run")


@pytest.fixture(scope="module")
def reference(prepared) -> Path:
    """The uninterrupted single-process run."""
    r = run_cli("train", "--recipe", str(TINY_RECIPE), *BASE, cwd=prepared)
    assert r.returncode == 0, r.stderr[-3000:]
    return prepared / "runs" / "tiny"


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))


def train_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "openseek_cpt", "train", "--recipe", str(TINY_RECIPE), *BASE, *extra]


def launch_cmd(*extra: str) -> list[str]:
    """The same run as `train_cmd`, on 2 gloo ranks through `openseek-cpt launch`."""
    return [sys.executable, "-m", "openseek_cpt", "launch", "--recipe", str(TINY_RECIPE), "--nproc", "2",
            *BASE, *extra]  # fmt: skip


def test_reference_run_keeps_the_last_checkpoints_and_marks_them_complete(reference):
    assert checkpoint_steps(reference) == [9, 12]
    for step in (9, 12):
        marker = json.loads((reference / f"checkpoint-{step}" / "openseek_checkpoint.json").read_text())
        assert marker["step"] == step and len(marker["dataset_fingerprint"]) == 64
        assert (reference / f"checkpoint-{step}" / "model.safetensors").is_file()
    assert (reference / "final" / "provenance.json").is_file()


def test_two_gloo_processes_give_the_single_process_loss_curve(reference, prepared, tmp_path):
    work = fresh(prepared, tmp_path)
    r = run_cli("launch", "--recipe", str(TINY_RECIPE), "--nproc", "2", *BASE, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = work / "runs" / "tiny"
    marker = json.loads((ddp / f"checkpoint-{STEPS}" / "openseek_checkpoint.json").read_text())
    assert marker["world_size"] == 2
    assert checkpoint_steps(ddp) == [9, 12]
    one, two = step_losses(reference), step_losses(ddp)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    worst = max(abs(one[s] - two[s]) / one[s] for s in one)
    print(f"1 process vs 2 gloo processes: max relative loss difference {worst:.2e} over {STEPS} steps")
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=DDP_LOSS_RTOL), (step, one[step], two[step])
    assert one[STEPS] < one[1]  # it learns


def test_tensorboard_events_hold_every_metric_with_plausible_values(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    values = {tag: [e.value for e in acc.Scalars(tag)] for tag in tags}
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                "train/tokens_per_second_per_device", "train/mfu", "eval/loss", "eval/perplexity"):  # fmt: skip
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert len(values["train/loss"]) == STEPS
    assert all(0 < v < 20 for v in values["train/loss"])
    assert all(v == pytest.approx(2e-3) for v in values["train/learning_rate"])
    assert all(v > 0 for v in values["train/grad_norm"])
    assert all(v > 0 for v in values["train/tokens_per_second"])
    assert all(0 < v < 1 for v in values["train/mfu"])
    assert len(values["eval/loss"]) == 2
    for loss, ppl in zip(values["eval/loss"], values["eval/perplexity"], strict=True):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-4)


class Watcher(WatchedProcess):
    """One training process of the tiny recipe (see conftest.WatchedProcess)."""

    def __init__(self, work: Path, *extra: str):
        super().__init__(train_cmd(*extra), work)


def test_kill_9_at_random_moments_then_restart_ends_bitwise_identical(reference, prepared, tmp_path):
    work = fresh(prepared, tmp_path)
    run = work / "runs" / "tiny"
    rng = random.Random(233)

    def incomplete_checkpoint_exists() -> bool:
        return any(not (p / "openseek_checkpoint.json").exists() for p in run.glob("checkpoint-*"))

    def complete_count() -> int:
        return len(list(run.glob("checkpoint-*/openseek_checkpoint.json")))

    moments = ["startup", "after_steps", "during_write", "after_write", "during_write", "after_write"]
    kills, caught_mid_write, resumed_from, log = 0, 0, [], []
    for moment in moments:
        w = Watcher(work)
        if moment == "startup":
            hit = w.wait_for(lambda: False, timeout=rng.uniform(1.0, 3.0)) or w.proc.poll() is None
        elif moment == "after_steps":
            target = rng.randint(1, 3)
            hit = w.wait_for(lambda t=target, w=w: w.losses >= t)
        elif moment == "during_write":
            hit = w.wait_for(incomplete_checkpoint_exists)
        else:
            before = complete_count()
            hit = w.wait_for(lambda b=before, w=w: complete_count() > b or (b >= 2 and w.losses >= 4))
        if hit and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)
            kills += 1
            caught_mid_write += moment == "during_write" and incomplete_checkpoint_exists()
        w.finish()
        resumed_from += [ln.split("resuming from ")[1].strip() for ln in w.lines if "resuming from " in ln]
        log.append(
            f"{moment}: killed={hit} after {w.losses} steps, on disk {sorted(p.name for p in run.glob('c*'))}"
        )
    # A checkpoint cut off mid-write by hand: newest by step, no marker, truncated weights.
    newest = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    fake = run / "checkpoint-999"
    shutil.copytree(newest, fake)
    (fake / "openseek_checkpoint.json").unlink()
    (fake / "model.safetensors").write_bytes(b"\0" * 100)
    w = Watcher(work)
    assert w.finish() == 0, w.output[-3000:]
    resumed_from += [ln.split("resuming from ")[1].strip() for ln in w.lines if "resuming from " in ln]
    assert kills >= 5, f"only {kills} kills landed"
    assert "removing incomplete checkpoint" in w.output and not fake.exists()
    assert all("checkpoint-999" not in p for p in resumed_from) and resumed_from
    print(
        "\n".join(log),
        f"\nkills: {kills}, caught mid-write: {caught_mid_write}, resumed from: {resumed_from}",
    )
    assert_same_weights(reference, run)


def test_a_run_restarted_after_its_last_checkpoint_writes_the_same_final_weights(reference, tmp_path):
    # The finished run minus final/: a kill after checkpoint-12 was complete, restarted with 0 steps left.
    work = tmp_path / "work"
    shutil.copytree(
        reference.parent.parent, work, symlinks=True, ignore=shutil.ignore_patterns("final", ".*")
    )
    run = work / "runs" / "tiny"
    w = Watcher(work)
    assert w.finish() == 0, w.output[-3000:]
    assert f"resuming from runs/tiny/checkpoint-{STEPS}" in w.output
    assert checkpoint_steps(run) == [9, 12], "trained past max_steps"
    assert_same_weights(reference, run)


def test_sigterm_saves_at_the_current_step_exits_3_and_the_restart_ends_identical(
    reference, prepared, tmp_path
):
    work = fresh(prepared, tmp_path)
    run = work / "runs" / "tiny"
    no_periodic = ("--set", "train.args.save_steps=100")
    w = Watcher(work, *no_periodic)
    assert w.wait_for(lambda: w.losses >= 5), w.output[-3000:]
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish() == EXIT_PREEMPTED, w.output[-3000:]
    steps = checkpoint_steps(run)
    # The signal lands during step 6 (or 7 if reading the log lagged a whole ~0.1 s step): saved there.
    assert len(steps) == 1 and 5 <= steps[0] <= 7, steps
    state = json.loads((run / f"checkpoint-{steps[0]}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps[0]
    assert (run / f"checkpoint-{steps[0]}" / "openseek_checkpoint.json").is_file()
    assert not (run / "final").exists()
    w = Watcher(work, *no_periodic)
    assert w.finish() == 0, w.output[-3000:]
    assert f"resuming from runs/tiny/checkpoint-{steps[0]}" in w.output
    assert_same_weights(reference, run)


def test_launcher_forwards_sigterm_to_both_ranks_and_returns_the_preempted_status(prepared, tmp_path):
    work = fresh(prepared, tmp_path)
    cmd = launch_cmd("--set", "train.args.save_steps=100", "--set", "train.args.max_steps=200")
    w = WatchedProcess(cmd, work)
    assert w.wait_for(lambda: w.losses >= 3, timeout=180), w.output[-3000:]
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish() == EXIT_PREEMPTED, w.output[-3000:]
    # The ranks' own line ends the output, with no torch ChildFailedError report above it.
    assert re.match(
        r"openseek-cpt train: preempted; saved .* \(rank \d\)$", w.output.strip().splitlines()[-1]
    )
    assert not [word for word in ("Traceback", "ChildFailedError", "=====") if word in w.output], w.output[
        -3000:
    ]
    steps = checkpoint_steps(work / "runs" / "tiny")
    assert len(steps) == 1 and 3 <= steps[0] <= 5, (steps, w.output[-2000:])
    ckpt = work / "runs" / "tiny" / f"checkpoint-{steps[0]}"
    assert (ckpt / "openseek_checkpoint.json").is_file()
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()


def test_two_process_run_resumed_after_its_first_epoch_ends_identical(prepared, tmp_path):
    """kill -9 of a 2-rank DDP run after a checkpoint in epoch 2, restart: same weights as uninterrupted.

    Under DDP the resumed epoch's sampler is wrapped twice by accelerate; this guards the epoch
    order of a resumed run past epoch 1 (12 steps per epoch at global batch 16 on 192 rows).
    """
    import os

    import psutil

    cmd = launch_cmd("--set", "train.global_batch_size=16", "--set", "train.args.max_steps=20",
                     "--set", "train.args.save_steps=13", "--set", "train.args.eval_strategy='no'")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    reference_work, work = fresh(prepared, tmp_path / "a"), fresh(prepared, tmp_path / "b")
    r = subprocess.run(cmd, cwd=reference_work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = work / "runs" / "tiny" / "checkpoint-13" / "openseek_checkpoint.json"
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 600
    while not marker.is_file() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in (
        tree
    ):  # the whole tree, as Slurm's cgroup would: the launcher puts the ranks in a session of their own
        p.kill()
    psutil.wait_procs(tree, timeout=60)
    assert marker.is_file(), "checkpoint-13 never completed"
    assert not (work / "runs" / "tiny" / "final").exists(), "killed too late: the run had finished"
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [line for line in (r.stdout + r.stderr).splitlines() if "resuming from" in line]
    assert resumed and resumed[0].endswith("runs/tiny/checkpoint-13"), resumed
    assert_same_weights(reference_work / "runs" / "tiny", work / "runs" / "tiny")


def test_a_two_rank_checkpoint_resumes_on_one_process_with_the_same_loss_curve(reference, prepared, tmp_path):
    """Another world size is fine on resume: grad accumulation keeps the global batch, data order is the stage's."""
    work = fresh(prepared, tmp_path)
    run = work / "runs" / "tiny"
    no_periodic = ("--set", "train.args.save_steps=100")
    w = WatchedProcess(launch_cmd(*no_periodic), work)
    assert w.wait_for(lambda: w.losses >= 3, timeout=180), w.output[-3000:]
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish() == EXIT_PREEMPTED, w.output[-3000:]
    [step] = checkpoint_steps(run)
    assert 3 <= step < STEPS, step
    w = Watcher(work, *no_periodic)  # one process: grad accumulation 2 instead of 2 ranks x 1
    assert w.finish() == 0, w.output[-3000:]
    assert f"checkpoint-{step} was written at world size 2; resuming at 1" in w.output, w.output[-3000:]
    one, resumed = step_losses(reference), step_losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in one:
        assert math.isclose(one[s], resumed[s], rel_tol=DDP_LOSS_RTOL), (s, one[s], resumed[s])


def test_a_rank_that_refuses_its_input_under_launch_ends_the_launch_with_its_one_line_and_exit_2(
    prepared, tmp_path
):
    """The rank's own line is printed last, with its code; no torch ChildFailedError report above it."""
    work = fresh_workdir(prepared, tmp_path)
    r = subprocess.run(
        launch_cmd("--set", "train.global_batch_size=3", "--set", "train.per_device_batch_size=1"),
        cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("openseek-cpt train: error: ") and "is not divisible by world_size=2" in last, last
    assert last.endswith("(rank 0)") or last.endswith("(rank 1)"), last
    assert not [w for w in ("Traceback", "ChildFailedError", "=====") if w in r.stdout + r.stderr], r.stderr[
        -3000:
    ]
