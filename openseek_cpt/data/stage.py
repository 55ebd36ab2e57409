"""Stage 1: mix, tokenize, pack and sample the sources into a reproducible training set.

`run(recipe)` reads every source of `recipe.data` (see sources.py), tokenizes only as many
documents as its share of the mix needs (estimated from a sample, plus `read_margin`, topped up if
short), packs them per source with TRL's `pack_dataset` (default `bfd_split`: no token lost) and
samples `total_sample_size` train (+ `eval_size` eval) rows by ratio, randomly with the seed. The
result is a `DatasetDict` with `input_ids` (int32) and `seq_lengths` (the document segments of each
row, which the train stage turns into per-document attention), a `manifest.json` that reports what
was realized, and `provenance.json`. Same recipe -> byte-identical files: every datasets operation
gets an explicit cache file and fingerprint, so nothing random or path-dependent reaches the output.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts import prepared
from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.fileio import canonical_hash, read_json
from openseek_cpt.artifacts.provenance import directory_fingerprint, write_provenance
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.data import packing
from openseek_cpt.data.encoder import Encoder
from openseek_cpt.data.sources import DatasetRows, OpenSource, StreamedRows, open_sources
from openseek_cpt.errors import UserError, first_line
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import Recipe

# Documents tokenized in-process to estimate tokens per document of a source.
ESTIMATE_DOCS = 256
# Tokens per packing worker below which packing stays in this process (see tokenize_and_pack).
PACK_TOKENS_PER_WORKER = 32_000_000

log = get_logger("data")


def run(recipe: Recipe) -> Path:
    """Build the prepared dataset at `recipe.data.output_dir`; returns that path."""
    started = time.perf_counter()
    d = recipe.data
    if not d.sources:
        raise UserError("recipe: data.sources is empty; list at least one source with path and ratio")
    tokenizer = load_tokenizer(recipe)
    check_max_length(recipe)
    sources = open_sources(d.sources)
    ratios = [s.ratio for s in d.sources]
    train_counts = largest_remainder(ratios, d.total_sample_size)
    eval_counts = largest_remainder(ratios, d.eval_size)
    inputs = {
        "tokenizer": recipe.tokenizer_dir,
        "tokenizer_fingerprint": directory_fingerprint(recipe.tokenizer_dir),
    }
    for s in sources:
        inputs[f"source.{s.label}"] = s.config.path
        inputs[f"source.{s.label}.fingerprint"] = s.fingerprint
    # Deterministic datasets fingerprint of this build: what shapes the rows (not where they are written).
    # num_proc is part of it: TRL packs each map batch of each worker's shard separately.
    shaping = {k: v for k, v in d.__dict__.items() if k not in ("output_dir", "megatron_prefix", "sources")}
    build_id = _hash([shaping, [s.__dict__ for s in d.sources], recipe.seed, inputs])

    out = Path(d.output_dir)
    sweep_leftovers(out.parent, out.name)  # a killed earlier build's work dir
    work = temp_path(out, "work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        encoder = Encoder(tokenizer)
        packed = [
            prepare_source(
                s,
                encoder,
                recipe,
                need=train_counts[s.index] + eval_counts[s.index],
                work=work,
                build_id=build_id,
            )
            for s in sources
        ]
        read = [recipe.tokenizer_dir, *(s.config.path for s in sources)]
        with atomic_output_dir(out, stage="data", inputs=read, field="data.output_dir") as tmp:
            manifest = sample_and_save(packed, train_counts, eval_counts, recipe, tmp, build_id)
            manifest.update(
                tokenizer_dir=recipe.tokenizer_dir,
                vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                padding_side=tokenizer.padding_side,
                # Which encoding ran (tiktoken, rust or tokenizer) and why: see encoder.py.
                tokenizer_path=encoder.path,
                tokenizer_path_note=encoder.path_note,
            )
            (tmp / prepared.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if d.megatron_prefix:
                from datasets import load_from_disk

                from openseek_cpt.artifacts import megatron_format

                megatron_format.export_dataset(
                    load_from_disk(str(tmp / "train")), d.megatron_prefix, len(tokenizer)
                )
                log.info(f"Megatron copy of train written to {d.megatron_prefix}.bin/.idx")
            write_provenance(tmp, stage="data", recipe=recipe, inputs=inputs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_summary(manifest)
    log.info(f"saved to {out} in {time.perf_counter() - started:.1f} s")
    return out


# ---------------------------------------------------------------- tokenizer and model guardrails


def load_tokenizer(recipe: Recipe) -> Any:
    """The tokenizer with the guardrails: right padding, pad falls back to eos, eos required."""
    from transformers import AutoTokenizer

    path = recipe.tokenizer_dir
    if not Path(path).is_dir():
        raise UserError(
            f"data.tokenizer_dir={path!r} does not exist; run `openseek-cpt download` first or set data.tokenizer_dir"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.assets.tokenizer_trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"data.tokenizer_dir={path!r} has no loadable tokenizer ({first_line(exc)})"
        ) from None
    if tok.eos_token_id is None:
        if tok.pad_token_id is None:
            raise UserError(
                f"data.tokenizer_dir={path!r}: the tokenizer has neither an eos nor a pad token; "
                "documents need an eos separator: add eos_token to its tokenizer_config.json"
            )
        raise UserError(
            f"data.tokenizer_dir={path!r}: the tokenizer has no eos token (pad is {tok.pad_token!r}); "
            "documents need an eos separator: add eos_token to its tokenizer_config.json"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.info(f"tokenizer has no pad token: using eos {tok.eos_token!r} (id {tok.eos_token_id}) as pad")
    tok.padding_side = "right"  # packed rows are right-padded by the collator; never left
    return tok


def check_max_length(recipe: Recipe) -> None:
    """max_length must fit the model's position embeddings (config.json of assets.model_dir, if present)."""
    cfg_path = Path(recipe.assets.model_dir, "config.json")
    cfg = read_json(cfg_path)
    if cfg is None:
        return
    limit = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    if limit and recipe.data.max_length > limit:
        raise UserError(
            f"recipe: data.max_length={recipe.data.max_length} exceeds the model's max_position_embeddings="
            f"{limit} ({cfg_path}); set data.max_length <= {limit}"
        )


