"""The train stage's section of the recipe (`train:`) and every `train.args` policy, in one place.

`train.args` goes to `transformers.TrainingArguments`, except what the stage keeps for itself
(STAGE_ARGS, TAKEN_OVER), what it derives from the recipe (DERIVED_ARGS: refused in train.args,
naming the key to set instead), what would undo one of its levers (CONFLICTING_ARGS) and values out
of the ranges TrainingArguments does not check (ARG_RANGES). `training_arguments` is the one place
TrainingArguments is built: at load by the commands that train (`check_accepted`), and by the stage.
torch and transformers are imported inside functions: the recipe loads without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from openseek_cpt.errors import UserError, first_line
from openseek_cpt.modeling import attention, experts
from openseek_cpt.recipe.schema import setting
from openseek_cpt.recipe.values import coerce

PRECISIONS = ("bf16-mixed", "bf16-pure", "fp32")
# The causal-LM losses modeling/loss.py implements.
LOSSES = ("chunked", "liger", "hf")
# DeepSeek-V3's bias update speed, Megatron's moe_router_bias_update_rate default.
ROUTER_BIAS_UPDATE_RATE = 1e-3

# train.args keys that are the stage's own (not TrainingArguments fields in transformers 5) -> type, doc.
STAGE_ARGS: dict[str, tuple[Any, str]] = {
    "overwrite_output_dir": (
        bool,
        "The train stage's own: delete the checkpoints in train.output_dir first.",
    ),
}
# TrainingArguments fields the stage acts on instead of Trainer: Trainer rotates inside
# _save_checkpoint, before the stage's marker makes the new checkpoint complete (a kill there can
# leave none complete); the stage rotates after the marker.
TAKEN_OVER = ("save_total_limit",)


def training_args_types() -> dict[str, Any]:
    """TrainingArguments field -> annotation, plus the stage's own keys (imports transformers)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}
    return {**fields, **{key: tp for key, (tp, _) in STAGE_ARGS.items()}}


def training_args_docs() -> dict[str, str]:
    """TrainingArguments field -> its help text (transformers' own doc of the field), and the stage's keys."""
    from transformers import TrainingArguments

    docs = {
        f.name: " ".join(str(f.metadata.get("help", "")).split())
        for f in dataclasses.fields(TrainingArguments)
    }
    return {**docs, **{key: doc for key, (_, doc) in STAGE_ARGS.items()}}


