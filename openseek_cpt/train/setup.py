"""Everything the run needs before the model is built: the recipe checked against the environment
and the prepared dataset, TrainingArguments, the output dir claimed (rank 0) and the resume point."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts import checkpoints, prepared
from openseek_cpt.artifacts.atomic import check_output_dir
from openseek_cpt.artifacts.provenance import directory_fingerprint
from openseek_cpt.artifacts.run_lock import RunLock
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger, rank_and_world
from openseek_cpt.recipe.schema import Recipe
from openseek_cpt.train import STAGE, fsdp
from openseek_cpt.train.training_args import build_training_args, gradient_accumulation

log = get_logger(STAGE)


def process_rank() -> int:
    """This process's global rank (torchrun's RANK; 0 outside a launch): rank 0 speaks for the run."""
    return rank_and_world()[0]


@dataclasses.dataclass
class Setup:
    """Everything derived from the recipe and the environment before the model is built."""

    output_dir: Path
    dataset_dir: Path
    dataset_fingerprint: str
    world_size: int
    rank: int
    grad_accum: int
    args: Any  # transformers.TrainingArguments
    resume_from: Path | None
    manifest: dict[str, Any]
    keep: int | None = None  # train.args.save_total_limit: rotation is the stage's (after the marker)
    lock: RunLock | None = None  # rank 0 holds output_dir while it runs
    fsdp: bool = False  # the launch asks for FSDP (accelerate's FSDP config)

    def run_info(self, recipe: Recipe, distributed_type: str) -> checkpoints.RunInfo:
        """What this run's checkpoint markers record (and what resume compares them with)."""
        return checkpoints.RunInfo(
            dataset_dir=str(self.dataset_dir),
            dataset_fingerprint=self.dataset_fingerprint,
            recipe_hash=recipe.hash(),
            world_size=self.world_size,
            distributed_type=distributed_type,
            global_batch_size=recipe.train.global_batch_size,
            precision=recipe.train.precision,
        )


def setup_run(recipe: Recipe) -> Setup:
    """Validate the recipe against the environment, build TrainingArguments, find the resume point."""
    t = recipe.train
    dataset_dir = Path(recipe.train_dataset_dir)
    if not prepared.is_prepared(dataset_dir):
        raise UserError(
            f"train.dataset_dir: {str(dataset_dir)!r} is not a prepared dataset (no dataset_dict.json); "
            "run `openseek-cpt data` first or point train.dataset_dir at its output"
        )
    manifest = prepared.read_manifest(dataset_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    grad_accum = gradient_accumulation(t.global_batch_size, world_size, t.per_device_batch_size)
    user_args = dict(t.args)
    overwrite = bool(user_args.pop("overwrite_output_dir", False))
    # Deviation: Trainer rotates inside _save_checkpoint, before our marker makes the new checkpoint
    # complete (a kill there can leave none complete); the stage rotates after the marker instead.
    keep = user_args.pop("save_total_limit", None)
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise UserError(
            f"train.args.save_total_limit={keep!r} must be an integer >= 1 (or null to keep every checkpoint)"
        )
    output_dir = Path(t.output_dir)
    check_output_dir(
        output_dir, stage=None, inputs=[dataset_dir, recipe.train_model_dir], field="train.output_dir"
    )
    args = build_training_args(recipe, user_args, grad_accum)  # train.args errors before fingerprinting
    setup = Setup(
        output_dir=output_dir,
        dataset_dir=dataset_dir,
        dataset_fingerprint=directory_fingerprint(dataset_dir),
        world_size=world_size,
        rank=rank,
        grad_accum=grad_accum,
        args=args,
        resume_from=None,
        manifest=manifest,
        keep=keep,
        fsdp=fsdp.requested(),
    )
    if rank == 0:  # before anything in output_dir is touched: a running run's files are not ours
        setup.lock = RunLock.acquire(output_dir)
        swept = checkpoints.sweep(output_dir)
        if swept:
            log.info(
                f"removed {len(swept)} leftover(s) of killed writers: {', '.join(p.name for p in swept[:4])}"
            )
    if overwrite:
        if rank == 0:
            checkpoints.remove_all(output_dir)
    else:
        setup.resume_from = find_resume_checkpoint(recipe, setup)
    return setup


def find_resume_checkpoint(recipe: Recipe, setup: Setup) -> Path | None:
    """The newest complete checkpoint whose files match their content hashes, checked against this
    run; rank 0 first removes incomplete ones, and then each one whose contents are damaged.

    Every rank verifies the hashes itself (no process group exists yet to share rank 0's answer);
    the answer depends only on the files, so every rank resumes from the same checkpoint.
    """
    if setup.rank == 0:
        for ckpt, why in checkpoints.remove_incomplete(setup.output_dir):
            log.warning(f"removing incomplete checkpoint {ckpt} ({why})")
        for ckpt, why in checkpoints.misnamed(setup.output_dir):
            log.warning(f"ignoring {ckpt} ({why}): it is never resumed from nor rotated; rename or remove it")
    newest, state, rejected = checkpoints.newest_verified(setup.output_dir, remove=setup.rank == 0)
    if setup.rank == 0:
        for ckpt, why in rejected:
            log.warning(f"removing damaged checkpoint {ckpt} ({why})")
        if newest is not None and state.unhashed:
            log.info(
                f"{newest}: its {checkpoints.MARKER} records no content hashes (written by an older "
                "openseek-cpt); resuming without checking its contents"
            )
    if newest is not None:
        kind = "FSDP" if setup.fsdp else "DDP"
        notes = checkpoints.check_resume(
            newest,
            setup.run_info(recipe, kind),
            force_resume=recipe.train.force_resume,
            accelerate_config=recipe.train.accelerate_config,
        )
        if setup.rank == 0:
            for level, note in notes:
                log.log(level, note)
    return newest


def log_epoch_plan(recipe: Recipe, setup: Setup, rows: int) -> float:
    """Log (rank 0) how many sequences and epochs the run will see; more than one epoch is a warning."""
    args = setup.args
    global_batch = recipe.train.global_batch_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(rows / global_batch) * args.num_train_epochs
    seen = int(steps * global_batch)
    epochs = seen / rows
    if setup.rank != 0:
        return epochs
    unseen = max(rows - seen, 0)
    log.info(
        f"the run sees {seen} sequences ({steps} steps x {global_batch}) of {rows} prepared rows: "
        f"{epochs:.3f} epochs; {unseen} rows ({unseen / rows:.1%}) never seen"
    )
    if epochs > 1:
        log.warning(
            f"the run repeats the data {epochs:.2f}x (each epoch a new permutation of the same {rows} rows); "
            f"for one epoch set data.total_sample_size >= {seen} and rerun `openseek-cpt data`"
        )
    prepared_rows = (setup.manifest.get("totals") or {}).get("train_rows")
    if prepared_rows is not None and recipe.data.total_sample_size != prepared_rows:
        log.warning(
            f"data.total_sample_size={recipe.data.total_sample_size} but {setup.dataset_dir} holds "
            f"{prepared_rows} train rows (prepared with another recipe)"
        )
    return epochs
