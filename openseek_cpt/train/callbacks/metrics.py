"""How a callback measures and logs on its own: it owns its counters and adds its metrics to the log.

Like OLMo-core's callbacks (its `SpeedMonitorCallback` sees each batch in `pre_step` and records its
own metrics), a metric callback here keeps everything it measures. The HF callback events cannot
carry that: none sees a batch, and `on_log` comes too late to add to a line (TensorBoard's callback
runs before ours, and `log_history` is copied before `on_log`). So `CPTTrainer` calls two events of
its own on every callback that has them, in the callback list's order:
- `on_batch(inputs)`: each micro-batch, before it is trained on;
- `record_metrics(args, logs)`: before a training log line (one with `loss`) is written; the
  callback adds what it measured since the previous line. Every rank calls it (it may all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class SeesBatches(Protocol):
    def on_batch(self, inputs: Mapping[str, Any]) -> None: ...


@runtime_checkable
class RecordsMetrics(Protocol):
    def record_metrics(self, args: Any, logs: dict[str, float]) -> None: ...


def see_batch(callbacks: Iterable[object], inputs: Mapping[str, Any]) -> None:
    """Show a micro-batch to every callback that counts batches."""
    for callback in callbacks:
        if isinstance(callback, SeesBatches):
            callback.on_batch(inputs)


def record_metrics(callbacks: Iterable[object], args: Any, logs: dict[str, float]) -> None:
    """Let every metric callback add its metrics to a training log line."""
    for callback in callbacks:
        if isinstance(callback, RecordsMetrics):
            callback.record_metrics(args, logs)
