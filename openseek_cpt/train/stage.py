"""Stage 2, train: continued pretraining of the base model on the prepared dataset with HF Trainer.

Reads top-down: `run` (setup: recipe -> TrainingArguments, world size, resume point) -> `main`
(model, data, trainer) -> `fit` (train, final save, exit status), then the helpers.

What it guarantees, and where the HF stack needed help (each marked where it is done):
- documents never attend to each other: `PackedCollator` resets `position_ids` per document and
  the model runs with `use_cache=False` (with a cache, transformers' mask builder ignores the
  position resets); `document_logits` exposes exactly that path for tests;
- `bf16-mixed` (default) keeps fp32 master weights and optimizer state under bf16 autocast;
  `bf16-pure` loads bf16 weights (about half the memory of the weights+Adam state, but Adam
  updates below half a bf16 ulp are lost: see tests/test_train_precision.py); on CPU, torch's CPU
  autocast runs bf16, so bf16 works there too; a CUDA GPU without bf16 is a UserError;
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

`train.args` goes to `transformers.TrainingArguments`, except the keys in recipe.DERIVED_ARGS, which the
stage sets from the recipe (giving one is a UserError naming the recipe key to use instead), and
`overwrite_output_dir: true` (not a TrainingArguments field in transformers 5), which means: delete
the checkpoints in output_dir and start from the base model.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from openseek_cpt.artifacts import checkpoints, prepared
from openseek_cpt.artifacts.atomic import atomic_output_dir, check_output_dir
from openseek_cpt.artifacts.provenance import directory_fingerprint, write_provenance
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import EXIT_OK, EXIT_PREEMPTED, Preempted, UserError, first_line
from openseek_cpt.launcher import exit_with_launcher
from openseek_cpt.logs import get_logger
from openseek_cpt.modeling import attention, experts, flops, router_balance
from openseek_cpt.modeling import loss as lm_loss
from openseek_cpt.modeling.collator import PackedCollator
from openseek_cpt.recipe.schema import Recipe

TENSORBOARD_SUBDIR = "tensorboard"
FINAL_SUBDIR = "final"
# After the outputs are complete, how long a rank may spend leaving the process group.
TEARDOWN_DEADLINE_S = 60.0

log = get_logger("train")


def run(recipe: Recipe) -> Path:
    """Train on this process's rank; returns the run's output dir (with `final/`).

    Raises `errors.Preempted(checkpoint)` after a signal-triggered save (the CLI maps it to
    EXIT_PREEMPTED, the requeue code).
    """
    exit_with_launcher()  # under `openseek-cpt launch`: no orphan rank if the launcher is killed
    setup = setup_run(recipe)
    try:
        trainer = main(recipe, setup)
        saved = fit(recipe, setup, trainer)
        leave_process_group(EXIT_OK if saved is None else EXIT_PREEMPTED)
    finally:
        if setup.lock is not None:
            setup.lock.release()
    if saved is not None:
        raise Preempted(str(saved))
    return setup.output_dir


def leave_process_group(exit_code: int, deadline_s: float = TEARDOWN_DEADLINE_S) -> None:
    """Barrier + destroy_process_group, bounded: past `deadline_s` the rank exits with `exit_code`.

    Deviation: Trainer leaves the process group alive, and tearing gloo down at interpreter exit
    aborted a rank now and then ("terminate called without an active exception", exit -6); the
    explicit teardown can hang instead (pytorch#75097). Seen here once: a requeued 2-node run saved
    its final model, rank 0 exited, and rank 1 never did (in this teardown or in the interpreter's
    finalization, which `cli.main` now skips for ranks), holding the job until its time limit.
    Every output is complete when this runs (the final model or the preemption checkpoint, all
    ranks past the last barrier), so a stuck teardown loses nothing: the rank prints its threads'
    stacks, says so, and exits with the code the run earned.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return

    def give_up() -> None:
        os.write(
            2,
            f"[train] process-group teardown still running after {deadline_s:.0f} s; "
            f"the outputs are complete, exiting with {exit_code}; stacks:\n".encode(),
        )
        faulthandler.dump_traceback(all_threads=True)
        os._exit(exit_code)

    timer = threading.Timer(deadline_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    finally:
        timer.cancel()


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
    rank = int(os.environ.get("RANK", "0"))
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
    args = build_training_args(recipe, user_args, grad_accum)
    fingerprint = directory_fingerprint(dataset_dir)
    lock = None
    if rank == 0:  # before anything in output_dir is touched: a running run's files are not ours
        lock = RunLock.acquire(output_dir)
        swept = sweep_leftovers(output_dir)
        for ckpt in checkpoints.list_checkpoints(output_dir):
            swept += sweep_leftovers(ckpt)
        if swept:
            log.info(
                f"removed {len(swept)} leftover(s) of killed writers: {', '.join(p.name for p in swept[:4])}"
            )
    resume_from = None
    if overwrite:
        if rank == 0:
            for ckpt in checkpoints.list_checkpoints(output_dir):
                shutil.rmtree(ckpt, ignore_errors=True)
    else:
        resume_from = find_resume_checkpoint(output_dir, cleanup=rank == 0)
        if resume_from is not None:
            check_resume(resume_from, fingerprint, recipe, world_size)
    return Setup(
        output_dir,
        dataset_dir,
        fingerprint,
        world_size,
        rank,
        grad_accum,
        args,
        resume_from,
        manifest,
        keep,
        lock,
    )


def main(recipe: Recipe, setup: Setup):
    """Model, data and the Trainer, built exactly as training uses them."""
    model = load_model(recipe)
    check_vocab(recipe, model, setup.manifest, setup.dataset_dir)
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
    log_epoch_plan(recipe, setup, len(train_data))
    collator = PackedCollator(
        pad_token_id=prepared.pad_token_id(setup.manifest, model.config),
        varlen=attention.needs_varlen(recipe.train.attn_implementation),
    )
    trainer = CPTTrainer(
        model=model,
        args=setup.args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        callbacks=[
            ThroughputCallback(),
            PreemptionCallback(),
            ShardingReport(),
            router_balance.RouterBalanceCallback(model, recipe.train.router_bias_update_rate),
        ],
        openseek=setup,
        recipe=recipe,
    )
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        # Deviation: one event directory across restarts (default: a new dated dir per start),
        # unless TENSORBOARD_LOGGING_DIR says otherwise.
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(setup.output_dir / TENSORBOARD_SUBDIR)
    return trainer


def fit(recipe: Recipe, setup: Setup, trainer) -> Path | None:
    """Train (resuming if a checkpoint exists); save the final model unless preempted.

    Returns None when training finished, else the checkpoint saved on the preemption signal.
    """
    if setup.resume_from is not None:
        log.info(f"resuming from {setup.resume_from}")
    preemption = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionCallback))
    preemption.install()  # until the final save is written: a signal then lets it finish
    try:
        return _train_and_save_final(recipe, setup, trainer, preemption)
    finally:
        preemption.uninstall()


