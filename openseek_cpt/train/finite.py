"""Non-finite numbers stop the run instead of being saved.

- A step whose loss (any micro-batch, any rank) or grad norm is NaN/inf is caught after the backward,
  before the optimizer update: up to `train.max_nonfinite_steps` consecutive ones are skipped (their
  gradients dropped, so the optimizer leaves every weight and its state as they were); one more stops
  the run with a UserError naming the step, what went non-finite and the last complete checkpoint.
  Every rank takes the same decision (one all-reduce of two flags per optimizer step), so every rank
  stops at the same point.
- Weights that are not finite are never saved: the check runs before a checkpoint is written (so no
  marker can make it complete) and before `final/`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.train import STAGE

log = get_logger(STAGE)

KEY = "train.max_nonfinite_steps"


def _local(t: Any) -> torch.Tensor:
    """A weight as this rank holds it: a DTensor's local shard (FSDP), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _norm(grad_norm: Any) -> torch.Tensor:
    """The grad norm as a plain tensor: a DTensor (FSDP2's norm may be a partial one per rank) made
    whole, a collective every rank runs here; a float as a tensor."""
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm)


def _max_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


def last_complete(output_dir: Path) -> str:
    """The checkpoint a stopped run can resume from, as the error names it."""
    newest = checkpoints.newest_complete(output_dir)
    return str(newest) if newest is not None else "none"


class NonfiniteGuard:
    """Counts consecutive non-finite steps; says whether to skip an update or stops the run."""

    def __init__(self, tolerated: int, output_dir: Path, is_rank0: bool):
        self.tolerated = tolerated
        self.output_dir = output_dir
        self.is_rank0 = is_rank0
        self.consecutive = 0
        self._loss_bad: torch.Tensor | None = None  # on device: no host sync per micro-batch

    def see_loss(self, loss: torch.Tensor) -> None:
        """Record a micro-batch's loss (the step's verdict comes at `skip_update`)."""
        bad = (~torch.isfinite(loss.detach())).any()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def skip_update(self, grad_norm: Any, step: int, device: torch.device) -> bool:
        """After the backward of optimizer step `step`: False for a finite step, True to skip a
        tolerated non-finite one; past the tolerance a UserError (on every rank alike)."""
        flags = torch.zeros(2, device=device)
        if self._loss_bad is not None:
            flags[0] = self._loss_bad.to(device).float()
        if grad_norm is not None:
            flags[1] = (~torch.isfinite(_norm(grad_norm).to(device))).any().float()
        self._loss_bad = None
        loss_bad, norm_bad = (bool(f) for f in _max_over_ranks(flags).tolist())
        if not (loss_bad or norm_bad):
            self.consecutive = 0
            return False
        self.consecutive += 1
        what = " and ".join(name for name, bad in (("loss", loss_bad), ("grad norm", norm_bad)) if bad)
        if self.consecutive > self.tolerated:
            raise UserError(
                f"train: step {step}: the {what} is not finite ({self.consecutive} consecutive non-finite "
                f"step(s), {KEY}={self.tolerated}); stopped before its update and before any save; last "
                f"complete checkpoint: {last_complete(self.output_dir)} (lower train.args.learning_rate, or "
                f"raise {KEY}, and rerun to resume from it)"
            )
        if self.is_rank0:
            log.warning(
                f"step {step}: the {what} is not finite; update skipped ({self.consecutive} of "
                f"{KEY}={self.tolerated} consecutive)"
            )
        return True


def check_weights(model: torch.nn.Module, step: int, target: str, output_dir: Path) -> None:
    """UserError unless every parameter and buffer is finite on every rank (a collective: every
    rank calls it). `target` says what would have been written."""
    tensors = list(itertools.chain(model.named_parameters(), model.named_buffers()))
    device = next(model.parameters()).device
    local = [name for name, t in tensors if t.is_floating_point() and not torch.isfinite(_local(t)).all()]
    count = _max_over_ranks(torch.tensor([float(len(local))], device=device))
    if count.item() == 0:
        return
    names = ", ".join(local[:3]) if local else "on another rank"
    raise UserError(
        f"train: step {step}: the weights are not finite ({int(count.item())} of {len(tensors)} tensors, "
        f"e.g. {names}); {target} not written; last complete checkpoint: {last_complete(output_dir)}"
    )
