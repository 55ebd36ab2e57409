"""Throughput logged with the loss: tokens per second (global and per device) and MFU."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from openseek_cpt.modeling import flops


class ThroughputCallback(TrainerCallback):
    """Tokens per second and MFU since the previous training log line (a metric callback: metrics.py).

    It owns its counters: the tokens of each micro-batch this rank trains on, and the training wall
    time, which leaves out evaluation and checkpoint writes (the clock restarts after them).
    """

    def __init__(self, model_config: Any, sequence_length: int, world_size: int):
        self.flops_per_token = flops.training_flops_per_token(model_config, sequence_length)
        self.world_size = world_size
        self.mark: float | None = None
        self.seconds = 0.0
        self.tokens = 0

    def on_train_begin(self, args, state, control, **kw) -> None:
        self.mark = time.perf_counter()

    def on_batch(self, inputs: Mapping[str, Any]) -> None:
        self.tokens += int(inputs["input_ids"].numel())

    def on_step_end(self, args, state, control, **kw) -> None:
        now = time.perf_counter()
        self.seconds += now - (self.mark or now)
        self.mark = now

    def on_evaluate(self, args, state, control, **kw) -> None:
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kw) -> None:
        self.mark = time.perf_counter()

    def record_metrics(self, args: Any, logs: dict[str, float]) -> None:
        logs.update(self.take(args.device))

    def take(self, device: Any) -> dict[str, float]:
        """The metrics since the previous take, and the counters reset. The token count is summed over
        ranks (a collective: every rank takes); MFU only where the device's peak is known."""
        seconds, self.seconds = self.seconds, 0.0
        tokens_local, self.tokens = self.tokens, 0
        tokens = torch.tensor([float(tokens_local)], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
        if seconds <= 0:
            return {}
        tokens_global = float(tokens.item())
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        peak, _ = flops.device_peak_flops(local_world_size=local_world)
        out = {
            "tokens_per_second": tokens_global / seconds,
            "tokens_per_second_per_device": tokens_local / seconds,
        }
        if peak:
            out["mfu"] = self.flops_per_token * tokens_global / seconds / (self.world_size * peak)
        return out