def _train_and_save_final(recipe: Recipe, setup: Setup, trainer, preemption) -> Path | None:
    trainer.train(resume_from_checkpoint=str(setup.resume_from) if setup.resume_from else None)
    if preemption.triggered:
        saved = setup.output_dir / checkpoints.name_for(trainer.state.global_step)
        log.info(f"preempted: checkpoint at step {trainer.state.global_step} saved; exiting for requeue")
        return saved
    # Every rank takes part in gathering the weights (FSDP: an all-gather per tensor; a rank that
    # skipped it would leave rank 0 waiting forever); rank 0 alone writes them.
    state_dict = full_state_dict(trainer)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        inputs = [setup.dataset_dir, recipe.train_model_dir]
        with atomic_output_dir(
            setup.output_dir / FINAL_SUBDIR, stage="train", inputs=inputs, field="train.output_dir"
        ) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            write_provenance(
                tmp,
                stage="train",
                recipe=recipe,
                inputs={"dataset": setup.dataset_fingerprint, "model_dir": recipe.train_model_dir},
                extra={"global_step": trainer.state.global_step},
            )
    trainer.accelerator.wait_for_everyone()
    return None


# ---- setup helpers -------------------------------------------------------------------------


def log_epoch_plan(recipe: Recipe, setup: Setup, rows: int) -> float:
    """Log how many sequences and epochs the run will see; more than one epoch is a warning."""
    args = setup.args
    global_batch = recipe.train.global_batch_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(rows / global_batch) * args.num_train_epochs
    seen = int(steps * global_batch)
    epochs = seen / rows
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


