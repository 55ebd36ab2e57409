"""The stages as users submit them (`make data|train|soup`) on a real two-node Slurm cluster (CPU, gloo).

The cluster is Debian's slurm-wlm started by tests/cluster/slurm_cluster.py (two slurmd on this host). Every
job is submitted by the Makefile exactly as on a GPU cluster, with RUNTIME=none (the venv on PATH)
and GPUS_PER_NODE=0. Training runs 2 nodes x 1 process at the tiny recipe's global batch (8), and
is compared with a single-process run and with itself after a requeue; a time-limit signal is shown
saving, requeueing and resuming an open-ended run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch
from conftest import REPO, TINY_RECIPE, assert_same_final_weights, clean_make_env
from safetensors.torch import load_file

# The train stage's own tolerance for 2 gloo processes vs 1 process at the same global batch; an
# import error fails the module (it never falls back to a looser tolerance).
from tests.train.test_train_run import DDP_LOSS_RTOL

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        bool(slurm_cluster.missing_requirements()), reason=str(slurm_cluster.missing_requirements())
    ),
]

DDP_CONFIG = REPO / "recipes" / "accelerate_configs" / "ddp.yaml"
# Long enough for a requeue at step 8 to land mid-run, on a fast machine too.
STEPS = 48
SAVE_STEPS = STEPS // 4  # the tiny recipe keeps 4 checkpoints


def train_set(steps: int, save_steps: int, eval_steps: int) -> str:
    return (
        f"train.accelerate_config={DDP_CONFIG} train.args.max_steps={steps} train.args.save_steps={save_steps} "
        f"train.args.eval_steps={eval_steps} train.args.logging_steps=1"
    )


SET = train_set(STEPS, SAVE_STEPS, STEPS // 2)
# The time-limit run has no end of its own: Slurm checks time limits only every 30 s, so when its
# signal lands depends on the machine's speed; the test cancels it once it has resumed.
OPEN_ENDED = train_set(10**6, 10**6, 10**6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.running_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def make(
    target: str, work: Path, cluster=None, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`make -f REPO/Makefile TARGET` in `work`, as a user would type it (RECIPE = the tiny recipe)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env = clean_make_env(env)
    if cluster is not None:
        env.update(cluster.env)
    else:  # no Slurm on PATH's sbatch lookup needed: LOCAL=1 runs the stage here
        args = ("LOCAL=1", *args)
    cmd = ["make", "-s", "-f", str(REPO / "Makefile"), target, f"RECIPE={TINY_RECIPE}", "RUNTIME=none",
           "GPUS_PER_NODE=0", f"VENV={Path(sys.executable).parent.parent}", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def copy_work(src: Path, dst: Path, *ignore: str) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*ignore))
    return dst


@pytest.fixture(scope="module")
def prepared(tiny_assets_dir, tmp_path_factory) -> Path:
    """The tiny assets plus the dataset made by `make data LOCAL=1`."""
    work = copy_work(tiny_assets_dir, tmp_path_factory.mktemp("slurm-work") / "work")
    r = make("data", work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return work


@pytest.fixture(scope="module")
def two_node_run(cluster, prepared, tmp_path_factory) -> tuple[Path, str]:
    """`make train SLURM_NODES=2 WAIT=1`, uninterrupted: (workdir, job id)."""
    work = copy_work(prepared, tmp_path_factory.mktemp("two-node") / "work", "runs", "logs")
    r = make("train", work, cluster, "SLURM_NODES=2", "WAIT=1", f"SET={SET}")
    job = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"
    assert r.returncode == 0, f"{r.stdout[-2000:]}{r.stderr[-2000:]}\n{job_log(work, job)[-4000:]}"
    return work, job


def job_log(work: Path, job: str) -> str:
    logs = list((work / "logs").glob(f"*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else f"(no log for job {job})"


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def final_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "runs" / "tiny" / "final" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    """The final weights of the tiny runs of two workdirs are bitwise equal."""
    assert_same_final_weights(a / "runs" / "tiny", b / "runs" / "tiny")


def test_make_train_on_two_nodes_runs_one_process_per_node_and_matches_one_process(
    two_node_run, prepared, tmp_path
):
    work, job = two_node_run
    log = job_log(work, job)
    worlds = re.findall(r"\[launch\] World\(num_machines=(\d+), machine_rank=(\d+), num_processes=(\d+)", log)
    assert sorted(worlds) == [("2", "0", "2"), ("2", "1", "2")], log[-3000:]
    run = work / "runs" / "tiny"
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == [
        SAVE_STEPS,
        2 * SAVE_STEPS,
        3 * SAVE_STEPS,
        STEPS,
    ]
    marker = json.loads((run / f"checkpoint-{STEPS}" / "openseek_checkpoint.json").read_text())
    assert marker["world_size"] == 2 and marker["global_batch_size"] == 8
    assert (run / "final" / "model.safetensors").is_file()

    single = copy_work(prepared, tmp_path / "single", "runs", "logs")
    r = make("train", single, None, f"SET={SET}")  # LOCAL=1: `openseek-cpt launch`, one process here
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "num_processes=1" in r.stdout
    one, two = step_losses(single / "runs" / "tiny"), step_losses(run)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=DDP_LOSS_RTOL), (step, one[step], two[step])


def submit(cluster, work: Path, *args: str, settings: str = SET) -> str:
    r = make("train", work, cluster, "SLURM_NODES=2", f"SET={settings}", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


def wait_for_losses(cluster, work: Path, job: str, count: int, timeout: float = 300) -> None:
    """Until the running job has logged `count` training steps (so it is mid-run, past startup)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_log(work, job).count("'loss'") >= count:
            return
        assert cluster.job_state(job) in {"PENDING", "RUNNING", "CONFIGURING"}, job_log(work, job)[-3000:]
        time.sleep(0.2)
    raise AssertionError(
        f"job {job}: fewer than {count} steps after {timeout}s\n{job_log(work, job)[-3000:]}"
    )


