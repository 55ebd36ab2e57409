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
- a checkpoint is complete only once `openseek_checkpoint.json` (written last, atomically, by
  rank 0 after a barrier) lists its files with their sizes; resume picks the newest complete one
  and removes incomplete ones; it records the dataset fingerprint and recipe hash and refuses
  another dataset unless `train.force_resume`;
- resume loads the model weights through `from_pretrained` (the stock resume leaves the fused MoE
  experts of native deepseek_v3 random: per-expert keys on disk, fused tensors in memory);
- SIGTERM/SIGUSR1 -> save at the end of the current optimizer step, return EXIT_PREEMPTED.

`train.args` goes to `transformers.TrainingArguments`, except the keys in DERIVED_ARGS, which the
stage sets from the recipe (giving one is a UserError naming the recipe key to use instead), and
`overwrite_output_dir: true` (not a TrainingArguments field in transformers 5), which means: delete
the checkpoints in output_dir and start from the base model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from openseek_cpt import flops
from openseek_cpt.collator import PackedCollator
from openseek_cpt.errors import UserError
from openseek_cpt.provenance import (
    CHECKPOINT_MARKER,
    atomic_output_dir,
    checkpoint_mismatches,
    directory_fingerprint,
    write_provenance,
)
from openseek_cpt.recipe import Recipe

# The exit status after a SIGTERM/SIGUSR1 save is cli.EXIT_PREEMPTED (defined once, there).
CHECKPOINT_PREFIX = "checkpoint-"
TENSORBOARD_SUBDIR = "tensorboard"
FINAL_SUBDIR = "final"

# TrainingArguments keys the stage derives from the recipe -> the recipe key to set instead.
DERIVED_ARGS = {
    "output_dir": "train.output_dir",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "seed": "seed",
    "data_seed": "seed",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "bf16_full_eval": "train.precision",
    "fp16_full_eval": "train.precision",
    "use_cpu": "train.precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.output_dir (resume is automatic)",
    "remove_unused_columns": "nothing (the collator needs seq_lengths)",
}
STAGE_ARGS = ("overwrite_output_dir",)

log = logging.getLogger("openseek_cpt.train")


def run(recipe: Recipe) -> int:
    """Train on this process's rank; returns 0, or EXIT_PREEMPTED after a signal-triggered save."""
    from openseek_cpt.cli import EXIT_PREEMPTED

    # force: under `accelerate launch` a handler is already installed and would swallow these lines
    logging.basicConfig(level=logging.INFO, format="[train] %(message)s", force=True)
    setup = setup_run(recipe)
    trainer = main(recipe, setup)
    preempted = fit(recipe, setup, trainer)
    return EXIT_PREEMPTED if preempted else 0


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