class RunLock:
    """An exclusive lock on a run's output_dir (POSIX record lock: released when the process dies).

    The lock file names its holder (host, pid, Slurm job) so a refused second writer can say who.
    """

    NAME = ".openseek_train.lock"

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        import fcntl
        import json
        import socket

        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / cls.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"train.output_dir: {str(output_dir)!r} is in use by another training run ({holder}); "
                "wait for it to end, stop it, or choose another train.output_dir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the lock; the file stays (deleting it would race)
            self.fd = -1


def gradient_accumulation(global_batch: int, world_size: int, per_device: int) -> int:
    """global = world x per_device x accumulation, exactly; otherwise a one-line UserError."""
    if global_batch % (world_size * per_device) != 0:
        raise UserError(
            f"train.global_batch_size={global_batch} is not divisible by world_size={world_size} x "
            f"train.per_device_batch_size={per_device}; choose a global batch that is a multiple of "
            f"{world_size * per_device}"
        )
    return global_batch // (world_size * per_device)


def bf16_supported() -> bool:
    """CUDA: the GPU's own answer; CPU: torch's CPU autocast runs bf16 (emulated without AVX512-BF16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True


def precision_args(precision: str, has_bf16: bool) -> dict[str, Any]:
    """TrainingArguments precision flags; bf16 asked where it is not supported -> UserError."""
    if precision.startswith("bf16") and not has_bf16:
        raise UserError(
            f"train.precision={precision!r} but this device has no bf16 support "
            "(e.g. a pre-Ampere GPU); set train.precision=fp32"
        )
    # bf16-mixed: fp32 weights + bf16 autocast. bf16-pure: the weights are bf16 already, no autocast.
    return {"bf16": precision == "bf16-mixed", "fp16": False}


def build_training_args(recipe: Recipe, user_args: dict[str, Any], grad_accum: int):
    """TrainingArguments = the recipe's train.args + what the stage derives."""
    from transformers import TrainingArguments

    t = recipe.train
    derived = {
        "output_dir": t.output_dir,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "seed": recipe.seed,
        "use_cpu": not torch.cuda.is_available(),
        "activation_checkpointing": t.gradient_checkpointing,
        "remove_unused_columns": False,  # deviation: keep seq_lengths for the collator
        **precision_args(t.precision, bf16_supported()),
    }
    # Deviation: DDP's unused-parameter search is off (native MoE experts are fused tensors, all used).
    user_args.setdefault("ddp_find_unused_parameters", False)
    # tf32 for what stays fp32 under bf16-mixed (the router's fp32 linear, fp32 paths); Ampere+ only.
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        user_args.setdefault("tf32", True)
    if t.gradient_checkpointing:
        user_args.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    try:
        return TrainingArguments(**derived, **user_args)
    except (ValueError, TypeError) as exc:
        raise UserError(f"train.args: {first_line(exc)}") from None


# ---- checkpoints ---------------------------------------------------------------------------


