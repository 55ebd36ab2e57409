"""Megatron-LM's indexed dataset (`PREFIX.bin` + `PREFIX.idx`), read and written without Megatron.

Megatron-LM and MindSpore Transformers read pretraining data in this format, and existing corpora
(the OpenSeek pretraining shards are `*_text_document` prefixes) ship in it. Written from the public
description in Megatron-LM's `megatron/core/datasets/indexed_dataset.py` (`_IndexWriter`,
`_IndexReader`, `IndexedDatasetBuilder`); all integers are little-endian.

`PREFIX.bin`: the tokens of every sequence back to back, in the index dtype, no header.

`PREFIX.idx`:

    offset   size    field
    0        9       magic b"MMIDIDX\\x00\\x00"
    9        8       version, uint64, always 1
    17       1       dtype code of the tokens in .bin, uint8 (table below)
    18       8       sequence count N, uint64
    26       8       document count D, uint64 (entries of the document index array = documents + 1)
    34       4 * N   sequence lengths in tokens, int32
    34+4N    8 * N   sequence pointers: byte offset of each sequence in .bin, int64
    34+12N   8 * D   document indices: the sequence index where each document starts, int64,
                     from 0 up to N (document k is sequences [d[k], d[k+1]))
    then, in multimodal datasets only, N int8 sequence modes (ignored here)

    dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16

Megatron picks the token dtype from the vocabulary size: uint16 when `vocab_size < 65500`, else
int32 (`DType.optimal_dtype`); we do the same. GPT pretraining data has one sequence per document
(each ending with eos), and that is how we write it: one sequence per document segment of a packed
row (`seq_lengths`), so document boundaries survive the export.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openseek_cpt.artifacts.fileio import fsync_dir
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
TOKEN_DTYPE_CODES = (1, 2, 3, 4, 5, 8)  # float codes are legal in the format, never token ids
_EXPORT_BATCH_ROWS = 1024
_WRITE_BLOCK_TOKENS = 1 << 16  # 256 KiB of int32: stays in cache between check, cast and write
_FIX = "re-create it with Megatron's tools/preprocess_data.py or `openseek-cpt export-megatron`"


def read_rows(index: MegatronIndex, bin_path: str | Path, rows: np.ndarray) -> pa.Table:
    """The sequences `rows` (in that order) read in place from a memory map of `.bin`: only their
    bytes are touched, so the work follows the rows asked for, not the size of the file."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = index.sequence_lengths[rows].astype(np.int64)
    pointers = index.sequence_pointers[rows]
    itemsize = np.dtype(index.dtype).itemsize
    bin_path = Path(bin_path)
    data = np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_path.stat().st_size else np.zeros(0, np.uint8)
    values = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for p, n in zip(pointers.tolist(), lengths.tolist(), strict=True):
        values[pos : pos + n] = np.frombuffer(data[p : p + n * itemsize], dtype=index.dtype)
        pos += n
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # int64: no wrap past 2**31 tokens
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table({"input_ids": column})


def fingerprint(prefix: str | Path, sample_blocks: int = 64, block: int = 1 << 16) -> str:
    """Content fingerprint without reading the shard: the whole `.idx` (lengths and pointers of every
    sequence), the size of `.bin` and `sample_blocks` blocks of it at fixed, evenly spaced offsets
    (all of it when that is smaller). Same files -> same fingerprint, wherever they lie."""
    digest = hashlib.sha256()
    with open(_idx_path(prefix), "rb") as f:  # ~20 bytes per sequence: streamed
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    bin_path = _bin_path(prefix)
    size = bin_path.stat().st_size
    digest.update(f"|bin {size}|".encode())
    with open(bin_path, "rb") as f:
        if size <= sample_blocks * block:
            digest.update(f.read())
        else:
            for k in range(sample_blocks):
                f.seek((size - block) * k // (sample_blocks - 1))
                digest.update(f.read(block))
    return digest.hexdigest()


def export_dataset(dataset: datasets.Dataset, prefix: str | Path, vocab_size: int) -> dict[str, Any]:
    """Stream a prepared split (`input_ids`, `seq_lengths`) into PREFIX.bin/.idx; returns the
    format's parameters for its sidecar (format, vocab_size, dtype).

    One Megatron sequence (and document) per document segment; a dataset without `seq_lengths`
    gives one per row. Memory holds one Arrow batch plus the per-sequence lengths, as in
    Megatron's own builder; the files appear only when complete.
    """
    if "input_ids" not in dataset.column_names:
        raise UserError(f"export: the dataset has no `input_ids` column (columns: {dataset.column_names})")
    has_segments = "seq_lengths" in dataset.column_names
    rows = dataset.select_columns(["input_ids", "seq_lengths"] if has_segments else ["input_ids"])
    rows = rows.with_format("arrow")
    with _Writer(prefix, vocab_size) as writer:
        for start in range(0, len(rows), _EXPORT_BATCH_ROWS):
            row = start  # Record batches keep both columns aligned without copying chunks together.
            for batch in rows[start : start + _EXPORT_BATCH_ROWS].to_batches():
                ids = batch.column("input_ids")
                row_lengths = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False)
                if has_segments:
                    lengths = _segment_lengths(batch.column("seq_lengths"), row_lengths, row)
                else:
                    lengths = row_lengths
                writer.add(ids.flatten().to_numpy(zero_copy_only=False), lengths)
                row += batch.num_rows
    return {"format": "megatron", "vocab_size": vocab_size, "dtype": token_dtype(vocab_size).__name__}