def setup_run(recipe: Recipe) -> Setup:
    """Validate the recipe against the environment, build TrainingArguments, find the resume point."""
    t = recipe.train
    dataset_dir = Path(recipe.train_dataset_dir)
    if not (dataset_dir / "dataset_dict.json").is_file():
        raise UserError(
            f"train.dataset_dir: {str(dataset_dir)!r} is not a prepared dataset (no dataset_dict.json); "
            "run `openseek-cpt data` first or point train.dataset_dir at its output"
        )
    manifest = _read_json(dataset_dir / "manifest.json") or {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    grad_accum = gradient_accumulation(t.global_batch_size, world_size, t.per_device_batch_size)
    user_args = dict(t.args)
    overwrite = bool(user_args.pop("overwrite_output_dir", False))
    check_training_args(user_args)
    output_dir = Path(t.output_dir)
    args = build_training_args(recipe, user_args, grad_accum)
    fingerprint = directory_fingerprint(dataset_dir)
    resume_from = None
    if overwrite:
        if rank == 0:
            for ckpt in _checkpoint_dirs(output_dir):
                shutil.rmtree(ckpt, ignore_errors=True)
    else:
        resume_from = find_resume_checkpoint(output_dir, cleanup=rank == 0)
        if resume_from is not None:
            check_resume(resume_from, fingerprint, recipe)
    return Setup(
        output_dir, dataset_dir, fingerprint, world_size, rank, grad_accum, args, resume_from, manifest
    )


def main(recipe: Recipe, setup: Setup):
    """Model, data and the Trainer, built exactly as training uses them."""
    from datasets import load_from_disk

    model = load_model(recipe)
    check_vocab(recipe, model, setup.manifest, setup.dataset_dir)
    data = load_from_disk(str(setup.dataset_dir))
    if "train" not in data:
        raise UserError(f"train.dataset_dir: {setup.dataset_dir} has no 'train' split (has {list(data)})")
    eval_data = data["eval"] if "eval" in data and len(data["eval"]) > 0 else None
    strategy = getattr(setup.args.eval_strategy, "value", setup.args.eval_strategy)
    if eval_data is None and strategy != "no":
        raise UserError(
            f"train.args.eval_strategy={strategy!r} but {setup.dataset_dir} has no eval "
            "split; set data.eval_size > 0 or train.args.eval_strategy: 'no'"
        )
    collator = PackedCollator(pad_token_id=_pad_id(setup.manifest, model))
    trainer = CPTTrainer(
        model=model,
        args=setup.args,
        train_dataset=data["train"],
        eval_dataset=eval_data,
        data_collator=collator,
        callbacks=[ThroughputCallback(), PreemptionCallback()],
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


def fit(recipe: Recipe, setup: Setup, trainer) -> bool:
    """Train (resuming if a checkpoint exists); save the final model unless preempted. Returns preempted."""
    if setup.resume_from is not None:
        log.info(f"resuming from {setup.resume_from}")
    preemption = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionCallback))
    preemption.install()
    try:
        trainer.train(resume_from_checkpoint=str(setup.resume_from) if setup.resume_from else None)
    finally:
        preemption.uninstall()
    if preemption.triggered:
        log.info(f"preempted: checkpoint at step {trainer.state.global_step} saved; exiting for requeue")
        return True
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_output_dir(setup.output_dir / FINAL_SUBDIR) as tmp:
            model.save_pretrained(tmp)
            write_provenance(
                tmp,
                stage="train",
                recipe=recipe,
                inputs={"dataset": setup.dataset_fingerprint, "model_dir": recipe.train_model_dir},
                extra={"global_step": trainer.state.global_step},
            )
    trainer.accelerator.wait_for_everyone()
    return False


# ---- setup helpers -------------------------------------------------------------------------


def gradient_accumulation(global_batch: int, world_size: int, per_device: int) -> int:
    """global = world x per_device x accumulation, exactly; otherwise a one-line UserError."""
    if global_batch % (world_size * per_device) != 0:
        raise UserError(
            f"train.global_batch_size={global_batch} is not divisible by world_size={world_size} x "
            f"train.per_device_batch_size={per_device}; choose a global batch that is a multiple of "
            f"{world_size * per_device}"
        )
    return global_batch // (world_size * per_device)


