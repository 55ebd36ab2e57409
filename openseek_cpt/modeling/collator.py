"""Document-masked batches from packed rows (shared by training and evaluation; the strategies that
make those rows are in packing.py).

A packed row holds several documents back to back; `seq_lengths` gives their lengths. The base
model was pretrained with attention and positions reset per document, so the collator:
- builds `position_ids` that restart at 0 at each document;
- passes no `attention_mask`: transformers' mask builder then derives a block-diagonal causal
  mask from the position resets (`masking_utils.find_packed_sequence_indices`). This holds only
  without a KV cache, so models must run with `use_cache=False` (the train stage sets it);
- sets the label of each document's first token to -100, so no document is trained to predict
  the next document's first token from its own last one;
- right-pads short rows with `pad_token_id`: the padding forms its own segment (positions from 0)
  with labels -100, so it neither sees nor is seen by real tokens and adds nothing to the loss;
- with `varlen=True` (flash-attention kernels, which ignore masks) also emits per-document
  `cu_seq_lens_q/k` and `max_length_q/k` over the flattened batch (`attention.varlen_fields`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class PackedCollator:
    """Collate rows `{input_ids, seq_lengths}` into `input_ids`, `position_ids`, `labels` tensors."""

    pad_token_id: int
    # Emit cu_seq_lens/max_length for varlen attention kernels (attention.needs_varlen).
    varlen: bool = False

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            n = len(ids)
            lengths = [int(x) for x in row.get("seq_lengths") or [n]]
            if sum(lengths) != n:
                raise ValueError(f"row {i}: seq_lengths sum to {sum(lengths)} but the row has {n} tokens")
            input_ids[i, :n] = ids
            labels[i, :n] = ids
            start = 0
            for length in lengths:
                position_ids[i, start : start + length] = torch.arange(length)
                labels[i, start] = IGNORE_INDEX
                start += length
            if n < width:
                position_ids[i, n:] = torch.arange(width - n)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
        }
        if self.varlen:
            from openseek_cpt.modeling.attention import varlen_fields

            batch.update(varlen_fields(position_ids))
        return batch