# ---------------------------------------------------------------- tokenize and pack one source


@dataclass
class PackedSource:
    """One source's packed rows (Dataset: input_ids, seq_lengths, n_docs) and what it cost."""

    source: OpenSource
    rows: Any
    documents_read: int = 0
    tokens_read: int = 0
    tokens_dropped: int = 0
    special_text_documents: int = 0


def prepare_source(
    src: OpenSource, encoder: Encoder, recipe: Recipe, need: int, work: Path, build_id: str
) -> PackedSource:
    """Tokenize and pack enough randomly chosen documents of `src` for `need` rows (all if short)."""
    from datasets import concatenate_datasets

    d = recipe.data
    stream = src.rows if isinstance(src.rows, StreamedRows) else None
    if stream is not None:  # rows come in a seeded shuffled order: read them in that order
        seed = int(np.random.default_rng([recipe.seed, src.index, 1]).integers(2**31))
        stream.start(seed=seed, work=work / f"{build_id}-{src.index}-stream")
        n_docs = stream.fill(ESTIMATE_DOCS)
        order = np.arange(n_docs)
    else:
        n_docs = len(src.rows)
        order = np.random.default_rng([recipe.seed, src.index, 0]).permutation(n_docs)
    strategy = packing.get(d.packing)
    per_doc = estimate_tokens_per_doc(src, encoder, order[:ESTIMATE_DOCS], d.max_length, strategy)
    docs_needed = need if strategy.one_row_per_document else math.ceil(need * d.max_length / per_doc)
    take = math.ceil(docs_needed * (1 + d.read_margin)) + 1
    result = PackedSource(src, rows=None)
    parts, pos = [], 0
    while True:
        if stream is not None and not stream.exhausted:
            n_docs = stream.fill(pos + take)  # read only what this round takes
            order = np.arange(n_docs)
        chunk = order[pos : pos + take]
        if not len(chunk):  # a stream that ended exactly where the last round stopped
            break
        pos += len(chunk)
        part, lengths, special = tokenize_and_pack(
            src, encoder, chunk, recipe, work, f"{build_id}-{src.index}-{len(parts)}"
        )
        parts.append(part)
        result.special_text_documents += special
        result.documents_read += len(chunk)
        result.tokens_read += int(lengths.sum())
        if strategy.truncates_documents:
            result.tokens_dropped += int(np.maximum(lengths - d.max_length, 0).sum())
        have = sum(len(p) for p in parts)
        if have >= need or (pos >= n_docs and (stream is None or stream.exhausted)):
            break
        take = math.ceil((need - have) * pos / have * (1 + d.read_margin)) + 1
        log.info(
            f"{src.label}: {have} rows from {pos} documents, short of {need}: topping up with {take} more"
        )
    result.rows = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return result