@dataclass
class TrainConfig:
    output_dir: str = setting(
        "runs/OpenSeek-1.4B-A0.4B",
        "Where checkpoints, TensorBoard logs and the final model go.",
        required=True,
    )
    dataset_dir: str | None = setting(
        None, "Prepared dataset (output of the data stage); default: data.output_dir."
    )
    model_dir: str | None = setting(None, "Base model directory; default: assets.model_dir.")
    global_batch_size: int = setting(
        1024,
        "Sequences per optimizer step over all processes; gradient accumulation is derived from it.",
        above=0,
    )
    per_device_batch_size: int = setting(1, "Sequences per forward pass per process.", above=0)
    precision: str = setting(
        "bf16-mixed",
        "bf16-mixed: fp32 master weights + bf16 autocast; bf16-pure: bf16 weights (loses small updates); fp32.",
        choices=PRECISIONS,
    )
    attn_implementation: str = setting(
        "sdpa",
        "Attention implementation; only ones that keep packed documents apart. GPUs: flash_attention_2 "
        "(varlen, needs flash-attn) or flex_attention (block mask); sdpa/eager build a dense mask.",
        choices=attention.NAMES,
        explain=attention.check,
    )
    experts_implementation: str | None = setting(
        None,
        "MoE experts implementation (transformers' experts_implementation); null = grouped_mm_autocast "
        "under bf16-mixed (the experts' GEMMs in bf16), else transformers' default. grouped_mm named "
        "explicitly is transformers' stock path (fp32 GEMMs under bf16-mixed).",
        choices=experts.IMPLEMENTATIONS,
    )
    loss: str = setting(
        "chunked",
        "Causal-LM loss: chunked (no full-vocab logits, any device), liger (fused Triton kernel, GPU, "
        "needs the [gpu] extra), hf (stock: materialises all logits).",
        choices=LOSSES,
    )
    router_bias_update_rate: float = setting(
        ROUTER_BIAS_UPDATE_RATE,
        "Aux-loss-free MoE balancing (noaux_tc): per step, router bias += rate * sign(mean load - load); "
        "0 freezes the bias (DeepSeek-V3 default 0.001).",
        at_least=0,
    )
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    allow_missing_keys: bool = setting(
        False, "Accept missing/unexpected keys when loading the base model (otherwise a strict load)."
    )
    max_nonfinite_steps: int = setting(
        0,
        "Consecutive optimizer steps with a NaN/inf loss or grad norm to skip (their update dropped); one "
        "more stops the run (exit 2) naming the step and the last complete checkpoint. 0: stop at the first.",
        at_least=0,
    )
    force_resume: bool = setting(
        False, "Resume even if the checkpoint was made with another dataset fingerprint."
    )
    accelerate_config: str = setting(
        "recipes/accelerate_configs/ddp.yaml",
        "Accelerate config file for `accelerate launch`.",
        required=True,
    )
    args: dict[str, Any] = setting(
        {},
        "Passed to transformers.TrainingArguments (learning_rate, max_steps, save_steps, ...): keys, types and "
        "ranges checked at load by every command, the whole built by train/launch/tiny/recipe at load; "
        "overwrite_output_dir: true deletes the checkpoints in output_dir and starts from the base.",
        item_types=training_args_types,
        item_docs=training_args_docs,
    )

    def check(self) -> None:
        """train.args, at load for every command: known, not derived, typed, in range."""
        if self.args:  # transformers is imported only when there is something to check
            check_training_args(self.args)

    def check_accepted(self) -> None:
        """train.args accepted by TrainingArguments built as the stage builds it (on a CPU, one
        process): by the commands that train, and `recipe`, at load. Not by every command: the
        build imports transformers' modeling code (~3.5 s a process on a 2-core host), which
        `data`, `soup` and `download` never need."""
        if self.args:
            with environment_kept():  # the seed's value changes nothing TrainingArguments accepts
                training_arguments(self, RunFacts(seed=0))

    @property
    def overwrite(self) -> bool:
        """train.args.overwrite_output_dir: delete the checkpoints in output_dir, start from the base."""
        return bool(self.args.get("overwrite_output_dir", False))

    @property
    def keep(self) -> int | None:
        """train.args.save_total_limit: how many complete checkpoints the stage's rotation keeps."""
        return self.args.get("save_total_limit")


@dataclass(frozen=True)
class RunFacts:
    """What the derived TrainingArguments depend on beside the train section."""

    seed: int
    grad_accum: int = 1
    use_cpu: bool = True
    has_bf16: bool = True


# TrainingArguments fields the stage derives -> (the recipe key to set instead, the value from the
# section and the run; None: the field keeps its default, refused because the stage decides it).
DERIVED_ARGS: dict[str, tuple[str, Callable[[TrainConfig, RunFacts], Any] | None]] = {
    "output_dir": ("train.output_dir", lambda t, r: t.output_dir),
    "per_device_train_batch_size": ("train.per_device_batch_size", lambda t, r: t.per_device_batch_size),
    "per_device_eval_batch_size": ("train.per_device_batch_size", lambda t, r: t.per_device_batch_size),
    "gradient_accumulation_steps": ("train.global_batch_size", lambda t, r: r.grad_accum),
    "seed": ("seed", lambda t, r: r.seed),
    "data_seed": ("seed", None),
    "bf16": ("train.precision", lambda t, r: precision_args(t.precision, r.has_bf16)["bf16"]),
    "fp16": ("train.precision", lambda t, r: precision_args(t.precision, r.has_bf16)["fp16"]),
    "bf16_full_eval": ("train.precision", None),
    "fp16_full_eval": ("train.precision", None),
    "use_cpu": ("train.precision", lambda t, r: r.use_cpu),
    "gradient_checkpointing": ("train.gradient_checkpointing", lambda t, r: t.gradient_checkpointing),
    "activation_checkpointing": ("train.gradient_checkpointing", lambda t, r: t.gradient_checkpointing),
    "resume_from_checkpoint": ("train.output_dir (resume is automatic)", None),
    # Deviation: the collator needs seq_lengths, which Trainer would drop as an unused column.
    "remove_unused_columns": ("nothing (the collator needs seq_lengths)", lambda t, r: False),
}
# TrainingArguments defaults the stage changes; a train.args key still wins. tf32 stays off: under
# bf16-mixed the one fp32 matmul left is the router's, kept fp32 on purpose (router_precision.py).
STAGE_DEFAULTS: dict[str, Any] = {
    # DDP's unused-parameter search is off: native MoE experts are fused tensors, all used.
    "ddp_find_unused_parameters": False,
}
# TrainingArguments keys that would undo a lever of the stage -> what to set instead.
CONFLICTING_ARGS = {
    # Trainer would apply Liger's own deepseek_v3 patch over the stage's loss and experts.
    "use_liger_kernel": "train.loss: liger (the fused Liger cross-entropy on the stage's own model)",
}
# `report_to` values -> the package each logger needs (TensorBoard ships with the stage).
REPORTER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "clearml": "clearml",
                     "neptune": "neptune", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}  # fmt: skip
