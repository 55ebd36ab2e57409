"""Stage 2, train: continued pretraining of the base model on the prepared dataset with HF Trainer.

Reads top-down: `run` (setup: train section -> TrainingArguments, world size, resume point) ->
`build_trainer` (model, data, trainer) -> `train_or_preempt` (train, final save, or the preemption
checkpoint). The pieces, one concern each: `config`, `setup`, `model`, `trainer`, `sampler`,
`fsdp`, `preemption`, `callbacks/`; the checkpoint lifecycle is `artifacts.checkpoints`, how a rank
ends (its one line, its code, the bounded teardown) is `rank_exit`.

What it guarantees, and where the HF stack needed help (each marked where it is done):
- documents never attend to each other: `PackedCollator` resets `position_ids` per document and
  the model runs with `use_cache=False` (with a cache, transformers' mask builder ignores the
  position resets); tests/train/test_train_units.py runs exactly that path;
- `bf16-mixed` (default) keeps fp32 master weights and optimizer state under bf16 autocast;
  `bf16-pure` loads bf16 weights (about half the memory of the weights+Adam state, but Adam
  updates below half a bf16 ulp are lost: see tests/train/test_train_units.py); on CPU, torch's
  CPU autocast runs bf16, so bf16 works there too; a CUDA GPU without bf16 is a UserError;
- the global batch is in sequences; gradient accumulation = global / (world x per_device);
- data order is a fixed permutation per epoch seeded by (seed, epoch), so a resumed run (Trainer
  skips the batches already seen) gets exactly the batches an uninterrupted one would;
- a checkpoint is complete only once its marker (`checkpoints.write_marker`: written last,
  atomically, by rank 0 after a barrier) lists its files with their sizes; resume picks the newest
  complete one and removes incomplete ones; the marker records the dataset fingerprint, recipe
  hash, distributed type and world size; another dataset is refused unless `train.force_resume`,
  FSDP <-> DDP is refused (their optimizer files differ), another world size is fine;
- the lifecycle is the stage's: `save_total_limit` rotation runs after the new marker and deletes
  only older complete checkpoints (the newest complete one always survives); rank 0 holds a lock
  on output_dir (a second writer is refused, naming the holder) and sweeps dead writers' leftovers;
- resume loads the model weights through `from_pretrained` (the stock resume leaves the fused MoE
  experts of native deepseek_v3 random: per-expert keys on disk, fused tensors in memory);
- FSDP2 (the recipe's accelerate config): one copy of the weights per checkpoint, in the DDP
  layout (`model.safetensors`), the optimizer state gathered (`optimizer.bin`); final save and
  checkpoints gather on every rank; on CPU the FSDP plugin is given to accelerate's state by hand;
- SIGTERM/SIGUSR1 -> save at the end of the current optimizer step (or right after the running
  evaluation; a save in progress is the preemption save), raise `errors.Preempted` (the CLI exits
  EXIT_PREEMPTED). Under `openseek-cpt launch`, a rank exits when the launcher is gone.

`train.args` goes to `transformers.TrainingArguments`, except the keys in config.py's DERIVED_ARGS,
which the stage sets from the recipe (giving one is a UserError naming the recipe key to use
instead), and `overwrite_output_dir: true` (not a TrainingArguments field in transformers 5), which
means: delete the checkpoints in output_dir and start from the base model.
"""

from __future__ import annotations

from pathlib import Path

from openseek_cpt.artifacts import prepared
from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.provenance import write_provenance
from openseek_cpt.errors import EXIT_OK, EXIT_PREEMPTED, Preempted, UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.modeling import attention, router_balance
from openseek_cpt.modeling.collator import PackedCollator
from openseek_cpt.rank_exit import exit_with_launcher, leave_process_group
from openseek_cpt.recipe.schema import RunRecord
from openseek_cpt.train import STAGE, fsdp, preemption
from openseek_cpt.train.callbacks.sharding import ShardingReport
from openseek_cpt.train.callbacks.throughput import ThroughputCallback
from openseek_cpt.train.config import TrainConfig
from openseek_cpt.train.full_disk import named_when_full
from openseek_cpt.train.model import check_vocab, load_model
from openseek_cpt.train.setup import Setup, log_epoch_plan, setup_run
from openseek_cpt.train.trainer import CPTTrainer

TENSORBOARD_SUBDIR = "tensorboard"
FINAL_SUBDIR = "final"

log = get_logger(STAGE)


