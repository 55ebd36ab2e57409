"""Tokenize and pack one source: only as many randomly chosen documents as its share needs.

`prepare_source` estimates tokens per document from a sample (on each sample document's first
SAMPLE_CHARS characters), reads that many documents (plus `read_margin`, topped up if short) in
bounded batches, tokenizes them (encoder.py) into a flat token file of the work dir (token_store.py)
and packs them by index over their lengths (packing.py): a round of reading is a `Part`, its
tokens plus the plan of its rows. No token is copied until the output rows are written (sample.py).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts.fileio import canonical_hash
from openseek_cpt.data import STAGE, packing
from openseek_cpt.data.config import DataConfig
from openseek_cpt.data.encoder import Encoder, is_empty
from openseek_cpt.data.rows import StreamedRows
from openseek_cpt.data.sources import OpenSource
from openseek_cpt.data.token_store import TokenStore
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger

# Documents tokenized in-process to estimate tokens per document of a source.
ESTIMATE_DOCS = 256
# Characters of each sample document tokenized in this process (the estimate and the fast-path check):
# a longer document is checked on its prefix and its tokens extrapolated, so a 50 MB single-line
# document costs the main process no more than this.
SAMPLE_CHARS = 100_000
# Documents per batch encoded in this process (the array paths).
IN_PROCESS_BATCH = 8192
# Tokens per token file (a part): the writer deletes each once its rows are written.
PART_TOKENS = 1 << 26
# Largest document (UTF-8 bytes of text) the stage encodes; a larger one is refused, naming its row.
MAX_DOCUMENT_BYTES = 128 << 20
# Documents per batch an encoding worker process takes (the tokenizer's own and the Rust paths).
WORKER_BATCH = 1000

log = get_logger(STAGE)


def short_hash(obj: Any) -> str:
    """The datasets fingerprint of a build step: a stable hash of what shapes it."""
    return canonical_hash(obj)[:32]


@dataclass
class Part:
    """The documents of one round of reading: their tokens and the rows they pack into."""

    store: TokenStore
    plan: packing.Plan


@dataclass
class PackedSource:
    """One source's packed rows (its parts, in order) and what they cost."""

    source: OpenSource
    parts: list[Part] = field(default_factory=list)
    documents_read: int = 0
    tokens_read: int = 0
    tokens_dropped: int = 0
    special_text_documents: int = 0
    empty_documents: int = 0  # null, empty or whitespace-only texts: read, skipped

    def row_tokens(self) -> np.ndarray:
        return _concat([p.plan.row_tokens() for p in self.parts])

    def row_documents(self) -> np.ndarray:
        return _concat([p.plan.row_documents() for p in self.parts])

    def row_segments(self) -> np.ndarray:
        return _concat([np.diff(p.plan.row_offsets) for p in self.parts])


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64) if arrays else np.empty(0, np.int64)