# Ranges TrainingArguments does not check itself: key -> (lowest allowed, exclusive?, also allowed).
ARG_RANGES: dict[str, tuple[float, bool, tuple[Any, ...]]] = {
    "learning_rate": (0, False, ()),
    "max_steps": (0, True, (-1,)),
    "num_train_epochs": (0, True, ()),
    "save_steps": (0, True, ()),
    "eval_steps": (0, True, (None,)),
    "logging_steps": (0, True, ()),
    "save_total_limit": (0, True, (None,)),
    "warmup_steps": (0, False, ()),
    "weight_decay": (0, False, ()),
    "max_grad_norm": (0, False, ()),
    "adam_epsilon": (0, True, ()),
    "dataloader_num_workers": (0, False, ()),
    "eval_accumulation_steps": (0, True, (None,)),
}


def check_training_args(args: dict[str, Any]) -> None:
    """Each train.args key: a known TrainingArguments field, not derived nor conflicting, typed, in range."""
    known = training_args_types()
    for key, value in list(args.items()):
        where = f"train.args.{key}"
        if key in DERIVED_ARGS:
            raise UserError(
                f"{where} is set by the train stage; remove it and set {DERIVED_ARGS[key][0]} instead"
            )
        if key in CONFLICTING_ARGS and value:
            raise UserError(f"recipe: {where}={value!r} is refused; set {CONFLICTING_ARGS[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean train.args.{close[0]}?" if close else ""
            raise UserError(f"{where} is not a transformers.TrainingArguments field{hint}")
        number = coerce(known[key], value, where)
        if isinstance(value, str) and not isinstance(number, str):
            args[key] = number  # PyYAML's 1e-5 string; other values stay as written (the recipe hash)
        if key in ARG_RANGES and number not in ARG_RANGES[key][2]:
            low, exclusive, allowed = ARG_RANGES[key]
            if not (number > low if exclusive else number >= low):
                bound = f"> {low}" if exclusive else f">= {low}"
                also = f" (or {' or '.join(repr(v) for v in allowed)})" if allowed else ""
                raise UserError(f"recipe: {where}={value!r} must be {bound}{also}")
    check_reporters(args.get("report_to"))


def check_reporters(report_to: Any) -> None:
    """Each `report_to` logger's package is importable (Trainer would fail at its first step)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = REPORTER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"recipe: train.args.report_to={name!r} needs the {package!r} package, which is not "
                f"installed; pip install {package}, or report_to: tensorboard"
            )


def training_arguments(t: TrainConfig, run: RunFacts) -> Any:
    """TrainingArguments = train.args (less the stage's own keys) + STAGE_DEFAULTS + DERIVED_ARGS."""
    from transformers import TrainingArguments

    switch = checkpointing_arg(TrainingArguments)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    skipped = {"gradient_checkpointing", "activation_checkpointing"} - {switch}
    derived = {
        key: value(t, run)
        for key, (_, value) in DERIVED_ARGS.items()
        if value is not None and key in fields and key not in skipped
    }
    user = {k: v for k, v in t.args.items() if k not in STAGE_ARGS and k not in TAKEN_OVER}
    if t.gradient_checkpointing:
        user.setdefault(switch + "_kwargs", {"use_reentrant": False})
    try:
        return TrainingArguments(**derived, **{**STAGE_DEFAULTS, **user})
    except (ValueError, TypeError) as exc:
        raise UserError(f"recipe: train.args: {first_line(exc)}") from None


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """os.environ as it was before the block: TrainingArguments writes ACCELERATE_* variables, and a
    check's (on a CPU) must not reach the run's own build, nor a later stage in this process."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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
    import torch

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


def checkpointing_arg(training_arguments: type) -> str:
    """TrainingArguments' name of the activation checkpointing switch: `activation_checkpointing`
    since transformers 5.2x, `gradient_checkpointing` before (5.17 on some GPU machines)."""
    names = {f.name for f in dataclasses.fields(training_arguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
