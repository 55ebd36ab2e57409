"""The MoE router in fp32 under any precision, as Megatron runs it (`moe_router_dtype`).

transformers' DeepseekV3 router computes `F.linear(h.float(), w.float())`, then sigmoid scores,
the correction bias and top-k. Under autocast the linear is recast to bf16: near-equal scores pick
another top-k set, and the 1e-3 bias steps of aux-loss-free balancing fall below bf16's resolution
of scores near 0.5. `keep_routers_fp32` gives every router module a subclass whose forward runs
with autocast disabled (a class swap, not a bound-method patch: no reference cycle, one graph for
torch.compile). In bf16-pure the router weight is bf16 and is read as fp32 by transformers' own
`.float()` casts; its output dtypes are then fp32 too.
"""

from __future__ import annotations

from typing import Any

import torch

ROUTER_BIAS = "e_score_correction_bias"
_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type[torch.nn.Module]) -> type:
    """A subclass of the router class `cls` whose forward runs outside autocast (cached per class)."""
    if cls not in _FP32_CLASSES:

        def forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast(hidden_states.device.type, enabled=False):
                return cls.forward(self, hidden_states, *args, **kwargs)

        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward})
    return _FP32_CLASSES[cls]


def is_router(module: torch.nn.Module) -> bool:
    """A MoE router: the module holding the expert score-correction bias."""
    return isinstance(getattr(module, ROUTER_BIAS, None), torch.Tensor)


def keep_routers_fp32(model: torch.nn.Module) -> int:
    """Run every router of `model` in fp32 under autocast; returns how many routers it found."""
    found = 0
    for module in model.modules():
        if is_router(module):
            if type(module) not in _FP32_CLASSES.values():
                module.__class__ = _fp32_class(type(module))
            found += 1
    return found