def run(
    train: TrainConfig,
    record: RunRecord,
    *,
    dataset_dir: str,
    model_dir: str,
    model_trust_remote_code: bool = False,
    tokenizer_trust_remote_code: bool = True,
) -> Path:
    """Train on this process's rank; returns the run's output dir (with `final/`).

    From outside its section the stage takes the prepared dataset and the base model (resolved
    paths, how the model and its tokenizer load) and the run record; what it knows of the data
    stage it reads from the dataset's manifest. Raises `errors.Preempted(checkpoint)` after a
    signal-triggered save (the CLI maps it to EXIT_PREEMPTED, the requeue code).
    """
    exit_with_launcher()  # under `openseek-cpt launch`: no orphan rank if the launcher is killed
    setup = setup_run(
        train,
        record,
        dataset_dir=dataset_dir,
        model_dir=model_dir,
        model_trust_remote_code=model_trust_remote_code,
        tokenizer_trust_remote_code=tokenizer_trust_remote_code,
    )
    try:
        trainer = build_trainer(setup)
        preempted_at = train_or_preempt(setup, trainer)
        leave_process_group(EXIT_OK if preempted_at is None else EXIT_PREEMPTED)
    finally:
        if setup.lock is not None:
            setup.lock.release()
    if preempted_at is not None:
        raise Preempted(str(preempted_at))
    return setup.output_dir


def build_trainer(setup: Setup) -> CPTTrainer:
    """Model, data and the Trainer, built exactly as training uses them."""
    t = setup.train
    model = load_model(t, setup.model_dir, setup.model_trust_remote_code)
    check_vocab(setup.model_dir, setup.tokenizer_trust_remote_code, model, setup.manifest, setup.dataset_dir)
    train_data = prepared.load_split(setup.dataset_dir, "train", "train.dataset_dir")
    strategy = getattr(setup.args.eval_strategy, "value", setup.args.eval_strategy)
    eval_data = None
    if strategy != "no":
        eval_data = prepared.load_split(setup.dataset_dir, "eval", "train.dataset_dir")
        if len(eval_data) == 0:
            raise UserError(
                f"train.args.eval_strategy={strategy!r} but the eval split of {setup.dataset_dir} is "
                "empty; set data.eval_size > 0 or train.args.eval_strategy: 'no'"
            )
    log_epoch_plan(setup, len(train_data))
    row_length = setup.manifest.get("max_length") or len(train_data[0]["input_ids"])
    collator = PackedCollator(
        pad_token_id=prepared.pad_token_id(setup.manifest, model.config),
        varlen=attention.needs_varlen(t.attn_implementation),
    )
    trainer = CPTTrainer(
        model=model,
        args=setup.args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        callbacks=[
            ThroughputCallback(model.config, row_length, setup.world_size),
            preemption.PreemptionCallback(),
            ShardingReport(),
            router_balance.RouterBalanceCallback(model, t.router_bias_update_rate),
        ],
        setup=setup,
    )
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        # Deviation: one event directory across restarts (default: a new dated dir per start),
        # unless TENSORBOARD_LOGGING_DIR says otherwise.
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(setup.output_dir / TENSORBOARD_SUBDIR)
    return trainer


def train_or_preempt(setup: Setup, trainer: CPTTrainer) -> Path | None:
    """Train (resuming if a checkpoint exists) and save `final/`: returns None; or, stopped by a
    preemption signal, returns the checkpoint saved then (no final save)."""
    if setup.resume_from is not None and setup.rank == 0:
        log.info(f"resuming from {setup.resume_from}")
    with preemption.signals_caught(trainer) as caught:  # until the final save is written
        trainer.train(resume_from_checkpoint=str(setup.resume_from) if setup.resume_from else None)
        if caught.triggered:
            return preemption.saved_checkpoint(trainer, setup.output_dir)
        save_final(setup, trainer)
    return None


def save_final(setup: Setup, trainer: CPTTrainer) -> None:
    """Write `final/` (weights + provenance) atomically; every rank takes part, rank 0 writes."""
    trainer.check_weights_finite(str(setup.output_dir / FINAL_SUBDIR))
    # Every rank takes part in gathering the weights (FSDP: an all-gather per tensor; a rank that
    # skipped it would leave rank 0 waiting forever); rank 0 alone writes them.
    state_dict = fsdp.full_state_dict(trainer)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        inputs: list[str | Path] = [setup.dataset_dir, setup.model_dir]
        with (
            atomic_output_dir(
                setup.output_dir / FINAL_SUBDIR, stage="train", inputs=inputs, field="train.output_dir"
            ) as tmp,
            named_when_full(setup.output_dir / FINAL_SUBDIR),
        ):
            model.save_pretrained(tmp, state_dict=state_dict)
            write_provenance(
                tmp,
                stage="train",
                recipe=setup.record,
                inputs={"dataset": setup.dataset_fingerprint, "model_dir": setup.model_dir},
                extra={"global_step": trainer.state.global_step},
            )
    trainer.accelerator.wait_for_everyone()