def estimate_tokens_per_doc(
    src: OpenSource, encoder: Encoder, sample: np.ndarray, max_length: int, strategy: packing.Strategy
) -> float:
    """Mean tokens per document (capped at max_length where packing truncates), from a random sample."""
    import pyarrow.compute as pc

    table = src.rows.take(sample, src.columns)
    if src.content != "tokens":
        texts = encoder.texts(table, src.content, src.config.text_field, src.formatting)
        if encoder.path_note == "not checked yet":  # once per run, on the first text source's sample
            log.info(f"{src.label}: checking the fast tokenizer paths on {len(texts)} sample documents")
            ids = encoder.choose_path(texts)
        else:
            ids = encoder.reference_ids([t or "" for t in texts])
        lengths = np.array([len(x) + (not x or x[-1] != encoder.eos) for x in ids], dtype=np.int64)
    else:
        docs = encoder(table, src.content, src.config.text_field, src.formatting)
        lengths = pc.list_value_length(docs.column("input_ids")).to_numpy()
        check_token_ids(src, docs.column("input_ids"), len(encoder.tokenizer))
    if strategy.truncates_documents:
        lengths = np.minimum(lengths, max_length)
    return max(float(lengths.mean()), 1.0)


def check_token_ids(src: OpenSource, column: Any, vocab: int) -> None:
    """Pre-tokenized ids must lie in [0, vocab): another tokenizer's ids would train garbage."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    bounds = pc.min_max(pa.chunked_array([c.flatten() for c in chunks], type=pa.int32())).as_py()
    low, top = bounds["min"], bounds["max"]
    if top is not None and (top >= vocab or low < 0):
        bad = top if top >= vocab else low
        raise UserError(
            f"{src.where}.path={src.config.path!r} holds token id {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab}) (vocab size {vocab}); it was tokenized with another tokenizer: "
            "re-tokenize it or use the matching data.tokenizer_dir"
        )


def tokenize_and_pack(
    src: OpenSource, encoder: Encoder, indices: np.ndarray, recipe: Recipe, work: Path, tag: str
) -> tuple[Any, np.ndarray, int]:
    """(packed rows of the documents `indices` of `src`, their token lengths incl. eos, documents
    whose text held special-token strings)."""
    import pyarrow.compute as pc

    d = recipe.data
    # num_proc worker processes tokenize (but the tiktoken path, below). Each tokenizes single-threaded
    # (tokenizers turns its Rust threads off in a fork once the parent used them); on 2 cores that
    # measured ~10% faster than one process on Rust threads, as the Python around the encoding
    # (ids -> Arrow, cache files) runs in parallel too.
    num_proc = max(1, min(d.num_proc, len(indices) // 1000 + 1))  # no worker pool for tiny chunks
    common = {"num_proc": num_proc if num_proc > 1 else None, "load_from_cache_file": False}
    docs = read_rows(src, indices, work / f"{tag}-rows-in.arrow", _hash([tag, "select"]))
    # The tiktoken path encodes in this process on num_proc threads (tiktoken releases the GIL):
    # no worker start-up, no tokenizer pickled into workers, one large batch per thread pool.
    # The documents are the same either way.
    in_process = encoder.path == "tiktoken" and src.content != "tokens" and num_proc > 1
    encoder.threads = num_proc if in_process else 1
    docs = docs.with_format("arrow").map(
        encoder,
        batched=True,
        batch_size=8192 if in_process else 1000,
        fn_kwargs={"content": src.content, "text_field": src.config.text_field, "formatting": src.formatting},
        remove_columns=docs.column_names,
        cache_file_name=str(work / f"{tag}-tok.arrow"),
        new_fingerprint=_hash([tag, "tok"]),
        desc=f"Tokenizing {src.label}",
        **{**common, "num_proc": None} if in_process else common,
    )
    encoder.threads = 1
    lengths = pc.list_value_length(docs.data.column("input_ids")).to_numpy()
    special = int(pc.sum(docs.data.column("special_text")).as_py() or 0)
    if src.content == "tokens":
        check_token_ids(src, docs.data.column("input_ids"), len(encoder.tokenizer))
    docs = docs.remove_columns("special_text")
    # Packing runs on worker processes only when each gets enough tokens to repay the pool's
    # start (~0.5 s: fork, pickling); in this process TRL packs ~40 M tokens/s (measured, 2 cores).
    pack_procs = max(1, min(num_proc, int(lengths.sum()) // PACK_TOKENS_PER_WORKER))
    kwargs = {
        **common,
        "num_proc": pack_procs if pack_procs > 1 else None,
        "cache_file_name": str(work / f"{tag}-pack.arrow"),
        "new_fingerprint": _hash([tag, "pack"]),
        "desc": f"Packing {src.label} ({d.packing})",
    }
    packed = packing.get(d.packing).pack(docs, d.max_length, kwargs)
    rows = packed.with_format("arrow").map(
        _segments,
        batched=True,
        remove_columns=packed.column_names,
        cache_file_name=str(work / f"{tag}-rows.arrow"),
        new_fingerprint=_hash([tag, "rows"]),
        desc=f"Segments {src.label}",
        load_from_cache_file=False,  # row-wise numpy: no worker pool (same rows, pool start costs more)
    )
    return rows.with_format(None), lengths, special


def read_rows(src: OpenSource, indices: np.ndarray, path: Path, fingerprint: str) -> Any:
    """The rows `indices` of `src` (only the columns documents need) as a Dataset: an indices mapping
    over an Arrow source, else written in bounded batches to one Arrow file in the work dir and
    memory-mapped (Megatron, parquet): memory stays flat, and workers get the file."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import MemoryMappedTable

    if isinstance(src.rows, DatasetRows):  # memory-mapped Arrow already: an indices mapping, no copy
        ds = src.rows.dataset.select_columns(src.columns) if src.columns else src.rows.dataset
        return ds.select(indices, keep_in_memory=True, new_fingerprint=fingerprint)
    batch = 1 << 14
    writer = None
    try:
        for start in range(0, len(indices), batch):
            table = src.rows.take(indices[start : start + batch], src.columns)
            if writer is None:
                writer = pa.ipc.new_stream(str(path), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return Dataset(MemoryMappedTable.from_file(str(path)), fingerprint=fingerprint)


def _segments(table: Any) -> Any:
    """Packed rows -> input_ids, seq_lengths (document segments), n_docs (documents starting in the row).

    TRL's bfd strategies report seq_lengths; for wrapped and truncated rows they are derived from
    `doc_start`: a segment starts at each document start and at each row start.
    """
    import pyarrow as pa

    ids = table.column("input_ids").combine_chunks()
    starts = table.column("doc_start").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    row_lengths = np.diff(ids.offsets.to_numpy()).astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    n_docs = (
        np.add.reduceat(starts.astype(np.int64), row_offsets[:-1]) if len(starts) else np.zeros(0, np.int64)
    )
    if "seq_lengths" in table.column_names:
        seq = table.column("seq_lengths").combine_chunks().cast(pa.list_(pa.int32()))
    else:
        is_start = starts.astype(bool)
        is_start[row_offsets[:-1]] = True
        seg_starts = np.flatnonzero(is_start)
        seg_lengths = np.diff(np.append(seg_starts, len(starts))).astype(np.int32)
        per_row = np.add.reduceat(is_start.astype(np.int64), row_offsets[:-1])
        seq = pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)), pa.array(seg_lengths)
        )
    flat_ids = pa.ListArray.from_arrays(pa.array(row_offsets.astype(np.int32)), ids.flatten())
    return pa.Table.from_arrays(
        [flat_ids, seq, pa.array(n_docs.astype(np.int32))], names=["input_ids", "seq_lengths", "n_docs"]
    )


