"""Each rank reports how its parameters are held once the model is prepared (FSDP: DTensors)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from openseek_cpt.logs import get_logger
from openseek_cpt.train import STAGE

log = get_logger(STAGE)


class ShardingReport(TrainerCallback):
    """Each rank says, once the model is prepared, how its parameters are distributed (FSDP: DTensors)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters()) if model is not None else []
        sharded = [p for p in params if isinstance(p, DTensor)]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if sharded:
            mesh = sharded[0].device_mesh.size()
            log.info(
                f"rank {rank}: FSDP2, {len(sharded)} of {len(params)} parameters are DTensors over {mesh} ranks"
            )
        else:
            log.info(f"rank {rank}: {len(params)} parameters, each held whole (not sharded)")
