"""Throughput logged with the loss: tokens per second (global and per device) and MFU."""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from openseek_cpt.modeling import flops


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


def throughput_metrics(trainer) -> dict[str, float]:
    """Tokens/s since the previous log (summed over ranks: a collective) and MFU where the peak is known."""
    timer = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ThroughputCallback))
    seconds, tokens_local = timer.take(trainer.tokens_local)
    tokens = torch.tensor([float(tokens_local)], device=trainer.args.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)
    if seconds <= 0:
        return {}
    tokens_global = float(tokens.item())
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    peak, _ = flops.device_peak_flops(local_world_size=local_world)
    seq = trainer.setup.manifest.get("max_length") or len(trainer.train_dataset[0]["input_ids"])
    per_token = flops.training_flops_per_token(trainer.accelerator.unwrap_model(trainer.model).config, seq)
    out = {
        "tokens_per_second": tokens_global / seconds,
        "tokens_per_second_per_device": tokens_local / seconds,
    }
    if peak:
        out["mfu"] = per_token * tokens_global / seconds / (trainer.setup.world_size * peak)
    return out
