"""Tokenized documents of one read round as flat int32 tokens in a file of the stage's work dir.

4 bytes a token plus two int64 counts a document (in memory): the only copy of the tokens between
encoding and the output rows, which gather their segments from it (`gather`). A document's final
eos may be left out of what is appended (`stored` one less than its length: the encoder's array
paths do, as inserting it would copy every id): the file then ends with one eos token, which
`gather` reads wherever a segment ends on such a document. The data stage deletes each store as soon
as its rows are written, so the peak disk is about the output's size. Offsets are int64 throughout:
nothing wraps past 2**31 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenStore:
    """Append documents (`append`), then `close` and read token ranges of them (`gather`)."""

    def __init__(self, path: Path, eos: int | None = None):
        self.path = path
        self.eos = eos
        self._file = open(path, "wb")  # noqa: SIM115 (open until close(), across appends)
        self._lengths: list[np.ndarray] = []
        self._stored: list[np.ndarray] = []
        self.lengths = np.empty(0, np.int64)
        self.stored = np.empty(0, np.int64)
        self.doc_offsets = np.zeros(1, np.int64)  # of the stored ids
        self.eos_at = -1  # the file's eos token, where some document's eos is not stored
        self.tokens: np.ndarray | None = None

    def append(self, values: np.ndarray, lengths: np.ndarray, stored: np.ndarray | None = None) -> None:
        """Documents given as their ids (int32), `lengths` (eos included) and how many of each one's ids
        `values` holds (default: all; one less: its final eos is left out)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        stored = lengths if stored is None else np.asarray(stored, dtype=np.int64)
        if not ((stored == lengths) | (stored == lengths - 1)).all():
            raise ValueError("a document's stored ids are its length or one less (its eos left out)")
        np.ascontiguousarray(values, dtype=np.int32).tofile(self._file)
        self._lengths.append(lengths)
        self._stored.append(stored)

    def close(self) -> np.ndarray:
        """Finish writing; returns the documents' lengths (eos included). The tokens are then memory-mapped."""
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
        self.stored = np.concatenate(self._stored) if self._stored else np.empty(0, np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(self.stored)]).astype(np.int64)
        total = int(self.doc_offsets[-1])
        if (self.stored < self.lengths).any():
            if self.eos is None:
                raise ValueError(f"{self.path}: documents without their eos, and no eos id to supply it")
            np.array([self.eos], dtype=np.int32).tofile(self._file)
            self.eos_at, total = total, total + 1
        self._file.close()
        if self.path.stat().st_size != 4 * total:
            raise OSError(f"{self.path}: {self.path.stat().st_size} bytes written, {4 * total} expected")
        if total:
            self.tokens = np.memmap(self.path, dtype=np.int32, mode="r")
        return self.lengths

    def gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The tokens of segments (document, first token, length), concatenated, int32."""
        total = int(length.sum())
        if not total:
            return np.empty(0, np.int32)
        if self.tokens is None:
            raise RuntimeError(f"{self.path}: gather before the token store is opened")
        begin = self.doc_offsets[doc] + start
        before = np.cumsum(length) - length
        positions = np.repeat(begin - before, length) + np.arange(total, dtype=np.int64)
        if self.eos_at >= 0:  # a segment that ends a document whose eos is not stored reads the file's eos
            ends_eos = (start + length == self.lengths[doc]) & (self.stored[doc] < self.lengths[doc])
            positions[(before + length - 1)[ends_eos & (length > 0)]] = self.eos_at
        return np.asarray(self.tokens[positions], dtype=np.int32)

    def delete(self) -> None:
        """Remove the file (its rows are written, or the stage failed)."""
        self._file.close()
        self.tokens = None
        self.path.unlink(missing_ok=True)
