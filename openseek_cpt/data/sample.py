"""Sample the packed rows of every source by ratio and save the train (+ eval) split.

Counts per source by largest-remainder rounding; eval rows first and disjoint from train; a short
source upsampled by whole repeats plus a random rest, at most `data.max_repetition` times; all
randomness from the recipe seed. Returns the manifest that reports what was realized.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.data.prepare import PackedSource, short_hash
from openseek_cpt.errors import UserError
from openseek_cpt.recipe.schema import Recipe


def largest_remainder(ratios: list[float], total: int) -> list[int]:
    """Integer counts summing to `total`, each within 1 of ratio*total (largest-remainder rounding)."""
    exact = [r * total for r in ratios]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sample_rows(
    available: int,
    n_train: int,
    n_eval: int,
    rng: np.random.Generator,
    where: str,
    max_repetition: float = math.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices: eval first, disjoint; train upsampled (whole repeats + random rest) if
    short, at most `max_repetition` times."""
    order = rng.permutation(available)
    evals, pool = order[:n_eval], order[n_eval:]
    if n_train and len(pool) == 0:
        raise UserError(
            f"{where}: the source packs into only {available} rows, all needed for its {n_eval} eval rows; "
            "lower data.eval_size or add data"
        )
    if n_train > max_repetition * len(pool):
        raise UserError(
            f"{where}: its share needs {n_train} train rows but the whole source packs into {len(pool)} "
            f"(+{n_eval} eval): it would be repeated {n_train / len(pool):.1f}x > data.max_repetition="
            f"{max_repetition:g}; add data to it, lower its ratio, or raise data.max_repetition"
        )
    if n_train <= len(pool):
        return pool[:n_train], evals
    repeats, rest = divmod(n_train, len(pool))
    train = np.concatenate([np.tile(pool, repeats), rng.choice(pool, rest, replace=False)])
    return train, evals


def sample_and_save(
    packed: list[PackedSource],
    train_counts: list[int],
    eval_counts: list[int],
    recipe: Recipe,
    out: Path,
    build_id: str,
) -> dict[str, Any]:
    """Sample rows by ratio from each source, shuffle, save the DatasetDict; returns the manifest."""
    import pyarrow.compute as pc
    from datasets import DatasetDict, concatenate_datasets

    d = recipe.data
    n_train, n_eval = d.total_sample_size, d.eval_size
    train_idx, eval_idx, per_source, offset = [], [], [], 0
    for p, t, e in zip(packed, train_counts, eval_counts, strict=True):
        src, rows = p.source, p.rows
        available = len(rows)
        rng = np.random.default_rng([recipe.seed, src.index, 1])
        where = f"{src.where} ({src.label}, {src.config.path})"
        tr, ev = sample_rows(available, t, e, rng, where, d.max_repetition)
        lengths = pc.list_value_length(rows.data.column("input_ids")).to_numpy().astype(np.int64)
        n_docs = rows.data.column("n_docs").to_numpy()
        unique = np.unique(np.concatenate([tr, ev]))
        pool = available - e
        used = int(lengths[tr].sum() + lengths[ev].sum())
        repeated = used - int(lengths[unique].sum())  # tokens trained more than once
        per_source.append(
            {
                "label": src.label,
                "path": src.config.path,
                "kind": src.kind,
                "content": src.content,
                "requested_ratio": src.config.ratio,
                "realized_ratio": t / n_train,
                "train_rows": int(t),
                "eval_rows": int(e),
                "rows_available": int(available),
                "documents_read": p.documents_read,
                "documents_in_source": src.rows.documents_in_source,  # None: a stream not read to its end
                "documents_with_special_text": p.special_text_documents,
                "documents_empty": p.empty_documents,  # null/empty/whitespace texts, skipped
                "documents": int(n_docs[unique].sum()),
                "tokens_read": p.tokens_read,
                "tokens_used": used,
                "tokens_dropped": p.tokens_dropped,
                "times_repeated": round(t / pool, 4) if t > pool else 1.0,
                "tokens_repeated": repeated,
                "upsampled": bool(t > pool),
                "padding_fraction": 1 - used / max(1, (len(tr) + len(ev)) * d.max_length),
            }
        )
        train_idx.append(tr + offset)
        eval_idx.append(ev + offset)
        offset += available
    full = concatenate_datasets([p.rows for p in packed]).select_columns(
        ["input_ids", "seq_lengths"], new_fingerprint=short_hash([build_id, "all"])
    )
    shuffle = np.random.default_rng([recipe.seed, 2**20])
    train_order = np.concatenate(train_idx)
    train_order = train_order[shuffle.permutation(len(train_order))]
    splits = {
        "train": full.select(
            train_order, keep_in_memory=True, new_fingerprint=short_hash([build_id, "train"])
        )
    }
    if n_eval:
        eval_order = np.concatenate(eval_idx)
        eval_order = eval_order[shuffle.permutation(len(eval_order))]
        splits["eval"] = full.select(
            eval_order, keep_in_memory=True, new_fingerprint=short_hash([build_id, "eval"])
        )
    DatasetDict(splits).save_to_disk(str(out))
    total_used = sum(s["tokens_used"] for s in per_source)
    return {
        "sources": per_source,
        "totals": {
            "train_rows": n_train,
            "eval_rows": n_eval,
            "documents": sum(s["documents"] for s in per_source),
            "documents_read": sum(s["documents_read"] for s in per_source),
            "tokens_used": total_used,
            "tokens_read": sum(s["tokens_read"] for s in per_source),
            "tokens_dropped": sum(s["tokens_dropped"] for s in per_source),
            "tokens_repeated": sum(s["tokens_repeated"] for s in per_source),
            "documents_with_special_text": sum(s["documents_with_special_text"] for s in per_source),
            "documents_empty": sum(s["documents_empty"] for s in per_source),
        },
        "padding_fraction": 1 - total_used / ((n_train + n_eval) * d.max_length),
        "max_length": d.max_length,
        "packing": d.packing,
        "seed": recipe.seed,
        "fingerprint": build_id,
    }
