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

from openseek_cpt.artifacts import prepared
from openseek_cpt.data import output, packing
from openseek_cpt.data.config import DataConfig
from openseek_cpt.data.prepare import PackedSource, short_hash
from openseek_cpt.errors import UserError

# Distinct rows gathered and written per batch (bounded memory: at most this many rows of tokens).
WRITE_ROWS = 1024


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
    d: DataConfig,
    seed: int,
    out: Path,
    build_id: str,
) -> dict[str, Any]:
    """Sample rows by ratio from each source and write the DatasetDict once; returns the manifest.

    Train rows are written source by source, part by part, each row as many times as it was drawn,
    and each part's token file is deleted once its rows are written: the peak disk is about the
    output's size. The train stage draws its own permutation of the rows every epoch
    (train/sampler.py), so their order on disk does not matter; the eval split, read in order by
    `evaluation.eval_loss`, is shuffled with the seed.
    """
    n_train, n_eval = d.total_sample_size, d.eval_size
    per_source: list[dict[str, Any]] = []
    draws = []
    for p, t, e in zip(packed, train_counts, eval_counts, strict=True):
        src = p.source
        lengths, n_docs, available = p.row_tokens(), p.row_documents(), len(p.row_tokens())
        rng = np.random.default_rng([seed, src.index, 1])
        where = f"{src.where} ({src.label}, {src.config.path})"
        tr, ev = sample_rows(available, t, e, rng, where, d.max_repetition)
        draws.append((np.bincount(tr, minlength=available), ev))
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
    write_rows(packed, draws, out, build_id, np.random.default_rng([seed, 2**20]))
    total_used = sum(s["tokens_used"] for s in per_source)
    return {
        "format": prepared.FORMAT,
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
        "seed": seed,
        "fingerprint": build_id,
    }


def write_rows(
    packed: list[PackedSource],
    draws: list[tuple[np.ndarray, np.ndarray]],
    out: Path,
    build_id: str,
    shuffle: np.random.Generator,
) -> None:
    """Write every drawn row: train rows (times drawn) in part order, eval rows shuffled at the end."""
    import pyarrow as pa

    n = sum(int(counts.sum()) for counts, _ in draws)
    tokens = sum(int(c @ p.row_tokens()) for p, (c, _) in zip(packed, draws, strict=True))
    segments = sum(int(c @ p.row_segments()) for p, (c, _) in zip(packed, draws, strict=True))
    nbytes = output.split_nbytes(n, tokens, segments)
    train = output.SplitWriter(out / "train", n, nbytes, short_hash([build_id, "train"]))
    eval_tables, eval_at = [], []  # eval rows gathered part by part, and their place in the draw
    drawn = 0
    for p, (counts, ev) in zip(packed, draws, strict=True):
        first = 0
        for part in p.parts:
            rows = len(part.plan)
            local = np.repeat(np.arange(rows), counts[first : first + rows])
            for k in range(0, len(local), WRITE_ROWS):
                train.write(rows_table(part, local[k : k + WRITE_ROWS]))
            mine = np.flatnonzero((ev >= first) & (ev < first + rows))
            if len(mine):
                eval_tables.append(rows_table(part, ev[mine] - first))
                eval_at.append(drawn + mine)
            part.store.delete()
            first += rows
        drawn += len(ev)
    train.close()
    splits = ["train"]
    if drawn:  # the eval rows in the order drawn (source by source), shuffled with the seed
        table = pa.concat_tables(eval_tables)
        order = np.argsort(np.concatenate(eval_at), kind="stable")
        table = table.take(pa.array(order[shuffle.permutation(len(order))]))
        ids, segs = (table.column(c).combine_chunks().values for c in output.COLUMNS)
        nbytes = output.split_nbytes(table.num_rows, len(ids), len(segs))
        writer = output.SplitWriter(out / "eval", table.num_rows, nbytes, short_hash([build_id, "eval"]))
        writer.write(table)
        writer.close()
        splits.append("eval")
    output.write_dataset_dict(out, splits)


def rows_table(part: Any, rows: np.ndarray) -> Any:
    """Arrow table of the rows `rows` of a part: their segments' tokens gathered from its token file."""
    plan = part.plan
    begin, end = plan.row_offsets[rows], plan.row_offsets[rows + 1]
    per_row = end - begin
    seg = np.repeat(begin - (np.cumsum(per_row) - per_row), per_row) + np.arange(int(per_row.sum()))
    seg_len = plan.seg_len[seg]
    values = part.store.gather(plan.seg_doc[seg], plan.seg_start[seg], seg_len)
    tokens = packing.row_sums(seg_len, np.concatenate([[0], np.cumsum(per_row)]))
    return output.row_table(values, tokens, seg_len, per_row)