def find_resume_checkpoint(output_dir: Path, cleanup: bool) -> Path | None:
    """The newest complete checkpoint; incomplete ones (cut off mid-write) are removed when cleanup."""
    newest = None
    for ckpt in checkpoints.list_checkpoints(output_dir):
        state = checkpoints.status(ckpt)
        if state.complete:
            newest = ckpt
        elif cleanup:
            why = f"damaged: {', '.join(state.files[:3])}" if state.files else f"no {checkpoints.MARKER}"
            log.warning(f"removing incomplete checkpoint {ckpt} ({why})")
            shutil.rmtree(ckpt, ignore_errors=True)
    return newest


def rotate_checkpoints(output_dir: Path, keep: int | None, protect: list[Path] = ()) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep` complete ones (never `protect`).

    Runs after the new checkpoint's marker, so the newest complete checkpoint always survives; a
    checkpoint is first renamed to `.checkpoint-N.work-PID` (atomic), so a kill mid-delete leaves a
    leftover the next start sweeps, never a damaged checkpoint-N.
    """
    if keep is None:
        return []
    complete = [c for c in checkpoints.list_checkpoints(output_dir) if checkpoints.status(c).complete]
    removed = []
    for old in complete[:-keep]:
        if any(old.resolve() == p.resolve() for p in protect if p.exists()):
            continue
        trash = temp_path(old, "work")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(old)
    return removed


def check_resume(ckpt: Path, fingerprint: str, recipe: Recipe, world_size: int = 1) -> None:
    """Refuse a checkpoint of another dataset, or of another kind of run (FSDP vs DDP optimizer files).

    Another world size is fine: weights and optimizer state are saved whole, whatever the world.
    """
    marker = checkpoints.read_marker(ckpt) or {}
    was = marker.get("distributed_type")
    now = "FSDP" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "DDP"
    if was is not None and (was == "FSDP") != (now == "FSDP"):
        raise UserError(
            f"train: {ckpt} was written by a {was} run (world size {marker.get('world_size')}) but this run "
            f"is {now} (train.accelerate_config={recipe.train.accelerate_config}); their optimizer files "
            "differ: resume with the config it was written with, or start another train.output_dir"
        )
    if marker.get("world_size") not in (None, world_size):
        log.info(f"{ckpt} was written at world size {marker['world_size']}; resuming at {world_size}")
    if marker.get("dataset_fingerprint") != fingerprint and not recipe.train.force_resume:
        raise UserError(
            f"train: {ckpt} was trained on dataset {str(marker.get('dataset_fingerprint'))[:12]} but "
            f"{recipe.train_dataset_dir} is {fingerprint[:12]}; use another train.output_dir, "
            "train.args.overwrite_output_dir=true, or train.force_resume=true"
        )
    if marker.get("recipe_hash") != recipe.hash():
        log.warning(f"{ckpt} was written with another recipe (hash {str(marker.get('recipe_hash'))[:12]})")


def marker_info(step: int, setup: Setup, recipe: Recipe, distributed_type: str) -> dict[str, Any]:
    """What a checkpoint's marker records beside its file list (checkpoints.write_marker adds it)."""
    return {
        "step": step,
        "dataset_dir": str(setup.dataset_dir),
        "dataset_fingerprint": setup.dataset_fingerprint,
        "recipe_hash": recipe.hash(),
        "world_size": setup.world_size,
        "distributed_type": distributed_type,
        "global_batch_size": recipe.train.global_batch_size,
        "precision": recipe.train.precision,
    }


# ---- model and data ------------------------------------------------------------------------


def load_model(recipe: Recipe, model_dir: str | None = None):
    """The base (or a checkpoint) with native classes, strictly, in the training dtype, no KV cache."""
    from transformers import AutoModelForCausalLM

    t = recipe.train
    model_dir = model_dir or recipe.train_model_dir
    if not Path(model_dir, "config.json").is_file():
        raise UserError(
            f"train.model_dir: {model_dir!r} has no config.json; run `openseek-cpt download` or fix the path"
        )
    kwargs: dict[str, Any] = {
        "trust_remote_code": recipe.assets.model_trust_remote_code,
        "attn_implementation": t.attn_implementation,
        "dtype": torch.bfloat16 if t.precision == "bf16-pure" else torch.float32,
        "output_loading_info": True,
    }
    # Deviation: under bf16-mixed the routed experts' grouped_mm gets bf16 operands (experts.py).
    experts_implementation = experts.resolve(t.experts_implementation, t.precision)
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        summary = "; ".join(f"{k}: {len(v)} (e.g. {v[0]})" for k, v in problems.items())
        if not t.allow_missing_keys:
            raise UserError(
                f"train.model_dir: {model_dir} does not match the model class ({summary}); "
                "fix the checkpoint or set train.allow_missing_keys=true"
            )
        log.warning(f"loaded {model_dir} with {summary} (train.allow_missing_keys)")
    else:
        log.info(f"loaded {model_dir} strictly: no missing, unexpected or mismatched keys")
    # Deviation from the checkpoint config: with use_cache=True a cache is built even in training,
    # and transformers then ignores the per-document position resets (documents see each other).
    model.config.use_cache = False
    # Deviation: the loss from hidden states and the LM head in chunks, no full-vocab logits (loss.py).
    return lm_loss.install(model, t.loss)


def check_vocab(recipe: Recipe, model, manifest: dict[str, Any], dataset_dir: Path) -> None:
    """The dataset's tokenizer must be the model's (same vocabulary size and eos)."""
    data_vocab = manifest.get("vocab_size")
    model_vocab = model.config.vocab_size
    if data_vocab is None:
        log.warning(f"{dataset_dir}/manifest.json records no tokenizer vocab size; vocabulary not checked")
        return
    expected = model_vocab
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            recipe.train_model_dir, trust_remote_code=recipe.assets.tokenizer_trust_remote_code
        )
        expected = len(tokenizer)
    except (OSError, ValueError):
        pass  # no tokenizer beside the model: only the embedding size can be checked
    if int(data_vocab) != expected or int(data_vocab) > model_vocab:
        raise UserError(
            f"train.dataset_dir: {dataset_dir} was tokenized with a vocabulary of {data_vocab} tokens but the "
            f"model {recipe.train_model_dir} uses {expected} (embeddings {model_vocab}); rebuild the dataset "
            "with the model's tokenizer (data.tokenizer_dir)"
        )


def document_logits(
    recipe: Recipe, rows: list[dict[str, Any]], model=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-token loss) of packed rows, with the model, collator and mode training uses.

    The model is loaded by `load_model` (config as trained: use_cache=False, training dtype), kept
    in train mode, and run under the same autocast the Trainer uses for the recipe's precision.
    """
    model = model if model is not None else load_model(recipe)
    model.train()
    batch = PackedCollator(
        pad_token_id=prepared.pad_token_id({}, model.config),
        varlen=attention.needs_varlen(recipe.train.attn_implementation),
    )(rows)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device_type)
    batch = {k: v.to(device_type) if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = recipe.train.precision == "bf16-mixed"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})  # + varlen fields if any
    logits = out.logits.float()
    shift_logits = logits[:, :-1]
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(shift_labels.shape)
    return logits, loss


# ---- Trainer and callbacks -----------------------------------------------------------------


def is_fsdp(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The model's full state dict, as `save_pretrained` writes it (tied copies dropped).

    FSDP: gathered by every rank (a collective), held on rank 0 only. DDP/single: None (the
    unwrapped model saves itself, as before).
    """
    if not is_fsdp(trainer):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full + cpu_offload: gathered tensor by tensor into rank 0's host memory (others get {})
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.model, options=options)
    if not trainer.is_world_process_zero():
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    # The gathered copies no longer share storage, so save_pretrained cannot see the tie: drop
    # the tied targets (e.g. lm_head.weight = embed_tokens.weight) like a DDP save does.
    for target in getattr(model, "all_tied_weights_keys", None) or {}:
        state.pop(target, None)
    return state


class CPTTrainer(Trainer):
    """Trainer with: deterministic data order, completion markers, MoE-safe resume, throughput logs."""

    def __init__(self, *a, openseek: Setup, recipe: Recipe, **kw):
        super().__init__(*a, **kw)
        self.openseek = openseek
        self.recipe = recipe
        self.tokens_local = 0

    def _get_train_sampler(self, train_dataset=None):
        # Deviation: a permutation per epoch from (seed, epoch) only, so resume replays it exactly.
        self.epoch_sampler = EpochPermutationSampler(len(train_dataset or self.train_dataset), self.args.seed)
        return self.epoch_sampler

    def _run_epoch(self, *args, epoch, **kwargs):
        if 0 < self.state.max_steps <= self.state.global_step:
            # Deviation: Trainer checks max_steps only after a step, so a run resumed from its last
            # checkpoint (0 steps left) trained one step more (checkpoint-13, a different final/).
            self.control.should_training_stop = True
            return None
        # Deviation: under DDP a resumed epoch's loader is SkipBatchSampler(BatchSamplerShard(...)),
        # which hides the sampler from every set_epoch path, so a run resumed after its first epoch
        # would replay epoch 0's order; set the epoch on the sampler itself.
        self.epoch_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_local += int(inputs["input_ids"].numel())
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        ckpt = Path(self.args.output_dir) / checkpoints.name_for(self.state.global_step)
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_N.pth) are written
        if self.is_world_process_zero():
            kind = "FSDP" if is_fsdp(self) else str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
            checkpoints.write_marker(
                ckpt, marker_info(self.state.global_step, self.openseek, self.recipe, kind)
            )
            protect = [Path(self.state.best_model_checkpoint)] if self.state.best_model_checkpoint else []
            rotate_checkpoints(Path(self.args.output_dir), self.openseek.keep, protect)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Deviation: the stock path loads the safetensors state dict as is, which leaves native
        # deepseek_v3's fused experts random; from_pretrained converts per-expert keys correctly.
        model = model if model is not None else self.model
        loaded = load_model(self.recipe, model_dir=resume_from_checkpoint)
        if is_fsdp(self):
            # FSDP2 parameters are DTensors: each rank keeps its shard of the full tensors.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            result = set_model_state_dict(
                model, loaded.state_dict(), options=StateDictOptions(full_state_dict=True, strict=True)
            )
        else:
            result = model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        log.info(f"model weights restored from {resume_from_checkpoint} ({result})")

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if wants_fsdp and state.distributed_type == DistributedType.MULTI_CPU:
            # Deviation: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and the
            # FSDP_* settings, but AcceleratorState turns FSDP on only for GPU-type backends
            # (state.py: MULTI_CPU never becomes FSDP), so on CPU the run would silently be DDP.
            # torch's FSDP2 (fully_shard) runs on gloo; give the state the plugin that the same
            # environment describes, so CPU runs the FSDP code path the GPUs run.
            state.fsdp_plugin = FullyShardedDataParallelPlugin()
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True
        if is_fsdp(self) and self.args.bf16:
            # Deviation: accelerate's FSDP2 path runs mixed precision through a MixedPrecisionPolicy
            # (bf16 parameters everywhere: norms and the fp32 router too) and never autocasts. The
            # recipe's bf16-mixed means fp32 weights under bf16 autocast, as DDP runs it: keep the
            # parameters fp32 and wrap the forward in autocast the way accelerate does for DDP, so
            # FSDP and DDP compute the same numbers (and the same loss curve).
            from types import MethodType

            from accelerate.utils import convert_outputs_to_fp32

            state.fsdp_plugin.mixed_precision_policy = None
            autocast = torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)
            model = self.model
            forward = getattr(model.forward, "__func__", None)
            if forward is not None:
                model.forward = MethodType(convert_outputs_to_fp32(autocast(forward)), model)
            else:
                model.forward = convert_outputs_to_fp32(autocast(model.forward))

    def _save_optimizer_and_scheduler(self, output_dir):
        if not is_fsdp(self):
            return super()._save_optimizer_and_scheduler(output_dir)
        # Deviation: Trainer's FSDP path also writes pytorch_model_fsdp.bin, a second full copy of
        # the weights beside model.safetensors; resume reads model.safetensors (as for DDP), so only
        # the optimizer state (gathered: one optimizer.bin, any world size) is written here.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(
            self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def save_model(self, output_dir=None, _internal_call=False):
        if not is_fsdp(self):
            return super().save_model(output_dir, _internal_call)
        # FSDP: every rank joins the gather, rank 0 writes model.safetensors as a DDP save would.
        state_dict = full_state_dict(self)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs.update(self._throughput())
            logs.update(router_balance.take_metrics(self.callback_handler.callbacks))
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)

    def _throughput(self) -> dict[str, float]:
        timer = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, ThroughputCallback))
        seconds, tokens_local = timer.take(self.tokens_local)
        tokens = torch.tensor([float(tokens_local)], device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
        if seconds <= 0:
            return {}
        tokens_global = float(tokens.item())
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        peak, _ = flops.device_peak_flops(local_world_size=local_world)
        seq = self.openseek.manifest.get("max_length") or self.recipe.data.max_length
        per_token = flops.training_flops_per_token(self.accelerator.unwrap_model(self.model).config, seq)
        out = {
            "tokens_per_second": tokens_global / seconds,
            "tokens_per_second_per_device": tokens_local / seconds,
        }
        if peak:
            out["mfu"] = per_token * tokens_global / seconds / (self.openseek.world_size * peak)
        return out


class EpochPermutationSampler(torch.utils.data.Sampler):
    """Indices of epoch e = randperm(n) seeded by (seed, e): a pure function of dataset, seed, step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ShardingReport(TrainerCallback):
    """Each rank says, once the model is prepared, how its parameters are distributed (FSDP: DTensors)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters()) if model is not None else []
        sharded = [p for p in params if isinstance(p, DTensor)]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if sharded:
            mesh = sharded[0].device_mesh.size()
            log.info(
                f"rank {rank}: FSDP2, {len(sharded)} of {len(params)} parameters are DTensors over {mesh} ranks"
            )
        else:
            log.info(f"rank {rank}: {len(params)} parameters, each held whole (not sharded)")


class ThroughputCallback(TrainerCallback):
    """Training wall time between logs, excluding evaluation and checkpoint writes."""

    def __init__(self):
        self.mark = None
        self.seconds = 0.0
        self.tokens_at_last_take = 0

    def on_train_begin(self, args, state, control, **kw):
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.seconds += now - (self.mark or now)
        self.mark = now

    def on_evaluate(self, args, state, control, **kw):
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kw):
        self.mark = time.perf_counter()

    def take(self, tokens_total: int) -> tuple[float, int]:
        """(seconds, tokens) since the previous take."""
        seconds, self.seconds = self.seconds, 0.0
        tokens, self.tokens_at_last_take = tokens_total - self.tokens_at_last_take, tokens_total
        return seconds, tokens


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGUSR1 -> save at the end of the current optimizer step and stop (all ranks agree)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.triggered = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True
        # os.write, not logging/print: a handler may interrupt a write to the same stream
        os.write(1, f"[train] received signal {signum}: saving at the end of this step\n".encode())

    def _agreed(self, args) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
        # A signal may reach only some ranks: agree, or the others would wait in a collective forever.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def on_step_end(self, args, state, control, **kw):
        if not self.triggered and self._agreed(args):
            self.triggered = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, **kw):
        # A signal during a (long) evaluation: save right after it, before another step.
        return self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kw):
        # A signal while a checkpoint was written: that checkpoint is the preemption save; stop.
        if not self.triggered and self._agreed(args):
            self.triggered = True
            control.should_training_stop = True
        return control
