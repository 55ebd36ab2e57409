"""Non-finite numbers stop training: a diverged run (huge learning rate) ends with exit 2 and one line
naming the step and what went non-finite, before any save of it; `train.max_nonfinite_steps` skips that
many consecutive bad updates; weights that are not finite are never saved as a complete checkpoint."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RECIPE, copy_workdir, run_cli
from safetensors.torch import load_file

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError
from openseek_cpt.train.setup import setup_run
from openseek_cpt.train.stage import FINAL_SUBDIR, build_trainer, save_final

DIVERGE = ["train.args.learning_rate=1.0e4", "train.args.max_steps=16", "train.args.save_steps=1",
           "train.args.save_total_limit=null", "train.args.eval_strategy='no'"]  # fmt: skip
ERROR = re.compile(r"^openseek-cpt train: error: train: step (\d+): the (loss and grad norm|grad norm|loss) ")


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "nonfinite")


def _train(prepared: Path, out: str, *sets: str):
    sets = (*DIVERGE, f"train.output_dir={out}", *sets)
    return run_cli(
        "train", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)], cwd=prepared
    )


def _error_line(r) -> tuple[int, str]:
    """The one error line of a stopped run: (step, the whole line)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("openseek-cpt train: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == lines[0], r.stderr[-3000:]  # last: no progress bar after it
    m = ERROR.match(lines[0])
    assert m, lines[0]
    return int(m.group(1)), lines[0]


def _complete_weights(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """step -> weights of every complete checkpoint, each asserted finite."""
    out = {}
    for ckpt in checkpoints.list_checkpoints(run):
        if checkpoints.status(ckpt).complete:
            weights = load_file(ckpt / "model.safetensors")
            bad = [k for k, t in weights.items() if not torch.isfinite(t).all()]
            assert not bad, f"{ckpt} is marked complete with {len(bad)} non-finite tensors: {bad[:3]}"
            out[checkpoints.step_of(ckpt)] = weights
    return out


def test_a_diverged_run_stops_before_saving_the_bad_step_with_one_line_and_exit_2(prepared):
    r = _train(prepared, "runs/diverged")
    step, line = _error_line(r)
    run = prepared / "runs" / "diverged"
    complete = _complete_weights(run)
    assert not (run / FINAL_SUBDIR).exists()
    assert max(complete, default=0) < step  # nothing of the bad step (or after) was saved
    last = f"runs/diverged/checkpoint-{step - 1}" if step - 1 in complete else "none"
    assert f"last complete checkpoint: {last} " in line, line
    assert "train.max_nonfinite_steps=0" in line, line


def test_max_nonfinite_steps_skips_that_many_consecutive_bad_updates_then_stops(prepared):
    first_bad, _ = _error_line(_train(prepared, "runs/strict"))
    tolerated = 2
    r = _train(prepared, "runs/tolerant", f"train.max_nonfinite_steps={tolerated}")
    step, line = _error_line(r)
    # The weights that diverged stay as they were: every later step is non-finite too.
    assert step == first_bad + tolerated, (first_bad, line)
    assert (r.stdout + r.stderr).count("update skipped") == tolerated, r.stderr[-3000:]
    assert f"{tolerated + 1} consecutive" in line, line
    # A skipped step leaves the weights as they were (the router bias, balanced outside the
    # optimizer, still moves by its rate).
    complete = _complete_weights(prepared / "runs" / "tolerant")
    before = complete[first_bad - 1]
    for skipped in range(first_bad, step):
        same = [k for k in before if "e_score_correction_bias" not in k]
        assert all(torch.equal(complete[skipped][k], before[k]) for k in same), skipped


@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_every_rank_of_a_diverged_launch_stops_at_the_same_step(prepared, config):
    """The ranks agree (the loss may differ per rank): each one stops with the same line, none waits."""
    accelerate = REPO / "recipes" / "accelerate_configs" / f"{config}.yaml"
    sets = (*DIVERGE, f"train.output_dir=runs/{config}", f"train.accelerate_config={accelerate}")
    r = run_cli("launch", "--recipe", str(TINY_RECIPE), "--nproc", "2", *[a for s in sets for a in ("--set", s)],
                cwd=prepared, timeout=600)  # fmt: skip
    assert r.returncode != 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    # Each rank printed the stage's line (none was killed waiting), then the launcher repeated one last.
    found = list(re.finditer(ERROR.pattern.lstrip("^"), out, re.MULTILINE))
    assert len(found) == 3 and r.stderr.strip().splitlines()[-1].startswith(found[-1].group(0)), out[-4000:]
    assert r.returncode == 2 and "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    steps = {int(m.group(1)) for m in found}
    assert len(steps) == 1, out[-4000:]  # one verdict
    run = prepared / "runs" / config
    assert max(_complete_weights(run), default=0) < steps.pop()
    assert not (run / FINAL_SUBDIR).exists()


def test_weights_that_are_not_finite_are_never_saved_as_a_complete_checkpoint_or_final(prepared, monkeypatch):
    monkeypatch.chdir(prepared)
    recipe = load_recipe(TINY_RECIPE, ["train.args.eval_strategy='no'", "train.output_dir=runs/nan-weights"])
    setup = setup_run(**recipe.stage_args("train"))
    try:
        trainer = build_trainer(setup)
        trainer.create_optimizer_and_scheduler(num_training_steps=8)  # what train() builds first
        trainer.state.global_step = 3
        trainer._save_checkpoint(trainer.model, None)  # finite: saved and marked complete
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = math.nan
        trainer.state.global_step = 4
        with pytest.raises(UserError, match=r"step 4: the weights are not finite .*checkpoint-3"):
            trainer._save_checkpoint(trainer.model, None)
        with pytest.raises(UserError, match=r"step 4: the weights are not finite"):
            save_final(setup, trainer)
    finally:
        setup.lock.release()
    run = prepared / "runs" / "nan-weights"
    assert [c.name for c in checkpoints.list_checkpoints(run) if checkpoints.status(c).complete] == [
        "checkpoint-3"
    ]
    assert not (run / FINAL_SUBDIR).exists()
