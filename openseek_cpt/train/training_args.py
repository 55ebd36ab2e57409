"""The recipe -> `transformers.TrainingArguments`: the batch arithmetic, precision flags, what the stage derives."""

from __future__ import annotations

from typing import Any

import torch

from openseek_cpt.errors import UserError, first_line
from openseek_cpt.recipe.schema import Recipe


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
        checkpointing_arg(TrainingArguments): t.gradient_checkpointing,
        "remove_unused_columns": False,  # deviation: keep seq_lengths for the collator
        **precision_args(t.precision, bf16_supported()),
    }
    # Deviation: DDP's unused-parameter search is off (native MoE experts are fused tensors, all used).
    user_args.setdefault("ddp_find_unused_parameters", False)
    # No tf32 by default: under bf16-mixed the one fp32 matmul left is the router's, kept fp32 on
    # purpose (router_precision.py); tf32's 10-bit mantissa would undo that.
    if t.gradient_checkpointing:
        user_args.setdefault(checkpointing_arg(TrainingArguments) + "_kwargs", {"use_reentrant": False})
    try:
        return TrainingArguments(**derived, **user_args)
    except (ValueError, TypeError) as exc:
        raise UserError(f"train.args: {first_line(exc)}") from None


def checkpointing_arg(training_arguments: type) -> str:
    """TrainingArguments' name of the activation checkpointing switch: `activation_checkpointing`
    since transformers 5.2x, `gradient_checkpointing` before (5.17 on some GPU machines)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(training_arguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