def prepare_source(
    src: OpenSource, encoder: Encoder, d: DataConfig, seed: int, need: int, work: Path, build_id: str
) -> PackedSource:
    """Tokenize and pack enough randomly chosen documents of `src` for `need` rows (all if short)."""
    stream = src.rows if isinstance(src.rows, StreamedRows) else None
    if stream is not None:  # rows come in a seeded shuffled order: read them in that order
        seed = int(np.random.default_rng([seed, src.index, 1]).integers(2**31))
        stream.start(seed=seed, work=work / f"{build_id}-{src.index}-stream")
        n_docs = stream.fill(ESTIMATE_DOCS)
        order = np.arange(n_docs)
    else:
        n_docs = len(src.rows)
        order = np.random.default_rng([seed, src.index, 0]).permutation(n_docs)
    strategy = packing.get(d.packing)
    per_doc = estimate_tokens_per_doc(src, encoder, order[:ESTIMATE_DOCS], d.max_length, strategy)
    docs_needed = need if strategy.one_row_per_document else math.ceil(need * d.max_length / per_doc)
    take = math.ceil(docs_needed * (1 + d.read_margin)) + 1
    result = PackedSource(src)
    parts, pos = result.parts, 0
    while True:
        if stream is not None and not stream.exhausted:
            n_docs = stream.fill(pos + take)  # read only what this round takes
            order = np.arange(n_docs)
        chunk = order[pos : pos + take]
        if not len(chunk):  # a stream that ended exactly where the last round stopped
            break
        pos += len(chunk)
        new, lengths, special = tokenize_and_pack(
            src, encoder, chunk, d, work, f"{build_id}-{src.index}-{len(parts)}"
        )
        parts += new
        result.special_text_documents += special
        result.documents_read += len(chunk)
        result.empty_documents += len(chunk) - len(lengths)
        result.tokens_read += int(lengths.sum())
        if strategy.truncates_documents:
            result.tokens_dropped += int(np.maximum(lengths - d.max_length, 0).sum())
        have = sum(len(p.plan) for p in parts)
        if have >= need or (pos >= n_docs and (stream is None or stream.exhausted)):
            break
        take = math.ceil((need - have) * pos / have * (1 + d.read_margin)) + 1
        log.info(
            f"{src.label}: {have} rows from {pos} documents, short of {need}: topping up with {take} more"
        )
    if not result.tokens_read:
        raise UserError(
            f"{src.where}.path={src.config.path!r}: every document read ({result.documents_read}) is empty or "
            "whitespace only; check its text_field or formatting, or remove the source"
        )
    return result


def estimate_tokens_per_doc(
    src: OpenSource, encoder: Encoder, sample: np.ndarray, max_length: int, strategy: packing.Strategy
) -> float:
    """Mean tokens per document (capped at max_length where packing truncates), from a random sample."""
    import pyarrow.compute as pc

    table = src.rows.take(sample, src.columns)
    if src.content != "tokens":
        raw = encoder.texts(table, src.content, src.config.text_field, src.formatting)
        kept = np.array([not is_empty(t) for t in raw], dtype=bool)
        texts = [t for t, k in zip(raw, kept, strict=True) if k and t]  # empty texts: 0 tokens, skipped
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

    if isinstance(column, np.ndarray):  # flat ids (a token file)
        low, top = (int(column.min()), int(column.max())) if len(column) else (None, None)
    else:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        bounds = pc.min_max(pa.chunked_array([c.flatten() for c in chunks], type=pa.int32())).as_py()
        low, top = bounds["min"], bounds["max"]
    if top is not None and low is not None and (top >= vocab or low < 0):
        bad = top if top >= vocab else low
        raise UserError(
            f"{src.where}.path={src.config.path!r} holds token id {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab}) (vocab size {vocab}); it was tokenized with another tokenizer: "
            "re-tokenize it or use the matching data.tokenizer_dir"
        )


def check_document_sizes(src: OpenSource, texts: Any, indices: np.ndarray) -> None:
    """Refuse a document over MAX_DOCUMENT_BYTES: encoding it whole would hold its text and ids in
    memory several times over, and the stage's memory is bounded by its batch, not by one document."""
    import pyarrow.compute as pc

    sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False)
    if len(sizes) and np.nan_to_num(sizes, nan=0).max() > MAX_DOCUMENT_BYTES:
        k = int(np.nanargmax(sizes))
        raise UserError(
            f"{src.where}.path={src.config.path!r}: the document at row {int(indices[k])} holds "
            f"{int(sizes[k]):,} bytes of text, more than the {MAX_DOCUMENT_BYTES:,} one document may have; "
            "split it into documents (e.g. by chapter or file) and run again"
        )