def check_training_args(args: dict[str, Any]) -> None:
    """Every key must be a TrainingArguments field, and not one the stage derives itself."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in args:
        if key in DERIVED_ARGS:
            raise UserError(
                f"train.args.{key} is set by the train stage; remove it and set {DERIVED_ARGS[key]} instead"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean train.args.{close[0]}?" if close else ""
            raise UserError(f"train.args.{key} is not a transformers.TrainingArguments field{hint}")


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
    if t.gradient_checkpointing:
        user_args.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    try:
        return TrainingArguments(**derived, **user_args)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"train.args: {first}") from None


# ---- checkpoints ---------------------------------------------------------------------------


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def checkpoint_is_complete(ckpt: Path) -> bool:
    """Complete = the marker (written last) exists and every file it lists is there at its size."""
    return checkpoint_mismatches(ckpt) == []


def find_resume_checkpoint(output_dir: Path, cleanup: bool) -> Path | None:
    """The newest complete checkpoint; incomplete ones (cut off mid-write) are removed when cleanup."""
    newest = None
    for ckpt in _checkpoint_dirs(output_dir):
        if checkpoint_is_complete(ckpt):
            newest = ckpt
        elif cleanup:
            log.warning(f"removing incomplete checkpoint {ckpt} (no complete {CHECKPOINT_MARKER})")
            shutil.rmtree(ckpt, ignore_errors=True)
    return newest


def check_resume(ckpt: Path, fingerprint: str, recipe: Recipe) -> None:
    marker = _read_json(ckpt / CHECKPOINT_MARKER) or {}
    if marker.get("dataset_fingerprint") != fingerprint and not recipe.train.force_resume:
        raise UserError(
            f"train: {ckpt} was trained on dataset {str(marker.get('dataset_fingerprint'))[:12]} but "
            f"{recipe.train_dataset_dir} is {fingerprint[:12]}; use another train.output_dir, "
            "train.args.overwrite_output_dir=true, or train.force_resume=true"
        )
    if marker.get("recipe_hash") != recipe.hash():
        log.warning(f"{ckpt} was written with another recipe (hash {str(marker.get('recipe_hash'))[:12]})")


def write_checkpoint_marker(ckpt: Path, step: int, setup: Setup, recipe: Recipe) -> None:
    """Write the completion marker atomically (tmp + fsync + rename); the checkpoint is then complete."""
    files = {
        p.relative_to(ckpt).as_posix(): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_MARKER and not p.name.startswith(".")
    }
    for p in ckpt.rglob("*"):  # data on disk before the marker says so
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    body = {
        "step": step,
        "dataset_dir": str(setup.dataset_dir),
        "dataset_fingerprint": setup.dataset_fingerprint,
        "recipe_hash": recipe.hash(),
        "world_size": setup.world_size,
        "global_batch_size": recipe.train.global_batch_size,
        "precision": recipe.train.precision,
        "files": files,
    }
    tmp = ckpt / f".{CHECKPOINT_MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / CHECKPOINT_MARKER)
    fd = os.open(ckpt, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if t.experts_implementation:
        kwargs["experts_implementation"] = t.experts_implementation
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
    return model


def check_vocab(recipe: Recipe, model, manifest: dict[str, Any], dataset_dir: Path) -> None:
    """The dataset's tokenizer must be the model's (same vocabulary size and eos)."""
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    data_vocab = tok.get("vocab_size", manifest.get("vocab_size"))
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


def _pad_id(manifest: dict[str, Any], model) -> int:
    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    for value in (
        tok.get("pad_token_id"),
        manifest.get("pad_token_id"),
        tok.get("eos_token_id"),
        manifest.get("eos_token_id"),
        model.config.pad_token_id,
        model.config.eos_token_id,
    ):
        if isinstance(value, int):
            return value
    return 0


def document_logits(
    recipe: Recipe, rows: list[dict[str, Any]], model=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-token loss) of packed rows, with the model, collator and mode training uses.

    The model is loaded by `load_model` (config as trained: use_cache=False, training dtype), kept
    in train mode, and run under the same autocast the Trainer uses for the recipe's precision.
    """
    model = model if model is not None else load_model(recipe)
    model.train()
    batch = PackedCollator(pad_token_id=model.config.eos_token_id or 0)(rows)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device_type)
    batch = {k: v.to(device_type) for k, v in batch.items()}
    autocast = recipe.train.precision == "bf16-mixed"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
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
        ckpt = Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_N.pth) are written
        if self.is_world_process_zero():
            write_checkpoint_marker(ckpt, self.state.global_step, self.openseek, self.recipe)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Deviation: the stock path loads the safetensors state dict as is, which leaves native
        # deepseek_v3's fused experts random; from_pretrained converts per-expert keys correctly.
        model = model if model is not None else self.model
        loaded = load_model(self.recipe, model_dir=resume_from_checkpoint)
        result = model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        log.info(f"model weights restored from {resume_from_checkpoint} ({result})")

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs.update(self._throughput())
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
        print(f"[train] received signal {signum}: saving at the end of this step", flush=True)

    def on_step_end(self, args, state, control, **kw):
        flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
        # A signal may reach only some ranks: agree, or the others would wait in a collective forever.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            self.triggered = True
            control.should_save = True
            control.should_training_stop = True
        return control


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
