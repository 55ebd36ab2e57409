"""Preemption: SIGTERM/SIGUSR1 -> save at the end of the current optimizer step (or right after the
running evaluation; a save in progress is the preemption save) and stop, every rank agreeing.

The stage then leaves the process group and raises `errors.Preempted` (the CLI exits EXIT_PREEMPTED,
the requeue code); the restart resumes from that checkpoint. The handlers stay installed until the
process exits: a repeated signal on the way out must not turn exit 3 into death by that signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.logs import get_logger
from openseek_cpt.train import STAGE

log = get_logger(STAGE)


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGUSR1 -> save at the end of the current optimizer step and stop (all ranks agree)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.triggered = False

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def ignore_from_now(self) -> None:
        """Training and the final save are over: ignore the signals until the process exits, so that
        a repeat (Slurm's, a user's) cannot turn the exit code the run earned into death by it. SIG_IGN,
        not a Python handler: the interpreter resets those to the default when it finalizes."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        # os.write (async-signal-safe), not logging/print: the handler may interrupt a write to the same stream
        os.write(1, f"[train] received signal {signum}: saving at the end of this step\n".encode())

    def _agreed(self, args) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
        # A signal may reach only some ranks: agree, or the others would wait in a collective forever.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def on_step_end(self, args, state, control, **kw) -> TrainerControl:
        if not self.triggered and self._agreed(args):
            self.triggered = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, **kw) -> TrainerControl:
        # A signal during a (long) evaluation: save right after it, before another step.
        return self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kw) -> TrainerControl:
        # A signal while a checkpoint was written: that checkpoint is the preemption save; stop.
        if not self.triggered and self._agreed(args):
            self.triggered = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def signals_caught(trainer) -> Iterator[PreemptionCallback]:
    """Catch the preemption signals while the body runs (training, then the final save: a signal
    during the save lets it finish), then ignore them until the process exits; yields the trainer's
    PreemptionCallback."""
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionCallback))
    callback.install()
    try:
        yield callback
    finally:
        callback.ignore_from_now()


def saved_checkpoint(trainer, output_dir: Path) -> Path:
    """The checkpoint the preemption save wrote (Trainer saved it at the step training stopped)."""
    step = trainer.state.global_step
    if trainer.is_world_process_zero():
        log.info(f"preempted: checkpoint at step {step} saved; exiting for requeue")
    return output_dir / checkpoints.name_for(step)
