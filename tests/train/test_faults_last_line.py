"""Faults in real runs end with one line, last, and the exit code the docs promise: a rank of a real
2-rank `launch` killed with kill -9 (named with its signal and the log to read, no torch traceback),
and SIGTERM repeated right after a preemption save (still exit 3, not death by the signal)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, TINY_RECIPE, copy_workdir, fresh_workdir

from openseek_cpt.errors import EXIT_FAILURE, EXIT_PREEMPTED

# fp32: bf16 matmuls are slow on CPUs without AVX-512 bf16; the faults do not depend on precision.
DDP = REPO / "recipes" / "accelerate_configs" / "ddp.yaml"
LONG_RUN = ["train.args.max_steps=200", "train.args.save_steps=100", "train.args.eval_strategy='no'",
            "train.precision=fp32", f"train.accelerate_config={DDP}"]  # fmt: skip
TORCH_REPORT = ("Traceback", "ChildFailedError", "=====", "Root Cause")


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "faults")


class Run:
    """A real CLI process with stdout and stderr in files, so the test sees each stream's last line."""

    def __init__(self, work: Path, *args: str):
        sets = [a for s in LONG_RUN for a in ("--set", s)]
        cmd = [sys.executable, "-m", "openseek_cpt", *args, "--recipe", str(TINY_RECIPE), *sets]
        self.out, self.err = work / "stdout.txt", work / "stderr.txt"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=err)

    def steps(self) -> int:
        return self.out.read_text().count("'loss'")

    def wait_for_steps(self, n: int, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while self.steps() < n and self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert self.steps() >= n, self.err.read_text()[-3000:]

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout), self.err.read_text()


def test_a_rank_killed_by_kill_9_ends_the_launch_with_one_line_naming_rank_signal_and_log(prepared, tmp_path):
    run = Run(fresh_workdir(prepared, tmp_path), "launch", "--nproc", "2")
    run.wait_for_steps(2)
    [rank1] = [p for p in psutil.Process(run.proc.pid).children(recursive=True) if _rank_of(p) == "1"]
    rank1.kill()
    code, err = run.finish()
    assert code == EXIT_FAILURE, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"openseek-cpt launch: rank 1 (pid {rank1.pid}) was killed by signal 9 (SIGKILL)"
    ), last
    assert f"what it printed last is in {run.err}" in last, last  # the launcher's stderr is that file
    assert not [w for w in TORCH_REPORT if w in err], err[-4000:]


def _rank_of(process: psutil.Process) -> str | None:
    """The RANK a process of the launch was started with (None for the agent, or one already gone)."""
    try:
        return process.environ().get("RANK")
    except psutil.Error:
        return None


def test_sigterm_repeated_right_after_the_preemption_save_still_exits_3_with_its_line_last(
    prepared, tmp_path
):
    """The handlers stay until the process exits: a repeat (Slurm may signal again, or a user) right
    after the save, on the way out, is absorbed and the run exits 3 with its own line last."""
    run = Run(fresh_workdir(prepared, tmp_path), "train")
    run.wait_for_steps(1)
    run.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 300
    while "preempted: checkpoint at step" not in run.out.read_text() and time.monotonic() < end:
        assert run.proc.poll() is None, run.err.read_text()[-3000:]
        time.sleep(0.001)
    sent = 0
    while run.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            run.proc.send_signal(signal.SIGTERM)
            sent += 1
        time.sleep(0.002)
    code, err = run.finish()
    assert code == EXIT_PREEMPTED, (code, sent, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("openseek-cpt train: preempted; saved runs/tiny/checkpoint-"), last
    assert sent >= 1, sent
