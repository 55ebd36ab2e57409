"""FSDP2 under HF Trainer: every place the stage handles it differently from DDP.

- one copy of the weights per checkpoint, in the DDP layout (`model.safetensors`), and the
  optimizer state gathered (`optimizer.bin`): any world size resumes it;
- the final save and the checkpoints gather on every rank, rank 0 writes;
- resume loads full tensors into each rank's shards;
- on CPU the FSDP plugin is given to accelerate's state by hand, and bf16-mixed keeps fp32
  parameters under autocast, as DDP runs it.
`requested()` is the one reader of accelerate's FSDP switch in the environment.
"""

from __future__ import annotations

import os
from typing import Any

import torch

USE_FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` from an FSDP config


def requested() -> bool:
    """Whether the launch asks for FSDP (read once, by the run's setup)."""
    return os.environ.get(USE_FSDP_ENV, "false").lower() == "true"


def is_fsdp(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def configure_accelerator(trainer, fsdp_requested: bool) -> None:
    """After Trainer built its accelerator: FSDP on CPU, and bf16-mixed as autocast (both below)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if fsdp_requested and state.distributed_type == DistributedType.MULTI_CPU:
        # Deviation: `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and the
        # FSDP_* settings, but AcceleratorState turns FSDP on only for GPU-type backends
        # (state.py: MULTI_CPU never becomes FSDP), so on CPU the run would silently be DDP.
        # torch's FSDP2 (fully_shard) runs on gloo; give the state the plugin that the same
        # environment describes, so CPU runs the FSDP code path the GPUs run.
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
    if is_fsdp(trainer) and trainer.args.bf16:
        # Deviation: accelerate's FSDP2 path runs mixed precision through a MixedPrecisionPolicy
        # (bf16 parameters everywhere: norms and the fp32 router too) and never autocasts. The
        # recipe's bf16-mixed means fp32 weights under bf16 autocast, as DDP runs it: keep the
        # parameters fp32 and wrap the forward in autocast the way accelerate does for DDP, so
        # FSDP and DDP compute the same numbers (and the same loss curve).
        from types import MethodType

        from accelerate.utils import convert_outputs_to_fp32

        state.fsdp_plugin.mixed_precision_policy = None
        autocast = torch.autocast(device_type=trainer.accelerator.device.type, dtype=torch.bfloat16)
        model = trainer.model
        forward = getattr(model.forward, "__func__", None)
        if forward is not None:
            model.forward = MethodType(convert_outputs_to_fp32(autocast(forward)), model)
        else:
            model.forward = convert_outputs_to_fp32(autocast(model.forward))


def full_state_dict(trainer) -> dict[str, Any] | None:
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


def load_full_state_dict(model, state_dict: dict[str, Any]) -> Any:
    """Load full tensors into an FSDP2 model: each rank keeps its shard (parameters are DTensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(
        model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True)
    )


def save_model(trainer, output_dir: str | None) -> None:
    """FSDP: every rank joins the gather, rank 0 writes model.safetensors as a DDP save would."""
    state_dict = full_state_dict(trainer)
    if trainer.args.should_save:
        trainer._save(output_dir or trainer.args.output_dir, state_dict=state_dict)


def save_optimizer_and_scheduler(trainer, output_dir: str) -> None:
    """The gathered optimizer state (one optimizer.bin, any world size) and the scheduler.

    Deviation: Trainer's FSDP path also writes pytorch_model_fsdp.bin, a second full copy of the
    weights beside model.safetensors; resume reads model.safetensors (as for DDP), so only the
    optimizer state is written here.
    """
    from accelerate.utils import save_fsdp_optimizer
    from transformers.trainer import SCHEDULER_NAME

    save_fsdp_optimizer(
        trainer.accelerator.state.fsdp_plugin,
        trainer.accelerator,
        trainer.optimizer,
        trainer.model,
        output_dir,
    )
    if trainer.args.should_save:
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