# ---------------------------------------------------------------- sample by ratio and save


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
        ["input_ids", "seq_lengths"], new_fingerprint=_hash([build_id, "all"])
    )
    shuffle = np.random.default_rng([recipe.seed, 2**20])
    train_order = np.concatenate(train_idx)
    train_order = train_order[shuffle.permutation(len(train_order))]
    splits = {
        "train": full.select(train_order, keep_in_memory=True, new_fingerprint=_hash([build_id, "train"]))
    }
    if n_eval:
        eval_order = np.concatenate(eval_idx)
        eval_order = eval_order[shuffle.permutation(len(eval_order))]
        splits["eval"] = full.select(
            eval_order, keep_in_memory=True, new_fingerprint=_hash([build_id, "eval"])
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
        },
        "padding_fraction": 1 - total_used / ((n_train + n_eval) * d.max_length),
        "max_length": d.max_length,
        "packing": d.packing,
        "seed": recipe.seed,
        "fingerprint": build_id,
    }


def print_summary(manifest: dict[str, Any]) -> None:
    """One line per source: requested vs realized ratio, documents, tokens, dropped, repeats."""
    for s in manifest["sources"]:
        log.info(
            f"{s['label']}: ratio {s['requested_ratio']:.4f} -> {s['realized_ratio']:.4f} "
            f"({s['train_rows']} train + {s['eval_rows']} eval rows), documents {s['documents']} "
            f"(read {s['documents_read']} of {s['documents_in_source'] or 'a stream'}), tokens {s['tokens_used']}, "
            f"dropped {s['tokens_dropped']}, repeated x{s['times_repeated']:g} ({s['tokens_repeated']} tokens), "
            f"documents with special-token text {s['documents_with_special_text']}"
        )
    t = manifest["totals"]
    log.info(
        f"total: {t['train_rows']} train + {t['eval_rows']} eval rows of {manifest['max_length']} tokens "
        f"({manifest['packing']}), tokens {t['tokens_used']}, dropped {t['tokens_dropped']}, "
        f"padding {manifest['padding_fraction']:.2%}"
    )


def _hash(obj: Any) -> str:
    return canonical_hash(obj)[:32]
