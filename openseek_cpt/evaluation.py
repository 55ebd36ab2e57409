"""Eval loss of a saved model on a prepared split, batched exactly as training batches it.

A leaf module (the soup's `evaluate` option and the tiny pipeline's report use it). Rows are
collated by `collator.PackedCollator`, so documents inside a packed row do not attend to each
other and each document's first token is not scored; the model runs in eval mode with
`use_cache=False` (with a cache, transformers' mask builder ignores the per-document position
resets). The loss is the mean over every scored token of the split, not a mean of batch means.
It is also the one home of the eval table (`format_eval_table`) that the soup, the report and
the tiny summary show; importing this module costs nothing (torch and transformers load in
`eval_loss`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.prepared import load_split, pad_token_id, read_manifest
from openseek_cpt.errors import UserError


def eval_loss(
    model_dir: str | Path,
    dataset_dir: str | Path,
    split: str = "eval",
    max_sequences: int = 0,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    field: str = "soup.eval_dataset_dir",
) -> dict[str, Any]:
    """Mean cross-entropy per scored token and its perplexity on `split` of a prepared dataset.

    Returns {"loss", "perplexity", "tokens", "sequences", "split"}. On a CPU the model runs in
    fp32 (so bf16 and fp32 checkpoints are compared on equal terms); on a GPU in bf16. `field`
    names the setting that pointed at the dataset, for the one-line errors.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from openseek_cpt.modeling import loss as lm_loss
    from openseek_cpt.modeling.collator import IGNORE_INDEX, PackedCollator

    rows = load_split(dataset_dir, split, field)
    if max_sequences > 0:
        rows = rows.select(range(min(max_sequences, len(rows))))
    if len(rows) == 0:
        raise UserError(
            f"{field}: split {split!r} of {dataset_dir} is empty; prepare it with data.eval_size > 0"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code
    ).to(device)  # type: ignore[arg-type]
    model.eval()
    # The loss as training computes it (loss.py: chunks from the hidden states, no full-vocab logits).
    lm_loss.install(model, "chunked")
    collate = PackedCollator(pad_token_id=pad_token_id(read_manifest(dataset_dir), model.config))
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate(list(rows.select(range(start, min(start + batch_size, len(rows))))))
            batch = {k: v.to(device) for k, v in batch.items()}
            # num_items_in_batch=1: the summed loss of the batch's scored tokens
            total += float(
                model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    labels=batch["labels"],
                    num_items_in_batch=1,
                    use_cache=False,
                ).loss
            )
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if tokens == 0:
        raise UserError(f"{field}: split {split!r} of {dataset_dir} has no token to score")
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "sequences": len(rows),
        "split": split,
    }


# --------------------------------------------------------------------------- the eval table


def eval_rows(evals: Any) -> list[dict[str, Any]]:
    """merge_info's `evaluation` as rows {name, loss, perplexity, ...}.

    Accepts the soup's list of {name, loss, perplexity, split, sequences, tokens} and the older
    name -> result (or name -> loss) mapping; a missing value is None.
    """
    items = (
        evals.items()
        if isinstance(evals, dict)
        else ((e.get("name") or e.get("model"), e) for e in evals or [])
    )
    rows = []
    for name, result in items:
        row = dict(result) if isinstance(result, dict) else {"loss": result}
        row["name"] = str(name)
        row.setdefault("loss", None)
        row.setdefault("perplexity", None)
        rows.append(row)
    return rows


def format_eval_table(evals: Any, markdown: bool = False) -> str:
    """The eval losses of base, checkpoints and soup as a table, with the change against the base.

    The one rendering of the table: the soup logs it as text, the run report writes it as
    Markdown (`markdown=True`), the tiny pipeline prints it in its summary.
    """
    rows = eval_rows(evals)
    if not rows:
        return ""
    base = rows[0]["loss"]

    def num(x: Any, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    def delta(r: dict[str, Any]) -> str:
        return "" if r["loss"] is None or base is None else format(r["loss"] - base, "+.4f")

    scored = [r for r in rows if r["loss"] is not None]
    lowest = min(scored, key=lambda r: r["loss"])["name"] if scored else None
    first = rows[0]
    about = f"split {first['split']!r}" if first.get("split") else "the eval split"
    if first.get("sequences") is not None:
        about += f" ({first['sequences']} sequences, {first.get('tokens')} tokens)"
    if markdown:
        lines = [
            f"Eval loss on {about}; lowest: {lowest}.",
            "",
            "| model | eval loss | perplexity | vs base |",
            "|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {num(r['loss'], '.4f')} | {num(r['perplexity'], '.3f')} | {delta(r)} |"
            )
        return "\n".join(lines)
    lines = [f"eval loss on {about}:", f"  {'model':<24} {'loss':>9} {'perplexity':>11} {'vs base':>9}"]
    for r in rows:
        lines.append(
            f"  {r['name']:<24} {num(r['loss'], '.4f'):>9} {num(r['perplexity'], '.3f'):>11} {delta(r):>9}"
        )
    lines.append(f"  lowest: {lowest}")
    return "\n".join(lines)
