"""Metric callbacks own their counters and add their own metrics to each training log line."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, TrainerCallback

from openseek_cpt.modeling import flops
from openseek_cpt.train.callbacks import metrics, throughput
from openseek_cpt.train.callbacks.throughput import ThroughputCallback

CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2,
)  # fmt: skip


class _Args:
    device = torch.device("cpu")


def test_throughput_counts_its_own_tokens_and_training_time_but_not_evaluation(monkeypatch):
    clock = iter([100.0, 102.0, 150.0, 154.0])  # train begin, step end, after evaluation, step end
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    cb = ThroughputCallback(CONFIG, sequence_length=8, world_size=1)
    cb.on_train_begin(None, None, None)
    metrics.see_batch([cb], {"input_ids": torch.zeros(2, 8)})
    metrics.see_batch([cb], {"input_ids": torch.zeros(2, 8)})
    cb.on_step_end(None, None, None)
    cb.on_evaluate(None, None, None)  # the 48 s of evaluation are not training time
    metrics.see_batch([cb], {"input_ids": torch.zeros(4, 8)})
    cb.on_step_end(None, None, None)
    logs = {"loss": 1.0}
    metrics.record_metrics([cb], _Args(), logs)
    assert logs["tokens_per_second"] == pytest.approx(64 / 6) == logs["tokens_per_second_per_device"]
    peak, _ = flops.device_peak_flops()
    expected_mfu = flops.training_flops_per_token(CONFIG, 8) * 64 / 6 / peak
    assert logs["mfu"] == pytest.approx(expected_mfu)
    assert cb.take(_Args.device) == {} and cb.tokens == 0  # nothing since the last line


class _Records(TrainerCallback):
    def __init__(self, name: str):
        self.name, self.batches = name, 0

    def on_batch(self, inputs):
        self.batches += 1

    def record_metrics(self, args, logs):
        logs[self.name] = float(self.batches)


def test_the_trainers_events_reach_every_callback_that_has_them_in_list_order():
    plain, first, second = TrainerCallback(), _Records("first"), _Records("second")
    callbacks = [plain, first, second]
    metrics.see_batch(callbacks, {"input_ids": torch.zeros(1, 1)})
    logs = {"loss": 1.0}
    metrics.record_metrics(callbacks, _Args(), logs)
    assert list(logs.items()) == [("loss", 1.0), ("first", 1.0), ("second", 1.0)]