def wait_requeued(cluster, job: str, timeout: float = 120, **updates: str) -> None:
    """Until Slurm has put the job back in the queue; then apply `updates` before it starts again.

    Slurm starts it about 20 s later (cred_expire=10); forcing StartTime=now sooner gets the batch
    killed with "Job credential revoked".
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.job_state(job) == "PENDING" and cluster.job_field(job, "Restarts") not in (None, "0"):
            if updates:
                cluster.run("scontrol", "update", f"JobId={job}", *(f"{k}={v}" for k, v in updates.items()))
            return
        time.sleep(0.2)
    raise AssertionError(
        f"job {job} was not requeued within {timeout}s: {cluster.job_state(job)}\n{cluster.logs()}"
    )


def assert_completes(cluster, work: Path, job: str, timeout: float = 600) -> None:
    """The job ends COMPLETED within `timeout`; otherwise the failure shows the job's own log too."""
    try:
        state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- job log\n{job_log(work, job)[-6000:]}") from None
    assert state == "COMPLETED", job_log(work, job)[-6000:]


def assert_resumed_mid_run(log: str) -> int:
    resumed = [int(s) for s in re.findall(r"resuming from runs/tiny/checkpoint-(\d+)", log)]
    assert resumed and 0 < resumed[0] < STEPS, log[-4000:]
    assert "restart 1 on" in log and "step exited with 0" in log.split("restart 1 on")[1], log[-4000:]
    return resumed[0]


def test_scontrol_requeue_mid_run_resumes_from_the_saved_step_with_identical_final_weights(
    cluster, two_node_run, prepared, tmp_path
):
    work = copy_work(prepared, tmp_path / "work", "runs", "logs")
    job = submit(cluster, work)
    wait_for_losses(cluster, work, job, 8)  # still in the first epoch (24 steps) when the TERM lands
    cluster.run("scontrol", "requeue", job)
    wait_requeued(cluster, job)
    assert_completes(cluster, work, job)
    log = job_log(work, job)
    assert "received signal 15: saving at the end of this step" in log
    step = assert_resumed_mid_run(log)
    assert step >= 8  # saved on TERM at the step it had reached, not the last periodic checkpoint
    assert_same_weights(two_node_run[0], work)


