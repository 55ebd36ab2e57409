"""Tokenized documents of one read round as flat int32 tokens in a file of the stage's work dir.

4 bytes a token plus an int64 offset a document (in memory): the only copy of the tokens between
encoding and the output rows, which gather their segments from it (`gather`). The data stage
deletes each store as soon as its rows are written, so the peak disk is about the output's size.
Offsets are int64 throughout: nothing wraps past 2**31 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TokenStore:
    """Append documents (`append`), then `close` and read token ranges of them (`gather`)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (open until close(), across appends)
        self._lengths: list[np.ndarray] = []
        self.doc_offsets = np.zeros(1, np.int64)
        self.tokens: np.ndarray | None = None

    def append(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as all their ids (int32) and ids per document."""
        np.ascontiguousarray(values, dtype=np.int32).tofile(self._file)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> np.ndarray:
        """Finish writing; returns the documents' lengths. The tokens are then memory-mapped."""
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if self.doc_offsets[-1]:
            self.tokens = np.memmap(self.path, dtype=np.int32, mode="r")
        if self.path.stat().st_size != 4 * int(self.doc_offsets[-1]):
            raise OSError(
                f"{self.path}: {self.path.stat().st_size} bytes written, {4 * self.doc_offsets[-1]} expected"
            )
        return lengths

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
        return np.asarray(self.tokens[positions], dtype=np.int32)

    def delete(self) -> None:
        """Remove the file (its rows are written, or the stage failed)."""
        self._file.close()
        self.tokens = None
        self.path.unlink(missing_ok=True)
