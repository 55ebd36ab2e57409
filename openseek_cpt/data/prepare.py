"""Tokenize and pack one source: only as many randomly chosen documents as its share needs.

`prepare_source` estimates tokens per document from a sample (on each sample document's first
SAMPLE_CHARS characters), reads that many documents (plus `read_margin`, topped up if short),
tokenizes them (encoder.py) and packs them (packing.py) into rows with `input_ids`, `seq_lengths`
(document segments) and `n_docs`. Every datasets operation
gets an explicit cache file in the stage's work dir and a fingerprint from `short_hash`, so nothing
random or path-dependent reaches the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts.fileio import canonical_hash
from openseek_cpt.data import STAGE, packing
from openseek_cpt.data.encoder import Encoder, is_empty
from openseek_cpt.data.rows import DatasetRows, StreamedRows
from openseek_cpt.data.sources import OpenSource
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import Recipe

# Documents tokenized in-process to estimate tokens per document of a source.
ESTIMATE_DOCS = 256
# Characters of each sample document tokenized in this process (the estimate and the fast-path check):
# a longer document is checked on its prefix and its tokens extrapolated, so a 50 MB single-line
# document costs the main process no more than this.
SAMPLE_CHARS = 100_000
# Documents per batch encoded in this process (the array paths).
IN_PROCESS_BATCH = 8192
# Tokens per packing worker below which packing stays in this process (see tokenize_and_pack).
PACK_TOKENS_PER_WORKER = 32_000_000

log = get_logger(STAGE)


def short_hash(obj: Any) -> str:
    """The datasets fingerprint of a build step: a stable hash of what shapes it."""
    return canonical_hash(obj)[:32]


@dataclass
class PackedSource:
    """One source's packed rows (Dataset: input_ids, seq_lengths, n_docs) and what it cost."""

    source: OpenSource
    rows: Any
    documents_read: int = 0
    tokens_read: int = 0
    tokens_dropped: int = 0
    special_text_documents: int = 0
    empty_documents: int = 0  # null, empty or whitespace-only texts: read, skipped


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
        result.empty_documents += len(chunk) - len(lengths)
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
        kept = np.array([not is_empty(t) for t in texts], dtype=bool)
        texts = [t for t, k in zip(texts, kept, strict=True) if k]  # empty texts: 0 tokens, skipped
        chars = [len(t) for t in texts]
        texts = [t[:SAMPLE_CHARS] for t in texts]  # a bounded prefix: memory does not follow the longest
        if not texts:
            ids = []
        elif encoder.path_note == "not checked yet":  # once per run, on the first text source's sample
            log.info(f"{src.label}: checking the fast tokenizer paths on {len(texts)} sample documents")
            ids = encoder.choose_path(texts)
        else:
            ids = encoder.reference_ids(texts)
        lengths = np.zeros(len(kept), dtype=np.int64)
        lengths[kept] = [
            len(x) + (not x or x[-1] != encoder.eos)
            if n <= SAMPLE_CHARS
            else math.ceil(len(x) * n / SAMPLE_CHARS) + 1  # the prefix's tokens per character, scaled
            for x, n in zip(ids, chars, strict=True)
        ]
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
    """(packed rows of the documents `indices` of `src`, their token lengths incl. eos (none for an
    empty text: it is skipped), documents whose text held special-token strings)."""
    import pyarrow.compute as pc

    d = recipe.data
    # num_proc worker processes tokenize (but the tiktoken path, below). Each tokenizes single-threaded
    # (tokenizers turns its Rust threads off in a fork once the parent used them); that beats one
    # process on Rust threads, as the Python around the encoding (ids -> Arrow, cache files) runs in
    # parallel too (docs/benchmarks.md).
    num_proc = max(1, min(d.num_proc, len(indices) // 1000 + 1))  # no worker pool for tiny chunks
    common = {"num_proc": num_proc if num_proc > 1 else None, "load_from_cache_file": False}
    docs = read_rows(src, indices, work / f"{tag}-rows-in.arrow", short_hash([tag, "select"]))
    # The array paths encode in this process: gigatoken on its own Rust threads, tiktoken on num_proc
    # threads (it releases the GIL): no worker start-up, no tokenizer pickled into workers, large
    # batches. The documents are the same either way.
    in_process = src.content != "tokens" and (
        encoder.path == "gigatoken" or (encoder.path == "tiktoken" and num_proc > 1)
    )
    encoder.threads = num_proc if in_process else 1
    docs = docs.with_format("arrow").map(
        encoder,
        batched=True,
        batch_size=IN_PROCESS_BATCH if in_process else 1000,
        fn_kwargs={"content": src.content, "text_field": src.config.text_field, "formatting": src.formatting},
        remove_columns=docs.column_names,
        cache_file_name=str(work / f"{tag}-tok.arrow"),
        new_fingerprint=short_hash([tag, "tok"]),
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
    # start (fork, pickling), as TRL packs fast in this process (figures: docs/benchmarks.md).
    pack_procs = max(1, min(num_proc, int(lengths.sum()) // PACK_TOKENS_PER_WORKER))
    kwargs = {
        **common,
        "num_proc": pack_procs if pack_procs > 1 else None,
        "cache_file_name": str(work / f"{tag}-pack.arrow"),
        "new_fingerprint": short_hash([tag, "pack"]),
        "desc": f"Packing {src.label} ({d.packing})",
    }
    packed = packing.get(d.packing).pack(docs, d.max_length, kwargs)
    rows = packed.with_format("arrow").map(
        _segments,
        batched=True,
        remove_columns=packed.column_names,
        cache_file_name=str(work / f"{tag}-rows.arrow"),
        new_fingerprint=short_hash([tag, "rows"]),
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
