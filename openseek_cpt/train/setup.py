"""Everything the run needs before the model is built: the train section checked against the
environment and the prepared dataset, TrainingArguments, the output dir claimed (rank 0) and the
resume point. What the stage knows of the data stage it reads from the dataset's manifest."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openseek_cpt.artifacts import checkpoints, prepared
from openseek_cpt.artifacts.atomic import check_output_dir
from openseek_cpt.artifacts.provenance import directory_fingerprint
from openseek_cpt.artifacts.run_lock import RunLock
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger, rank_and_world
from openseek_cpt.recipe.schema import RunRecord
from openseek_cpt.train import STAGE, fsdp
from openseek_cpt.train.config import (
    RunFacts,
    TrainConfig,
    bf16_supported,
    gradient_accumulation,
    training_arguments,
)

if TYPE_CHECKING:
    from transformers import TrainingArguments

log = get_logger(STAGE)


def process_rank() -> int:
    """This process's global rank (torchrun's RANK; 0 outside a launch): rank 0 speaks for the run."""
    return rank_and_world()[0]


@dataclasses.dataclass
class Setup:
    """Everything derived from the train section and the environment before the model is built."""

    train: TrainConfig
    record: RunRecord
    model_dir: str  # train.model_dir, resolved
    model_trust_remote_code: bool
    tokenizer_trust_remote_code: bool
    output_dir: Path
    dataset_dir: Path
    dataset_fingerprint: str
    world_size: int
    rank: int
    grad_accum: int
    args: TrainingArguments
    resume_from: Path | None
    manifest: dict[str, Any]
    keep: int | None = None  # train.args.save_total_limit: rotation is the stage's (after the marker)
    lock: RunLock | None = None  # rank 0 holds output_dir while it runs
    fsdp: bool = False  # the launch asks for FSDP (accelerate's FSDP config)

    def run_info(self, distributed_type: str) -> checkpoints.RunInfo:
        """What this run's checkpoint markers record (and what resume compares them with)."""
        return checkpoints.RunInfo(
            dataset_dir=str(self.dataset_dir),
            dataset_fingerprint=self.dataset_fingerprint,
            recipe_hash=self.record.hash(),
            world_size=self.world_size,
            distributed_type=distributed_type,
            global_batch_size=self.train.global_batch_size,
            precision=self.train.precision,
        )


def setup_run(
    train: TrainConfig,
    record: RunRecord,
    *,
    dataset_dir: str | Path,
    model_dir: str,
    model_trust_remote_code: bool = False,
    tokenizer_trust_remote_code: bool = True,
) -> Setup:
    """Check the section against the environment, build TrainingArguments, find the resume point."""
    import torch

    t = train
    dataset_dir = Path(dataset_dir)
    if not prepared.is_prepared(dataset_dir):
        raise UserError(
            f"train.dataset_dir: {str(dataset_dir)!r} is not a prepared dataset (no dataset_dict.json); "
            "run `openseek-cpt data` first or point train.dataset_dir at its output"
        )
    manifest = prepared.read_manifest(dataset_dir)
    rank, world_size = rank_and_world()
    grad_accum = gradient_accumulation(t.global_batch_size, world_size, t.per_device_batch_size)
    output_dir = Path(t.output_dir)
    check_output_dir(output_dir, stage=None, inputs=[dataset_dir, model_dir], field="train.output_dir")
    facts = RunFacts(
        record.seed, grad_accum, use_cpu=not torch.cuda.is_available(), has_bf16=bf16_supported()
    )
    args = training_arguments(t, facts)  # train.args errors before fingerprinting
    setup = Setup(
        train=t,
        record=record,
        model_dir=model_dir,
        model_trust_remote_code=model_trust_remote_code,
        tokenizer_trust_remote_code=tokenizer_trust_remote_code,
        output_dir=output_dir,
        dataset_dir=dataset_dir,
        dataset_fingerprint=directory_fingerprint(dataset_dir),
        world_size=world_size,
        rank=rank,
        grad_accum=grad_accum,
        args=args,
        resume_from=None,
        manifest=manifest,
        keep=t.keep,
        fsdp=fsdp.requested(),
    )
    if rank == 0:  # before anything in output_dir is touched: a running run's files are not ours
        setup.lock = RunLock.acquire(output_dir)
        swept = checkpoints.sweep(output_dir)
        if swept:
            log.info(
                f"removed {len(swept)} leftover(s) of killed writers: {', '.join(p.name for p in swept[:4])}"
            )
    if t.overwrite:
        if rank == 0:
            checkpoints.remove_all(output_dir)
    else:
        setup.resume_from = find_resume_checkpoint(setup)
    return setup


def find_resume_checkpoint(setup: Setup) -> Path | None:
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
            setup.run_info(kind),
            force_resume=setup.train.force_resume,
            accelerate_config=setup.train.accelerate_config,
        )
        if setup.rank == 0:
            for level, note in notes:
                log.log(level, note)
    return newest


def log_epoch_plan(setup: Setup, rows: int) -> float:
    """Log (rank 0) how many sequences and epochs the run will see; more than one epoch is a warning."""
    args = setup.args
    global_batch = setup.train.global_batch_size
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
    return epochs
