"""`openseek-cpt tiny`: the whole pipeline on a CPU in minutes, with nothing downloaded.

Runs each stage as its own `openseek-cpt STAGE` process in `workdir`, exactly as a user (or the
Slurm scripts) would, so the stages meet only through the artifacts on disk:
tiny-assets -> download -> data -> train -> soup (with evaluation) -> report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from openseek_cpt.artifacts.atomic import check_output_dir
from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.shipped import find_shipped

log = get_logger("tiny")


def default_recipe() -> Path:
    """The tiny recipe: from the checkout (or $OPENSEEK_CPT_HOME, set in the image)."""
    relative = Path("recipes", "tiny", "config.yaml")
    if found := find_shipped(relative) or (
        (Path.cwd() / relative) if (Path.cwd() / relative).is_file() else None
    ):
        return found
    raise UserError(
        "tiny: recipes/tiny/config.yaml not found; pass --recipe or set OPENSEEK_CPT_HOME to the repo"
    )


def run(recipe_path: str | None, overrides: list[str], workdir: str | Path = ".") -> Path:
    """Run every stage of the tiny recipe in `workdir`; returns the report path."""
    recipe_file = Path(recipe_path).resolve() if recipe_path else default_recipe()
    check_output_dir(workdir, stage=None, field="tiny --workdir")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(recipe_file, overrides)  # its paths stay relative: to `workdir` below
    recipe.train.check_accepted()  # the pipeline trains: refuse its train.args before any stage runs
    log_dir = workdir / "logs" / "tiny"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = ["--recipe", str(recipe_file), *[a for o in overrides for a in ("--set", o)]]
    assets_root = Path(recipe.assets.base_model).parent.parent  # models/tiny/hub/tiny-openseek -> models/tiny
    started = time.perf_counter()
    log.info(f"recipe {recipe_file}")
    log.info(f"workdir {workdir} (stage logs in {log_dir})")
    _stage("tiny-assets", ["--out", str(assets_root)], workdir, log_dir)
    for stage in ("download", "data", "train", "soup"):
        _stage(stage, common, workdir, log_dir)

    from openseek_cpt.report import write_report

    report = write_report(
        workdir / recipe.train.output_dir, workdir / recipe.data.output_dir, workdir / recipe.soup.output_dir
    )
    _print_summary(workdir, recipe, report, time.perf_counter() - started)
    return report


def _stage(name: str, args: list[str], workdir: Path, log_dir: Path) -> None:
    """Run one stage as a subprocess, its output in a log file; on failure show the log's tail."""
    log_path = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as stage_log:
        proc = subprocess.run(
            [sys.executable, "-m", "openseek_cpt", name, *args],
            cwd=workdir,
            env=env,
            stdout=stage_log,
            stderr=subprocess.STDOUT,
        )
    log.info(f"{name:<11} {'done' if proc.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
        raise SystemExit(proc.returncode)


def _print_summary(workdir: Path, recipe, report: Path, seconds: float) -> None:
    merge_info = read_json(workdir / recipe.soup.output_dir / "merge_info.json") or {}
    from openseek_cpt.evaluation import format_eval_table

    log.info(f"finished in {seconds:.0f} s")
    if merge_info.get("evaluation"):
        log.info(format_eval_table(merge_info["evaluation"]))
    for label, rel in (
        ("base model", recipe.assets.model_dir),
        ("dataset", recipe.data.output_dir),
        ("checkpoints", recipe.train.output_dir),
        ("soup", recipe.soup.output_dir),
    ):
        log.info(f"{label:<12} {workdir / rel}")
    log.info(f"report       {report}")
