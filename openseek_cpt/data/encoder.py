"""Documents -> token ids for the data stage: raw text is text, and the fastest path that gives the same ids.

Guarantees:
- A null, empty or whitespace-only text is no document (`__call__` drops it; the data stage counts
  the rows dropped as `documents_empty`): it would be a lone eos, packed and trained on.
- Every document ends with exactly one eos (a trailing eos the tokenizer or the text added is
  dropped first), and pre-tokenized documents get an eos only where they lack one.
- Raw text is text: a special-token string inside a document (`<|endoftext|>`, `<|extra_204|>`
  in a web page) is encoded as ordinary text, never as a control token. Documents that contained
  such strings are counted (column `special_text`), and the data stage reports the count.
- The ids are those of `tokenizer(texts, split_special_tokens=True)`. A faster path is used only
  after it gave the same ids on the estimate sample (`choose_path`), the fastest first: `gigatoken`,
  the same BPE in Rust over the Arrow text buffers on all cores (giga.py), `tiktoken`, the tiktoken
  `Encoding` inside a tokenizer's remote code (OpenSeek's, Qwen's), its `encode_to_numpy` on
  `threads` threads (ids stay in numpy down to Arrow), or `rust`, the Rust backend's
  `encode_batch_fast` for HF fast tokenizers. A path that disagrees is logged and left off; `tokenizer` (the tokenizer's own
  `__call__`) is always correct. Which path ran is in the log and in the manifest.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from typing import Any

import numpy as np

from openseek_cpt.data import STAGE, giga
from openseek_cpt.data.doc_arrays import documents_table, drop_trailing_eos, with_eos
from openseek_cpt.logs import get_logger

log = get_logger(STAGE)

PATHS = ("gigatoken", "tiktoken", "rust", "tokenizer")


class Encoder:
    """Rows (an Arrow batch) -> documents `input_ids` (int32) ending with eos, `doc_start`, `special_text`.

    A `doc_start` column (1 at a document's first token) travels through packing, so segment
    boundaries (wrapped packing) and documents used can be derived honestly afterwards.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        # Documents are longer than the model on purpose (packing splits them): silence the length warning.
        tokenizer.model_max_length = int(1e30)
        self.eos = int(tokenizer.eos_token_id)
        self.encoding = _tiktoken_encoding(tokenizer)
        specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        specials |= set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        if self.encoding is not None:
            specials |= set(self.encoding.special_tokens_set)
        ordered = sorted((s for s in specials if s), key=len, reverse=True)
        self.special_pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        # Cheap prefilter before the regex: every special string starts with one of these.
        self.special_heads = tuple(sorted({s[:2] for s in ordered}))
        # Does `tokenizer(..., split_special_tokens=True)` really encode specials as text? Remote
        # code that overrides `tokenize` (OpenSeek's, Qwen's) ignores the flag.
        self.splits_specials = self._probe_split_specials(ordered)
        # tiktoken path: does the tokenizer NFC-normalize before tiktoken (Qwen's does)?
        self.nfc = self.encoding is not None and self._probe_nfc()
        self.path = "tokenizer"
        self.path_note = "not checked yet"
        self.giga: giga.Giga | None = None
        # Threads of the tiktoken path's batch encoder (the data stage sets it when it encodes in-process).
        self.threads = 1

    # ------------------------------------------------------------------ choosing the path

    def choose_path(self, texts: Sequence[str | None]) -> list[list[int]]:
        """Reference ids of `texts`; turns on the first fast path that gives the same ids on them.

        Documents containing special-token strings are left out of the comparison when the
        tokenizer cannot encode them as text by itself (its reference is then assembled by us).
        """
        docs = [t or "" for t in texts]
        reference = self.reference_ids(docs)
        compare = [i for i, t in enumerate(docs) if self.splits_specials or not self.has_special_text(t)]
        notes: list[str] = []
        for path in self._candidates(notes):
            got = self._fast_ids(path, [docs[i] for i in compare])
            bad = [i for i, ids in zip(compare, got, strict=True) if ids != reference[i]]
            if not bad:
                self.path = path
                chosen = f"{path}: same ids as tokenizer(texts) on {len(compare)} sample documents"
                self.path_note = "; ".join([chosen, *notes])
                break
            notes.append(
                f"{path} path disagrees with tokenizer(texts) on {len(bad)} of {len(compare)} sample "
                f"documents (first: sample document {bad[0]}); not used"
            )
        else:
            self.path = "tokenizer"
        if self.path == "tokenizer":
            self.path_note = "; ".join(notes) or "no fast path for this tokenizer"
            self.path_note += "; using tokenizer(texts)"
        log.info(f"tokenizer path: {self.path_note}")
        return reference

    def _candidates(self, notes: list[str]) -> list[str]:
        out = []
        self.giga, why = giga.load(self.tokenizer, self.encoding)
        if self.giga is not None:
            out.append("gigatoken")
        else:
            notes.append(f"gigatoken path not available: {why}")
        if self.encoding is not None:
            out.append("tiktoken")
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if (
            getattr(self.tokenizer, "is_fast", False)
            and backend is not None
            and hasattr(backend, "encode_batch_fast")
            and backend.truncation is None
            and backend.padding is None
        ):
            out.append("rust")
        return out

    # ------------------------------------------------------------------ encoding

    def __call__(self, table: Any, content: str, text_field: str, formatting: Any) -> Any:
        return self._table(self.documents(table, content, text_field, formatting))

    def documents(
        self, table: Any, content: str, text_field: str, formatting: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32, ids per document with its eos, ids of each document held in `ids`, special-token
        text per document) of an Arrow batch of rows.

        Where a document's held count is one less than its length, its final eos is not in `ids`: the
        array paths leave it out (inserting it would copy every id); the stage's token store supplies it
        when rows are gathered (token_store.py), `with_eos` where the ids are needed whole.
        """
        if content == "tokens":
            return self._ids_arrays(table.column("input_ids"))
        if content == "text" and self.path == "gigatoken":
            return self._text_column_arrays(table.column(text_field))
        texts = self.texts(table, content, text_field, formatting)
        return self._texts_arrays([t for t in texts if not is_empty(t)])

    @staticmethod
    def texts(table: Any, content: str, text_field: str, formatting: Any) -> list[str | None]:
        if content == "formatting":
            return [formatting(row) for row in table.to_pylist()]
        return table.column(text_field).to_pylist()

    def encode(self, texts: Sequence[str | None]) -> list[list[int]]:
        """Token ids per text (specials in text as text), ending with exactly one eos."""
        docs = [t or "" for t in texts]
        ids = self.reference_ids(docs) if self.path == "tokenizer" else self._fast_ids(self.path, docs)
        return self.end_with_eos(ids)

    def reference_ids(self, texts: list[str]) -> list[list[int]]:
        """`tokenizer(texts, split_special_tokens=True)`; special strings as text even if it ignores the flag."""
        ids = self.tokenizer(texts, split_special_tokens=True)["input_ids"]
        if not self.splits_specials:
            for i, t in enumerate(texts):
                if self.has_special_text(t):
                    ids[i] = self._encode_around_specials(t)
        return ids

    def _encode_around_specials(self, text: str) -> list[int]:
        """Ids of `text` whose special strings are encoded as text: each is cut after its first
        character, so no piece matches a special (a valid encoding of the same text)."""
        pieces, last = [], 0
        assert self.special_pattern is not None, "called only for a text with specials"
        for m in self.special_pattern.finditer(text):
            pieces += [text[last : m.start()], m.group()[:1], m.group()[1:]]
            last = m.end()
        pieces.append(text[last:])
        ids: list[int] = []
        for piece in pieces:
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _fast_ids(self, path: str, texts: list[str]) -> list[list[int]]:
        if path in (
            "gigatoken",
            "tiktoken",
        ):  # the arrays the stage uses, as lists (choose_path compares these)
            values, lengths = self.arrays(texts, path)
            return [part.tolist() for part in np.split(values, np.cumsum(lengths)[:-1])] if texts else []
        backend = self.tokenizer._tokenizer
        backend.encode_special_tokens = True  # raw text is text (the state also travels to workers)
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]

    def arrays(self, texts: Any, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(all ids int32, ids per text) of `texts` (a list or an Arrow string array without nulls)
        on an array path (gigatoken, tiktoken), specials in text as text, before any eos."""
        import pyarrow as pa

        path = path or self.path
        if path == "gigatoken":
            if self.nfc:
                texts = _nfc(texts)
            assert self.giga is not None, "the gigatoken path is chosen only when it loaded"
            return self.giga.encode(
                texts if isinstance(texts, pa.Array) else pa.array(texts, pa.large_string())
            )
        if isinstance(texts, pa.Array | pa.ChunkedArray):
            texts = texts.to_pylist()
        return self._tiktoken_arrays(texts)

    def _tiktoken_arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids int32, ids per text) from the tiktoken Encoding, specials in text as text.

        `encode_to_numpy` hands each text's ids over as a buffer (no Python int per token) and
        releases the GIL while it encodes: on `threads` threads, each encoding a contiguous slice,
        it beats the Encoding's own `encode_ordinary_batch` (bench/data_throughput.py; docs/benchmarks.md).
        """
        if self.nfc:
            texts = [
                t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts
            ]
        encode = self.encoding.encode_to_numpy

        def slice_ids(part: list[str]) -> tuple[np.ndarray, np.ndarray]:
            arrays = [encode(t, allowed_special=set(), disallowed_special=()) for t in part]
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            return (np.concatenate(arrays) if arrays else np.empty(0, np.uint32)), lengths

        if self.threads > 1 and len(texts) > 1:
            step = -(-len(texts) // (self.threads * 4))  # a few slices per thread: even finish
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(slice_ids, [texts[i : i + step] for i in range(0, len(texts), step)]))
        else:
            parts = [slice_ids(texts)]
        values = np.concatenate([v for v, _ in parts]).astype(np.int32)
        return values, np.concatenate([n for _, n in parts])

    def has_special_text(self, text: str) -> bool:
        return (
            self.special_pattern is not None
            and any(h in text for h in self.special_heads)
            and self.special_pattern.search(text) is not None
        )

    def end_with_eos(self, ids: list[list[int]]) -> list[list[int]]:
        eos = self.eos
        for x in ids:  # the lists are ours: edit in place
            while x and x[-1] == eos:  # added by the tokenizer
                x.pop()
            x.append(eos)
        return ids

    def from_texts(self, texts: list[str | None]) -> Any:
        return self._table(self._texts_arrays(texts))

    def from_text_column(self, column: Any) -> Any:
        """`from_texts` of an Arrow text column without a Python object per text (the gigatoken path):
        empty texts dropped, special-token strings counted, ids from the Arrow buffers."""
        return self._table(self._text_column_arrays(column))

    def from_ids(self, column: Any) -> Any:
        """Pre-tokenized documents: append eos only to those that do not already end with it."""
        return self._table(self._ids_arrays(column))

    def _table(self, docs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> Any:
        values, lengths, stored, special = docs
        return documents_table(with_eos(values, lengths, stored, self.eos), lengths, special)

    def _texts_arrays(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        clean = [t or "" for t in texts]
        if not clean:  # a batch of empty texts only (tokenizer([]) is not an empty batch everywhere)
            return np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
        special = np.fromiter((self.has_special_text(t) for t in clean), dtype=np.uint8, count=len(clean))
        if self.path in ("gigatoken", "tiktoken"):  # ids stay in numpy from the encoder to Arrow
            values, kept = drop_trailing_eos(*self.arrays(clean), self.eos)
            return values, kept + 1, kept, special
        docs = self.encode(clean)
        lengths = np.fromiter((len(x) for x in docs), dtype=np.int64, count=len(docs))
        values = np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
        return values, lengths, lengths, special

    def _text_column_arrays(self, column: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        from openseek_cpt.data.rows import one_chunk

        column = one_chunk(column)
        # empty: no bytes (read from the offsets), or whitespace only (a check that stops at the first other character)
        empty = pc.or_kleene(pc.equal(pc.binary_length(column), 0), pc.utf8_is_space(column))
        keep = pc.invert(pc.fill_null(empty, True))
        if not pc.all(keep).as_py():  # a copy of the texts only where one is dropped
            column = column.filter(keep)
        if self.special_pattern is None or not len(column):
            special = np.zeros(len(column), dtype=np.uint8)
        else:
            found = pc.match_substring_regex(column, self.special_pattern.pattern)
            special = found.to_numpy(zero_copy_only=False).astype(np.uint8)
        values, kept = drop_trailing_eos(*self.arrays(column), self.eos)
        return values, kept + 1, kept, special

    def _ids_arrays(self, column: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        from openseek_cpt.data.rows import one_chunk

        column = one_chunk(column)
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        ends = np.cumsum(lengths)
        last = np.where(lengths > 0, values[np.maximum(ends - 1, 0)] if len(values) else -1, -1)
        needs_eos = last != self.eos  # its eos is supplied, not inserted (see `documents`)
        return values, lengths + needs_eos, lengths, np.zeros(len(lengths), dtype=np.uint8)

    # ------------------------------------------------------------------ probes

    def _probe_split_specials(self, specials: list[str]) -> bool:
        if not specials:
            return True
        ids = self.tokenizer([f"a{specials[-1]}b"], split_special_tokens=True, add_special_tokens=False)
        control = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        control |= set((getattr(self.tokenizer, "added_tokens_encoder", {}) or {}).values())
        if self.encoding is not None:
            control |= {self.encoding.encode_single_token(s) for s in self.encoding.special_tokens_set}
        return not (set(ids["input_ids"][0]) & control)

    def _probe_nfc(self) -> bool:
        decomposed, composed = "Cafe\u0301 n\u0303", "Caf\u00e9 \u00f1"
        ids = self.tokenizer([decomposed, composed], add_special_tokens=False)["input_ids"]
        return ids[0] == ids[1] != self.encoding.encode_ordinary(decomposed)


def is_empty(text: str | None) -> bool:
    """A null, empty or whitespace-only text: no document (it would be a lone eos), skipped and counted."""
    return not text or text.isspace()


def _nfc(texts: Any) -> Any:
    """`texts` NFC-normalized (what a tiktoken tokenizer that normalizes does before its BPE), by
    Python's own `unicodedata` (the tokenizer's). An Arrow array is copied only where a text changes:
    ASCII texts (found from the bytes) are NFC already, the others are checked with NFC's quick check."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(texts, pa.Array | pa.ChunkedArray):
        return [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
    from openseek_cpt.data.rows import one_chunk

    texts = one_chunk(texts)
    other = np.flatnonzero(~ascii_texts(texts))
    if not len(other):
        return texts
    changed = {
        int(i): unicodedata.normalize("NFC", t)
        for i, t in zip(other.tolist(), texts.take(pa.array(other)).to_pylist(), strict=True)
        if t is not None and not unicodedata.is_normalized("NFC", t)
    }
    if not changed:
        return texts
    mask = np.zeros(len(texts), dtype=bool)
    mask[list(changed)] = True
    return pc.replace_with_mask(texts, pa.array(mask), pa.array(list(changed.values()), texts.type))


def ascii_texts(texts: Any) -> np.ndarray:
    """Per text of an Arrow string array, whether all its bytes are ASCII (null and empty: True), from
    its data buffer in one numpy pass (about 4x faster than Arrow's `string_is_ascii`)."""
    import pyarrow as pa

    _, offsets, data = texts.buffers()
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width)[texts.offset : texts.offset + len(texts) + 1].astype(
        np.int64
    )
    out = np.ones(len(texts), dtype=bool)
    filled = np.flatnonzero(offsets[1:] > offsets[:-1])  # a null's offsets are equal too
    if len(filled):
        data = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]
        # the bytes from each filled text's start to the next one's: its own (texts between hold none)
        out[filled] = np.maximum.reduceat(data, offsets[filled] - offsets[0]) < 0x80
    return out


def _tiktoken_encoding(tokenizer: Any) -> Any:
    """The `tiktoken.Encoding` a remote-code tokenizer keeps as an attribute, if any."""
    try:
        import tiktoken
    except ImportError:
        return None
    found = [v for v in vars(tokenizer).values() if isinstance(v, tiktoken.Encoding)]
    return found[0] if len(found) == 1 else None
