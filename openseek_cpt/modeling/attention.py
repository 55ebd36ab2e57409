"""Attention implementations for packed rows: which ones keep documents apart, and how.

A packed row holds several documents; the base model was pretrained with attention reset per
document, so a token must never attend to another document of its row. transformers gets there
in one of two ways, depending on the implementation:
- `mask`: the mask builder turns the per-document `position_ids` resets into a document mask
  (no KV cache, see collator.py). `flex_attention` builds a *block* mask and skips cross-document
  blocks (no dense mask); `sdpa` and `eager` materialise a dense (B,1,S,S) mask and compute all S^2
  scores (64 MiB mask + a bf16 bias per layer at 4 x 4096; the mem-efficient kernel, since MLA's
  qk 192 / v 128 head dims exclude SDPA's flash kernel).
- `varlen`: flash-attention kernels ignore masks; they keep documents apart only when given
  per-document `cu_seq_lens_q/k` + `max_length_q/k` over the flattened batch (otherwise, at
  batch > 1, they run dense causal over the whole row: documents attend to each other). The
  collator adds those fields (`varlen_fields`) when `needs_varlen(impl)`.
Any other implementation is refused at recipe load (`check`): fail closed, never silent.
Proof for each: tests/modeling/test_attention_isolation.py (packed row at batch 4 == each document
alone); the dtypes flex receives: tests/modeling/test_precision_under_autocast.py.

Precision: under autocast transformers' DeepseekV3 attention hands flex an fp32 query (its rotary
part follows the fp32 cos/sin) with bf16 key/value; flex is not an autocast op, and torch 2.10
refuses mixed dtypes in the forward (2.11 in the backward). `prepare("flex_attention")` registers
`flex_attention_in_autocast_dtype` under transformers' "flex_attention" key, so every model loaded
afterwards hands flex q/k/v in one dtype (the autocast dtype when autocast is on).

Speed (from the kernels' work): flash varlen and flex do work
proportional to sum(doc_len^2)/2 and keep no mask; sdpa does S^2 per row plus the mask. Default for
GPUs: `flash_attention_2` when the flash-attn package is installed, else `flex_attention`
(bench/train_throughput.py compares them); the recipe's `sdpa` stays the portable default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openseek_cpt.errors import UserError

if TYPE_CHECKING:  # train/config.py reads this table: no torch import at load
    import torch


@dataclass(frozen=True)
class Implementation:
    name: str
    # "mask": isolation from position-id resets via the mask builder; "varlen": needs cu_seq_lens.
    isolation: str
    doc: str


IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i
    for i in (
        Implementation("sdpa", "mask", "dense (B,1,S,S) document mask; all S^2 scores computed"),
        Implementation("eager", "mask", "dense document mask, unfused matmul + softmax (reference)"),
        Implementation(
            "flex_attention", "mask", "block mask from position resets; skips cross-document blocks"
        ),
        Implementation(
            "flash_attention_2", "varlen", "flash-attn 2 varlen kernel on per-document cu_seq_lens"
        ),
        Implementation(
            "flash_attention_3", "varlen", "flash-attn 3 (Hopper) varlen kernel on per-document cu_seq_lens"
        ),
    )
}
NAMES = tuple(IMPLEMENTATIONS)


def check(name: str, field: str = "train.attn_implementation") -> Implementation:
    """The implementation called `name`, or a one-line UserError if it cannot isolate packed documents."""
    if name not in IMPLEMENTATIONS:
        raise UserError(
            f"recipe: {field}={name!r} cannot be shown to keep packed documents apart (they would attend "
            f"to each other); use one of {', '.join(NAMES)}"
        )
    return IMPLEMENTATIONS[name]


def prepare(name: str) -> None:
    """Install what implementation `name` needs before a model is loaded with it (idempotent)."""
    if name == "flex_attention":
        from transformers import AttentionInterface

        AttentionInterface.register("flex_attention", flex_attention_in_autocast_dtype)


def flex_attention_in_autocast_dtype(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' flex forward with q/k/v in one dtype: flex is no autocast op (module docstring)."""
    import torch
    from transformers.integrations.flex_attention import flex_attention_forward

    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    elif query.dtype == key.dtype == value.dtype:
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        dtype = value.dtype
    return flex_attention_forward(
        module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, **kwargs
    )


def needs_varlen(name: str) -> bool:
    """True when the collator must pass per-document cu_seq_lens/max_length for `name`."""
    impl = IMPLEMENTATIONS.get(name)
    return impl is not None and impl.isolation == "varlen"


def varlen_fields(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """cu_seq_lens_q/k (int32) and max_length_q/k (int) of the documents of a (B, S) batch, flattened.

    A document starts wherever its position id is 0 (the collator resets positions per document,
    padding included, and every row starts at 0), so rows never join across the batch.
    """
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