def write_sequences(
    prefix: str | Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], vocab_size: int
) -> None:
    """Write PREFIX.bin/.idx from (token ids, lengths of the consecutive sequences they form) chunks,
    one document per sequence: big files without a Python call per document."""
    with _Writer(prefix, vocab_size) as writer:
        for values, lengths in chunks:
            writer.add(np.asarray(values), np.asarray(lengths, dtype=np.int64))


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice (`DType.optimal_dtype`): uint16 below 65,500 token ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class MegatronIndex:
    """A parsed `.idx` file (the arrays are views of a memory map)."""

    path: Path
    dtype: type[np.number]
    sequence_lengths: np.ndarray  # int32, N
    sequence_pointers: np.ndarray  # int64, N: byte offsets in .bin
    document_indices: np.ndarray  # int64, documents + 1


def read_index(prefix: str | Path) -> MegatronIndex:
    """Parse PREFIX.idx and check it against PREFIX.bin; any inconsistency is a one-line UserError."""
    idx_path, bin_path = _idx_path(prefix), _bin_path(prefix)
    where = f"megatron source {prefix}"
    for p in (idx_path, bin_path):
        if not p.is_file():
            raise UserError(
                f"{where}: {p} does not exist; a Megatron dataset needs both PREFIX.bin and PREFIX.idx"
            )
    idx_size = idx_path.stat().st_size
    if idx_size < HEADER_SIZE:
        raise UserError(
            f"{where}: {idx_path} has {idx_size} bytes, less than the {HEADER_SIZE}-byte header (truncated .idx); {_FIX}"
        )
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    (version,) = struct.unpack("<Q", header[9:17])
    code = header[17]
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])
    if header[:9] != MAGIC:
        raise UserError(
            f"{where}: {idx_path} starts with {header[:9]!r}, not the Megatron magic {MAGIC!r}; {_FIX}"
        )
    if version != VERSION:
        raise UserError(
            f"{where}: {idx_path} has format version {version}, only version {VERSION} exists; {_FIX}"
        )
    if code not in TOKEN_DTYPE_CODES:
        known = ", ".join(f"{c}={DTYPE_CODES[c].__name__}" for c in TOKEN_DTYPE_CODES)
        raise UserError(
            f"{where}: {idx_path} has dtype code {code}, not an integer token dtype ({known}); {_FIX}"
        )
    needed = HEADER_SIZE + 12 * n_seq + 8 * n_doc
    if idx_size < needed:
        raise UserError(
            f"{where}: {idx_path} has {idx_size} bytes but its header announces {n_seq} sequences and {n_doc} document indices ({needed} bytes; truncated .idx); {_FIX}"
        )
    mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=HEADER_SIZE)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=HEADER_SIZE + 4 * n_seq)
    documents = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=HEADER_SIZE + 12 * n_seq)
    dtype = DTYPE_CODES[code]
    bin_size = bin_path.stat().st_size
    if n_seq:
        if int(lengths.min()) < 0 or int(pointers.min()) < 0:
            raise UserError(f"{where}: {idx_path} has negative sequence lengths or pointers; {_FIX}")
        ends = pointers + lengths.astype(np.int64) * np.dtype(dtype).itemsize
        last = int(np.argmax(ends))
        if int(ends[last]) > bin_size:
            raise UserError(
                f"{where}: sequence {last} ends at byte {int(ends[last])} but {bin_path} has {bin_size} bytes (truncated .bin, or pointers past its end); {_FIX}"
            )
    if n_doc == 0 or documents[0] != 0 or documents[-1] != n_seq or bool(np.any(np.diff(documents) < 0)):
        raise UserError(
            f"{where}: {idx_path} has document indices that do not rise from 0 to the sequence count {n_seq}; {_FIX}"
        )
    return MegatronIndex(idx_path, dtype, lengths, pointers, documents)


# --- writing ---------------------------------------------------------------------------------------


