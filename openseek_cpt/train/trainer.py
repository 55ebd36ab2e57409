"""The stage's Trainer: deterministic data order, completion markers and rotation after them,
MoE-safe resume, FSDP2 saves and loads (`fsdp`), the metric callbacks' events (`callbacks/metrics`),
non-finite steps and weights stopped (`finite`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import Trainer

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.logs import get_logger
from openseek_cpt.train import STAGE, finite, fsdp
from openseek_cpt.train.callbacks import metrics
from openseek_cpt.train.full_disk import named_when_full
from openseek_cpt.train.model import load_model
from openseek_cpt.train.sampler import EpochPermutationSampler
from openseek_cpt.train.setup import Setup

log = get_logger(STAGE)


class CPTTrainer(Trainer):
    """Trainer with: deterministic data order, completion markers, MoE-safe resume, metric callbacks."""

    def __init__(self, *a, setup: Setup, **kw):
        self.setup = setup  # before Trainer.__init__: create_accelerator_and_postprocess reads it
        super().__init__(*a, **kw)
        self.nonfinite = finite.NonfiniteGuard(
            setup.train.max_nonfinite_steps, setup.output_dir, self.is_world_process_zero()
        )

    def _get_train_sampler(self, train_dataset=None):
        # Deviation: a permutation per epoch from (seed, epoch) only, so resume replays it exactly.
        dataset = train_dataset or self.train_dataset
        self.epoch_sampler = EpochPermutationSampler(len(dataset), self.args.seed)
        return self.epoch_sampler

    def _run_epoch(self, *args, **kwargs):
        if 0 < self.state.max_steps <= self.state.global_step:
            # Deviation: Trainer checks max_steps only after a step, so a run resumed from its last
            # checkpoint (0 steps left) would train one step more than max_steps.
            self.control.should_training_stop = True
            return None
        # Deviation: under DDP a resumed epoch's loader is SkipBatchSampler(BatchSamplerShard(...)),
        # which hides the sampler from every set_epoch path, so a run resumed after its first epoch
        # would replay epoch 0's order; set the epoch on the sampler itself.
        self.epoch_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        metrics.see_batch(self.callback_handler.callbacks, inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite.see_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after the backward and clipping, before the update.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.nonfinite.skip_update(grad_norm, self.state.global_step + 1, self.args.device):
            # No gradient at all: the optimizer skips every parameter (weights, moments, step count).
            model.zero_grad(set_to_none=True)
        return grad_norm

    def check_weights_finite(self, target: str) -> None:
        """UserError (every rank) if a weight is not finite: `target` is then not written."""
        assert self.model is not None
        finite.check_weights(self.model, self.state.global_step, target, self.setup.output_dir)

    def _save_checkpoint(self, model, trial):
        assert self.args.output_dir is not None  # set from train.output_dir
        ckpt = Path(self.args.output_dir) / checkpoints.name_for(self.state.global_step)
        self.check_weights_finite(str(ckpt))  # before any file: no marker can make it complete
        with named_when_full(ckpt):
            super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_N.pth) are written
        if self.is_world_process_zero():
            kind = "FSDP" if fsdp.is_fsdp(self) else str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
            run = self.setup.run_info(kind)
            checkpoints.write_marker(ckpt, checkpoints.marker_info(self.state.global_step, run))
            protect = [Path(self.state.best_model_checkpoint)] if self.state.best_model_checkpoint else []
            checkpoints.rotate(Path(self.args.output_dir), self.setup.keep, protect)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Deviation: the stock path loads the safetensors state dict as is, which leaves native
        # deepseek_v3's fused experts random; from_pretrained converts per-expert keys correctly.
        model = model if model is not None else self.model
        loaded = load_model(self.setup.train, resume_from_checkpoint, self.setup.model_trust_remote_code)
        if fsdp.is_fsdp(self):
            result = fsdp.load_full_state_dict(model, loaded.state_dict())
        else:
            result = model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        if self.is_world_process_zero():
            log.info(f"model weights restored from {resume_from_checkpoint} ({result})")

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp.configure_accelerator(self, self.setup.fsdp)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not fsdp.is_fsdp(self):
            return super()._save_optimizer_and_scheduler(output_dir)
        fsdp.save_optimizer_and_scheduler(self, output_dir)

    def save_model(self, output_dir=None, _internal_call=False) -> None:
        if not fsdp.is_fsdp(self):
            return super().save_model(output_dir, _internal_call)
        fsdp.save_model(self, output_dir)

    def log(self, logs, start_time=None) -> None:
        if "loss" in logs:
            metrics.record_metrics(self.callback_handler.callbacks, self.args, logs)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)