def test_time_limit_signal_saves_requeues_and_resumes_from_the_step_it_saved(cluster, prepared, tmp_path):
    """Exact resume after a requeue is proven above; here the time-limit path: USR1 before the limit,
    the save at the step reached, the batch script's requeue, the next run resuming from that save."""
    work = copy_work(prepared, tmp_path / "work", "runs", "logs")
    job = submit(cluster, work, "TIME=10", "SIGNAL_BEFORE=60", settings=OPEN_ENDED)
    wait_for_losses(cluster, work, job, 5)
    # Shorten the limit to (elapsed + 70 s): `--signal=B:USR1@60` is then due now, and Slurm sends it
    # at its next time-limit check (every 30 s), while the job still has time to save and requeue itself.
    elapsed = int(
        time.time() - time.mktime(time.strptime(cluster.job_field(job, "StartTime"), "%Y-%m-%dT%H:%M:%S"))
    )
    limit = elapsed + 70
    cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={limit // 60}:{limit % 60:02d}")
    wait_requeued(cluster, job, TimeLimit="10")  # the requeued run gets its 10 minutes back
    deadline = time.monotonic() + 300
    while not re.search(r"resuming from runs/tiny/checkpoint-\d+(.|\n)*'loss'", job_log(work, job)):
        assert time.monotonic() < deadline, job_log(work, job)[-4000:]
        assert cluster.job_state(job) in {"PENDING", "RUNNING", "CONFIGURING"}, job_log(work, job)[-4000:]
        time.sleep(0.5)
    cluster.run("scancel", job)
    log = job_log(work, job)
    assert "USR1 received" in log and "requeueing job" in log, log[-4000:]
    assert "received signal 10: saving at the end of this step" in log, log[-4000:]
    resumed = [int(n) for n in re.findall(r"resuming from runs/tiny/checkpoint-(\d+)", log)]
    assert resumed and resumed[0] >= 5 and "restart 1 on" in log, log[-4000:]  # the step it reached


@pytest.mark.parametrize("stage", ["data", "soup"])
def test_make_data_and_soup_through_sbatch_match_local_runs(stage, cluster, two_node_run, prepared, tmp_path):
    """The same command, once submitted and once LOCAL=1, writes the same artifact files (the local
    data run is the `prepared` fixture's `make data LOCAL=1`)."""
    src = two_node_run[0]
    outputs = {}
    modes = ("sbatch", "local")
    if stage == "data":
        outputs["local"] = json.loads((prepared / "datasets" / "tiny-mix" / "provenance.json").read_text())
        modes = ("sbatch",)
    for mode in modes:
        work = copy_work(
            src, tmp_path / mode, "logs", *(["datasets"] if stage == "data" else ["tiny-openseek-soup"])
        )
        if mode == "sbatch":
            r = make(stage, work, cluster, "WAIT=1")
            job = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + job_log(work, job)[-3000:]
            assert f"openseek-cpt {stage} --recipe" in job_log(work, job)
        else:
            r = make(stage, work)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out = work / ("datasets/tiny-mix" if stage == "data" else "models/tiny-openseek-soup")
        outputs[mode] = json.loads((out / "provenance.json").read_text())
    sbatch_files, local_files = outputs["sbatch"]["files"], outputs["local"]["files"]
    assert sbatch_files.keys() == local_files.keys()
    differ = [name for name in sbatch_files if sbatch_files[name] != local_files[name]]
    assert not [d for d in differ if d not in TIMING_FILES], differ
    assert any(name.endswith((".arrow", ".safetensors")) for name in sbatch_files)


TIMING_FILES = {"merge_info.json"}  # records wall-clock seconds; the tensors and data files must match