def tokenize_and_pack(
    src: OpenSource, encoder: Encoder, indices: np.ndarray, d: DataConfig, work: Path, tag: str
) -> tuple[list[Part], np.ndarray, int]:
    """(the documents `indices` of `src` tokenized into token files and packed by index, their token
    lengths incl. eos (none for an empty text: it is skipped), documents whose text held special-token
    strings).

    A part (one token file) closes once it holds PART_TOKENS at a multiple of packing.PACK_BATCH
    documents, so its rows are those one file would give and the writer can delete each file as soon
    as it has written the part's rows: the peak disk stays near the output's size.
    """
    parts: list[Part] = []
    lengths_read: list[np.ndarray] = []
    special = 0
    store = TokenStore(work / f"{tag}-0-tokens.bin", encoder.eos)
    docs = tokens = 0

    def close() -> None:
        lengths = store.close()
        if src.content == "tokens" and store.tokens is not None:
            check_token_ids(src, store.tokens, len(encoder.tokenizer))
        parts.append(Part(store, packing.plan(d.packing, lengths, d.max_length)))
        lengths_read.append(lengths)

    try:
        for values, lengths, stored, n_special in encode_batches(src, encoder, indices, d.num_proc):
            special += n_special
            while len(lengths):
                # the first whole packing batch at which the file reaches PART_TOKENS, if in this batch
                ks = np.arange(1, len(lengths) + 1)
                at = ks[
                    ((docs + ks) % packing.PACK_BATCH == 0) & (tokens + np.cumsum(lengths) >= PART_TOKENS)
                ]
                n = int(at[0]) if len(at) else len(lengths)
                cut = int(stored[:n].sum())
                store.append(values[:cut], lengths[:n], stored[:n])
                docs, tokens = docs + n, tokens + int(lengths[:n].sum())
                values, lengths, stored = values[cut:], lengths[n:], stored[n:]
                if len(at):
                    close()
                    store = TokenStore(work / f"{tag}-{len(parts)}-tokens.bin", encoder.eos)
                    docs = tokens = 0
        close()
    except BaseException:
        for each in [*(part.store for part in parts), store]:
            each.delete()
        raise
    return parts, np.concatenate(lengths_read), special


def encode_batches(
    src: OpenSource, encoder: Encoder, indices: np.ndarray, num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """(ids, ids per document, ids of each held, documents with special-token text) of `indices`, batch
    by batch, in order (a document holding one id fewer than its length lacks its eos: `Encoder.documents`).

    The array paths (gigatoken on its own Rust threads, tiktoken on num_proc threads, pre-tokenized ids)
    encode in this process; the tokenizer's own `__call__` and the Rust backend run on num_proc forked
    workers (each reads its batch's rows itself), as the Python around them is the cost.
    """
    in_process = src.content == "tokens" or encoder.path in ("gigatoken", "tiktoken")
    workers = 1 if in_process else max(1, min(num_proc, len(indices) // WORKER_BATCH))
    size = IN_PROCESS_BATCH if in_process else WORKER_BATCH
    batches = [indices[i : i + size] for i in range(0, len(indices), size)]
    if workers == 1:
        encoder.threads = num_proc if encoder.path == "tiktoken" else 1
        try:
            yield from (_encode(src, encoder, b) for b in batches)
        finally:
            encoder.threads = 1
        return
    global _WORK
    _WORK = (src, encoder)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_encode_in_worker, batches)
    finally:
        _WORK = None


# What forked encoding workers read: (source, encoder), set just before the pool forks.
_WORK: tuple[OpenSource, Encoder] | None = None


def _encode_in_worker(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    assert _WORK is not None, "set before the pool forks"
    src, encoder = _WORK
    return _encode(src, encoder, indices)


def _encode(
    src: OpenSource, encoder: Encoder, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    table = src.rows.take(indices, src.columns)
    if src.content == "text":
        check_document_sizes(src, table.column(src.config.text_field), indices)
    values, lengths, stored, special = encoder.documents(
        table, src.content, src.config.text_field, src.formatting
    )
    return values, lengths, stored, int(special.sum())
