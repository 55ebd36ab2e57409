"""Each rank reports how its parameters are held once the model is prepared (FSDP: DTensors)."""

from __future__ import annotations

from transformers import TrainerCallback

from openseek_cpt.logs import EVERY_RANK, get_logger
from openseek_cpt.train import STAGE

log = get_logger(STAGE)


class ShardingReport(TrainerCallback):
    """Each rank says, once the model is prepared, how its parameters are distributed (FSDP: DTensors)."""

    def on_train_begin(self, args, state, control, model=None, **kw) -> None:
        from torch.distributed.tensor import DTensor

        params = list(model.parameters()) if model is not None else []
        sharded = [p for p in params if isinstance(p, DTensor)]
        if sharded:  # every rank speaks: the lines are `[train rank N] ...` (logs.EVERY_RANK)
            mesh = sharded[0].device_mesh.size()
            log.info(
                f"FSDP2, {len(sharded)} of {len(params)} parameters are DTensors over {mesh} ranks",
                extra=EVERY_RANK,
            )
        else:
            log.info(f"{len(params)} parameters, each held whole (not sharded)", extra=EVERY_RANK)