class _Writer:
    """Append tokens to a temp .bin, keep only the lengths, write .idx at the end, rename both."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
            raise UserError(
                f"export: vocab_size {vocab_size!r} must be a positive integer (the tokenizer's vocabulary size)"
            )
        self.prefix = str(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.lengths: list[np.ndarray] = []
        self.buffer = np.empty(_WRITE_BLOCK_TOKENS, dtype=self.dtype)
        self.tmp_bin = temp_path(_bin_path(self.prefix), "tmp")
        self.tmp_idx = temp_path(_idx_path(self.prefix), "tmp")

    def __enter__(self) -> _Writer:
        directory = Path(self.prefix).parent
        directory.mkdir(parents=True, exist_ok=True)
        for final in (_bin_path(self.prefix), _idx_path(self.prefix)):  # a killed writer's temps
            sweep_leftovers(directory, final.name)
        self.bin_file = open(self.tmp_bin, "wb")  # noqa: SIM115 (closed in __exit__)
        return self

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Append the tokens `values`, which form consecutive sequences of `lengths` tokens."""
        if values.size and values.dtype.kind not in "iu":
            raise UserError(f"export: token ids must be integers, got {values.dtype}; rebuild the dataset")
        # Cache-sized blocks: check, cast and write each while it is in cache, so the input is
        # read from memory once (three passes over a whole batch ran at a third of copy speed).
        unsigned = values.view(f"u{values.dtype.itemsize}") if values.dtype.kind == "i" else values
        for start in range(0, values.size, _WRITE_BLOCK_TOKENS):
            block = unsigned[start : start + _WRITE_BLOCK_TOKENS]
            # Viewed as unsigned, negative ids are huge: one max finds both kinds of bad id.
            if int(block.max()) >= self.vocab_size:
                bad = values[start : start + _WRITE_BLOCK_TOKENS]
                lo, hi = int(bad.min()), int(bad.max())
                raise UserError(
                    f"export: token id {lo if lo < 0 else hi} lies outside the vocabulary [0, {self.vocab_size}); pass the tokenizer's vocab size or rebuild the dataset"
                )
            out = self.buffer[: block.size]
            np.copyto(out, block, casting="unsafe")  # ids are in [0, vocab) now, so the cast is exact
            self.bin_file.write(out.data)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # the fsync policy (fileio): data on disk before the rename shows it
            self.bin_file.flush()
            os.fsync(self.bin_file.fileno())
        self.bin_file.close()
        if exc_type is not None:
            for p in (self.tmp_bin, self.tmp_idx):
                Path(p).unlink(missing_ok=True)
            return
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            Path(self.tmp_bin).unlink(missing_ok=True)
            raise UserError(
                f"export: a document of {int(lengths.max())} tokens does not fit Megatron's int32 lengths"
            )
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        documents = np.arange(lengths.size + 1, dtype=np.int64)  # one document per sequence
        code = next(c for c, t in DTYPE_CODES.items() if t is self.dtype)
        with open(self.tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, code, lengths.size, documents.size))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(documents.tobytes())
            f.flush()
            os.fsync(f.fileno())
        # Old .idx out first, new .idx in last: a reader never pairs a new .bin with an old .idx.
        _idx_path(self.prefix).unlink(missing_ok=True)
        os.replace(self.tmp_bin, _bin_path(self.prefix))
        os.replace(self.tmp_idx, _idx_path(self.prefix))
        fsync_dir(Path(self.prefix).parent)


def _segment_lengths(seq_lengths: pa.Array, row_lengths: np.ndarray, row_start: int) -> np.ndarray:
    """Flatten the rows' `seq_lengths`, checking that each row's segments add up to its length."""
    lengths = seq_lengths.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    counts = pc.list_value_length(seq_lengths).fill_null(0).to_numpy(zero_copy_only=False)
    # Segments add up to their rows iff the running total at each row's last segment equals the
    # running row total (and rows without segments are empty).
    seg_ends = np.cumsum(lengths)
    row_ends = np.cumsum(row_lengths)
    got = seg_ends[np.maximum(np.cumsum(counts) - 1, 0)] if lengths.size else np.zeros_like(row_ends)
    bad = np.flatnonzero(np.where(counts > 0, got != row_ends, row_lengths != 0))
    if bad.size or (lengths.size and int(lengths.min()) < 0):
        i = (
            int(bad[0])
            if bad.size
            else int(np.repeat(np.arange(len(counts)), counts)[np.argmax(lengths < 0)])
        )
        raise UserError(
            f"export: row {row_start + i}: seq_lengths {seq_lengths[i].as_py()} do not split its {int(row_lengths[i])} tokens; rebuild the dataset with `openseek-cpt data`"
        )
    return lengths


# --- reading ---------------------------------------------------------------------------------------


def _idx_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".idx")


def _bin_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + ".bin")
