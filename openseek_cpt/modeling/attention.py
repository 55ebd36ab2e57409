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
Proof for each: tests/test_attention_isolation.py (packed row at batch 4 == each document alone).

Speed (no GPU was lent to measure; from the kernels' work): flash varlen and flex do work
proportional to sum(doc_len^2)/2 and keep no mask; sdpa does S^2 per row plus the mask. Default for
GPUs: `flash_attention_2` when the flash-attn package is installed, else `flex_attention`
(bench/train_throughput.py compares them); the recipe's `sdpa` stays the portable default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from openseek_cpt.errors import UserError

if TYPE_CHECKING:  # the recipe imports this table: no torch import at load
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
