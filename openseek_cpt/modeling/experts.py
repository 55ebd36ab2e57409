"""Routed MoE experts on the bf16 tensor-core path under `bf16-mixed`.

transformers' default experts path for deepseek_v3 is `grouped_mm`, which autocast does not
cover: transformers casts the input to the *weight* dtype, so with fp32 master weights (bf16-mixed)
the routed experts run in fp32 while every nn.Linear runs in bf16 - and torch's CUDA grouped_mm
takes its CUTLASS kernel only for bf16 (sm90/sm100), otherwise a per-expert mm loop.

`AUTOCAST_GROUPED_MM` ("grouped_mm_autocast") is registered in transformers' ExpertsInterface:
under an enabled autocast it casts the hidden states and the expert weights to the autocast dtype
(a differentiable cast: gradients still reach the fp32 master weights in fp32, as for nn.Linear
under autocast) and runs transformers' own grouped_mm forward; outside autocast it is exactly
`grouped_mm`. `resolve()` picks it for `bf16-mixed` when the recipe leaves
`experts_implementation` unset; `grouped_mm` named explicitly is the stock path. Proof:
tests/modeling/test_experts.py records the dtypes grouped_mm receives and compares with fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # train/config.py reads IMPLEMENTATIONS: no torch import at load
    import torch

AUTOCAST_GROUPED_MM = "grouped_mm_autocast"
# transformers' experts implementations + ours.
IMPLEMENTATIONS = (
    "eager",
    "grouped_mm",
    "batched_mm",
    "deepgemm",
    "deepgemm_megamoe",
    "sonicmoe",
    AUTOCAST_GROUPED_MM,
)


class _CastExperts:
    """The experts module seen through bf16 weights (attributes other than the weights pass through)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        import torch

        self._module = module
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            weight = getattr(module, name, None)
            if isinstance(weight, torch.Tensor):
                setattr(self, name, weight.to(dtype))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def grouped_mm_autocast_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' grouped_mm experts forward, in the autocast dtype when autocast is on."""
    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(device_type)
    out = grouped_mm_experts_forward(
        _CastExperts(self, dtype),  # type: ignore[arg-type]  # a stand-in with the module's attributes
        hidden_states.to(dtype),
        top_k_index,
        top_k_weights,
    )
    return out.to(hidden_states.dtype) if hidden_states.dtype != dtype else out


def register() -> None:
    """Make `experts_implementation: grouped_mm_autocast` known to transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if AUTOCAST_GROUPED_MM not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(AUTOCAST_GROUPED_MM, grouped_mm_autocast_forward)


def resolve(experts_implementation: str | None, precision: str) -> str | None:
    """The experts implementation to load the model with (registers ours when it is chosen).

    Unset under bf16-mixed means ours; a named implementation is taken as named, so `grouped_mm`
    is transformers' stock path (fp32 GEMMs under bf16-mixed): the ablation's baseline.
    """
    if precision == "bf16-mixed" and experts_implementation is None:
        register()
        return AUTOCAST_GROUPED_MM
    if experts_implementation == AUTOCAST_GROUPED_MM:
        register()
    return experts_implementation
