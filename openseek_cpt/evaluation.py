"""Eval loss of a saved model on a prepared split, batched exactly as training batches it.

A leaf module (the soup's `evaluate` option and the tiny pipeline's report use it). Rows are
collated by `collator.PackedCollator`, so documents inside a packed row do not attend to each
other and each document's first token is not scored; the model runs in eval mode with
`use_cache=False` (with a cache, transformers' mask builder ignores the per-document position
resets). The loss is the mean over every scored token of the split, not a mean of batch means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from openseek_cpt.collator import IGNORE_INDEX, PackedCollator
from openseek_cpt.errors import UserError


def eval_loss(
    model_dir: str | Path,
    dataset_dir: str | Path,
    split: str = "eval",
    max_sequences: int = 0,
    batch_size: int = 8,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Mean cross-entropy per scored token and its perplexity on `split` of a prepared dataset.

    Returns {"loss", "perplexity", "tokens", "sequences", "split"}. On a CPU the model runs in
    fp32 (so bf16 and fp32 checkpoints are compared on equal terms); on a GPU in bf16.
    """
    import torch
    from datasets import DatasetDict, load_from_disk
    from transformers import AutoModelForCausalLM

    rows = _load_split(dataset_dir, split, load_from_disk, DatasetDict)
    if max_sequences > 0:
        rows = rows.select(range(min(max_sequences, len(rows))))
    if len(rows) == 0:
        raise UserError(
            f"evaluation: split {split!r} of {dataset_dir} is empty; prepare it with data.eval_size > 0"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    collate = PackedCollator(pad_token_id=_pad_id(model.config))
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate(list(rows.select(range(start, min(start + batch_size, len(rows))))))
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            labels = batch["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1),
                    labels.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            tokens += int((labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise UserError(f"evaluation: split {split!r} of {dataset_dir} has no token to score")
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "sequences": len(rows),
        "split": split,
    }


def _load_split(dataset_dir, split, load_from_disk, dataset_dict_cls):
    if not Path(dataset_dir).is_dir():
        raise UserError(
            f"evaluation: dataset {str(dataset_dir)!r} does not exist; run `openseek-cpt data` first "
            "or set soup.eval_dataset_dir"
        )
    data = load_from_disk(str(dataset_dir))
    if not isinstance(data, dataset_dict_cls) or split not in data:
        have = list(data) if isinstance(data, dataset_dict_cls) else "a single Dataset"
        raise UserError(
            f"evaluation: {dataset_dir} has no split {split!r} (has {have}); prepare it with data.eval_size > 0"
        )
    rows = data[split]
    if "input_ids" not in rows.column_names:
        raise UserError(f"evaluation: split {split!r} of {dataset_dir} has no input_ids column")
    return rows


def _pad_id(config) -> int:
    """Padding is never scored (labels -100, own attention segment), so any valid id will do."""
    for candidate in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(candidate, list) and candidate:
            candidate = candidate[0]
        if isinstance(candidate, int):
            return candidate
    return 0
