"""FSDP2 through the same `openseek-cpt launch --nproc 2` as DDP, with the shipped fsdp.yaml (CPU, gloo).

Why FSDP is switched on inside the ranks on CPU: `accelerate launch` with an FSDP config (and no
`--multi_gpu`, which the launcher now leaves out for FSDP) exports ACCELERATE_USE_FSDP and the
FSDP_* settings, but accelerate's AcceleratorState turns FSDP on only for GPU-type backends
(state.py: a MULTI_CPU run stays DDP), so there is no supported way on CPU. The train stage
(CPTTrainer.create_accelerator_and_postprocess) then gives the state the FSDP plugin that the same
environment describes, and the ranks run torch's `fully_shard` on gloo through the same stage code
the GPUs run. The ranks report it themselves (`rank R: FSDP2, N of M parameters are DTensors`).

12 optimizer steps of 8 sequences x 128 tokens; checkpoints every 3 steps, 2 kept (as test_train_run).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, TINY_RECIPE, WatchedProcess, assert_same_final_weights, copy_workdir, run_cli
from conftest import fresh_workdir as fresh
from safetensors.torch import load_file
from test_train_run import DDP_CONFIG, DDP_LOSS_RTOL, STEPS
from test_train_run import RUN as BASE

from openseek_cpt.artifacts import checkpoints

FSDP_CONFIG = str(REPO / "recipes" / "accelerate_configs" / "fsdp.yaml")
FSDP = [*BASE, "--set", f"train.accelerate_config={FSDP_CONFIG}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "fsdp")


def launch_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "openseek_cpt", "launch", "--recipe", str(TINY_RECIPE), "--nproc", "2",
            *FSDP, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(prepared, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted 2-rank FSDP run: (run dir, its output)."""
    work = fresh(prepared, tmp_path_factory.mktemp("fsdp-run"))
    r = subprocess.run(launch_cmd(), cwd=work, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return work / "runs" / "tiny", r.stdout + r.stderr


def step_losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_both_ranks_run_fsdp2_and_write_one_ddp_layout_copy_per_checkpoint(fsdp_run, prepared):
    from transformers import AutoModelForCausalLM

    run, output = fsdp_run
    for rank in (0, 1):  # said by each rank, from its own prepared model
        assert f"[train rank {rank}] FSDP2, " in output, output[-3000:]
    assert sorted(checkpoints.step_of(p) for p in checkpoints.list_checkpoints(run)) == [9, 12]
    base_keys = set(load_file(prepared / "models" / "tiny-openseek" / "model.safetensors"))
    for step in (9, 12):
        ckpt = run / checkpoints.name_for(step)
        marker = checkpoints.read_marker(ckpt)
        assert (marker["distributed_type"], marker["world_size"]) == ("FSDP", 2)
        assert checkpoints.status(ckpt).complete
        weights = [p.name for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")
                   and p.name != "training_args.bin"]  # fmt: skip
        # one copy of the weights (no pytorch_model_fsdp.bin), keys as a DDP save / the base model
        assert sorted(weights) == ["model.safetensors", "optimizer.bin", "scheduler.pt"], weights
        assert set(load_file(ckpt / "model.safetensors")) == base_keys
    model, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert set(load_file(run / "final" / "model.safetensors")) == base_keys


def test_fsdp_loss_curve_matches_ddp_within_the_ddp_tolerance(fsdp_run, prepared, tmp_path):
    work = fresh(prepared, tmp_path)
    ddp = [*BASE, "--set", f"train.accelerate_config={DDP_CONFIG}"]
    r = run_cli("launch", "--recipe", str(TINY_RECIPE), "--nproc", "2", *ddp, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameters, each held whole (not sharded)" in r.stdout + r.stderr  # the control: DDP
    two, fsdp = step_losses(work / "runs" / "tiny"), step_losses(fsdp_run[0])
    assert sorted(two) == sorted(fsdp) == list(range(1, STEPS + 1))
    worst = max(abs(two[s] - fsdp[s]) / two[s] for s in two)
    print(f"2 DDP ranks vs 2 FSDP ranks: max relative loss difference {worst:.2e} over {STEPS} steps")
    for step in two:
        assert math.isclose(two[step], fsdp[step], rel_tol=DDP_LOSS_RTOL), (step, two[step], fsdp[step])


def test_a_run_restarted_after_its_last_checkpoint_writes_the_same_final_weights(fsdp_run, tmp_path):
    # The finished run minus final/: a launch that died after checkpoint-12, restarted with 0 steps left.
    work = tmp_path / "work"
    shutil.copytree(fsdp_run[0].parent.parent, work, symlinks=True,
                    ignore=shutil.ignore_patterns("final", ".*"))  # fmt: skip
    run = work / "runs" / "tiny"
    r = subprocess.run(launch_cmd(), cwd=work, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"resuming from runs/tiny/checkpoint-{STEPS}" in r.stdout + r.stderr
    assert not (run / checkpoints.name_for(STEPS + 1)).exists(), "trained past max_steps"
    assert_same_final_weights(fsdp_run[0], run)


def rank_processes(pid: int) -> list[psutil.Process]:
    """accelerate launch and the ranks under launcher `pid` (processes may end while we look)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if "openseek_cpt" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


class Launch(WatchedProcess):
    """One `openseek-cpt launch` (2 FSDP ranks), output read in a thread."""

    def __init__(self, work: Path):
        super().__init__(launch_cmd(), work, ENV)


def test_kill_9_of_the_launcher_ends_its_ranks_and_restarts_end_bitwise_identical(
    fsdp_run, prepared, tmp_path
):
    work = fresh(prepared, tmp_path)
    run = work / "runs" / "tiny"
    rng = random.Random(13)

    def incomplete() -> bool:
        return any(not (p / checkpoints.MARKER).exists() for p in run.glob("checkpoint-*"))

    def complete_count() -> int:
        return len(list(run.glob(f"checkpoint-*/{checkpoints.MARKER}")))

    kills, log = 0, []
    for moment in ("after_steps", "during_write", "after_write"):
        w = Launch(work)
        if moment == "after_steps":
            target = rng.randint(2, 4)
            hit = w.wait_for(lambda t=target, w=w: w.losses >= t)
        elif moment == "during_write":
            hit = w.wait_for(incomplete)
        else:
            before = complete_count()
            hit = w.wait_for(lambda b=before: complete_count() > b)
        ranks = rank_processes(w.proc.pid)
        if hit and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)  # the launcher only: its ranks must follow by themselves
            kills += 1
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks still alive 30 s after kill -9 of the launcher: {alive}"
        w.proc.wait(timeout=60)
        w.thread.join(timeout=10)
        log.append(f"{moment}: killed={hit} after {w.losses} steps ({len(ranks)} rank processes ended), "
                   f"on disk {sorted(p.name for p in run.glob('c*'))}")  # fmt: skip
    w = Launch(work)
    assert w.proc.wait(timeout=900) == 0, "".join(w.lines)[-4000:]
    w.thread.join(timeout=10)
    print("\n".join(log))
    assert kills >= 3, log
    assert any("resuming from runs/tiny/checkpoint-" in line for line in w.lines)
    assert_same_final_weights(fsdp_run[0], run)


def test_soup_of_fsdp_checkpoints_equals_the_soup_of_the_same_weights_saved_by_ddp(
    fsdp_run, prepared, tmp_path
):
    from transformers import AutoModelForCausalLM

    work = fresh(prepared, tmp_path)
    fsdp_dir, ddp_dir = work / "runs" / "fsdp", work / "runs" / "ddp"
    shutil.copytree(fsdp_run[0], fsdp_dir, ignore=shutil.ignore_patterns("tensorboard", "final", ".*"))
    for ckpt in checkpoints.list_checkpoints(fsdp_dir):  # what a DDP rank 0 writes: save_pretrained
        target = ddp_dir / ckpt.name
        AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(target)
        info = {k: v for k, v in checkpoints.read_marker(ckpt).items() if k != "files"}
        checkpoints.write_marker(target, {**info, "distributed_type": "MULTI_CPU"})
    soups = {}
    for name, run in (("fsdp", fsdp_dir), ("ddp", ddp_dir)):
        out = f"models/soup-{name}"
        r = run_cli("soup", "--recipe", str(TINY_RECIPE), "--set", f"soup.checkpoints=[{run}/checkpoint-*]",
                    "--set", f"soup.output_dir={out}", "--set", "soup.evaluate=false", cwd=work)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        soups[name] = {p.name: load_file(p) for p in (work / out).glob("*.safetensors")}
    assert soups["fsdp"].keys() == soups["ddp"].keys() and soups["fsdp"]
    for shard, tensors in soups["fsdp"].items():
        assert tensors.keys() == soups["ddp"][shard].keys()
        assert all(torch.equal(tensors[k], soups["ddp"][shard][k]) for k in tensors), shard
