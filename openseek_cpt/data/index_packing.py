"""Packing by index: which token range of which document fills each row, from document lengths only.

No token is copied to pack: a `Plan` lists each row's segments (document, first token, length) and
the rows are assembled once, when the output is written. The strategies mean exactly what TRL's
`pack_dataset` (and `truncate_dataset`) mean for documents packed through `Dataset.map` in its default
batches of PACK_BATCH documents: tests/data/test_packing.py packs the same documents both ways and
gets the same rows, so TRL stays the reference of every strategy.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

# Documents packed together: TRL packs within each batch of `Dataset.map` (1000 by default).
PACK_BATCH = 1000


@dataclass
class Plan:
    """Rows as segments: row r is segments row_offsets[r]:row_offsets[r+1], each a token range
    [seg_start, seg_start + seg_len) of document seg_doc."""

    row_offsets: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row_tokens(self) -> np.ndarray:
        """Tokens per row."""
        return _per_row(self.seg_len, self.row_offsets)

    def row_documents(self) -> np.ndarray:
        """Documents that start in each row (a segment from a document's first token)."""
        return _per_row((self.seg_start == 0).astype(np.int64), self.row_offsets)


def plan(strategy: str, lengths: np.ndarray, max_length: int) -> Plan:
    """The rows `strategy` makes of documents of `lengths` (all > 0), batch by batch as TRL packs."""
    lengths = np.asarray(lengths, dtype=np.int64)
    make = {"bfd_split": _bfd_split, "bfd": _bfd_truncate, "wrapped": _wrapped, "truncate": _truncate}[
        strategy
    ]
    plans = [
        make(lengths[first : first + PACK_BATCH], max_length, first)
        for first in range(0, len(lengths), PACK_BATCH)
    ]
    return _concat(plans)


def _bfd_split(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """Documents longer than max_length cut into max_length fragments (the last one shorter), then BFD."""
    pieces = -(-lengths // max_length)
    doc = np.repeat(np.arange(len(lengths)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = k * max_length
    return _bfd(doc + first, start, np.minimum(lengths[doc] - start, max_length), max_length)


def _bfd_truncate(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """Each document's first max_length tokens (the rest dropped), then BFD."""
    docs = np.arange(len(lengths))
    return _bfd(docs + first, np.zeros(len(docs), np.int64), np.minimum(lengths, max_length), max_length)


def _bfd(doc: np.ndarray, start: np.ndarray, length: np.ndarray, max_length: int) -> Plan:
    """Best-fit decreasing over the fragments, with TRL's segment tree and tie order (stable by size)."""
    tree = _SegmentTree(max_length)
    tree.add(max_length)
    space_to_bin: dict[int, deque] = defaultdict(deque)
    bins: list[list] = []
    for i in np.argsort(-length, kind="stable").tolist():
        n = int(length[i])
        space = tree.search(n)
        if space < max_length:
            bin_ = space_to_bin[space].popleft()
            if not space_to_bin[space]:
                tree.remove(space)
        else:
            bin_ = [[], 0]
            bins.append(bin_)
        bin_[0].append(i)
        space -= n
        space_to_bin[space].append(bin_)
        if space > 0:
            tree.add(space)
    order = np.fromiter((i for b in bins for i in b[0]), dtype=np.int64, count=len(doc))
    counts = np.fromiter((len(b[0]) for b in bins), dtype=np.int64, count=len(bins))
    return Plan(np.concatenate([[0], np.cumsum(counts)]), doc[order], start[order], length[order])


def _wrapped(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """The batch's documents concatenated and cut every max_length tokens."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    starts = np.union1d(ends - lengths, np.arange(0, total, max_length))
    doc = np.searchsorted(ends, starts, side="right")
    seg_len = np.diff(np.append(starts, total))
    rows = np.bincount(starts // max_length, minlength=-(-total // max_length))
    return Plan(np.concatenate([[0], np.cumsum(rows)]), doc + first, starts - (ends - lengths)[doc], seg_len)


def _truncate(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """One row per document, its first max_length tokens."""
    n = len(lengths)
    return Plan(
        np.arange(n + 1), np.arange(n) + first, np.zeros(n, np.int64), np.minimum(lengths, max_length)
    )


def _concat(plans: list[Plan]) -> Plan:
    if not plans:
        empty = np.empty(0, np.int64)
        return Plan(np.zeros(1, np.int64), empty, empty, empty)
    segs = np.cumsum([0] + [len(p.seg_doc) for p in plans])
    return Plan(
        np.concatenate([[0]] + [p.row_offsets[1:] + s for p, s in zip(plans, segs, strict=False)]),
        *(
            np.concatenate([getattr(p, f) for p in plans]).astype(np.int64)
            for f in ("seg_doc", "seg_start", "seg_len")
        ),
    )


def _per_row(values: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    sums = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return sums[row_offsets[1:]] - sums[row_offsets[:-1]]


class _SegmentTree:
    """The largest free space >= a value, in [1, maxval]: TRL's `_SegmentTree` (same answers)."""

    def __init__(self, maxval: int):
        self.maxval = maxval
        self.size = 1 << (maxval - 1).bit_length()
        self.tree = [0] * (2 * self.size)

    def add(self, val: int) -> None:
        self._set(val, val)

    def remove(self, val: int) -> None:
        self._set(val, 0)

    def _set(self, val: int, to: int) -> None:
        tree, i = self.tree, self.size + val - 1
        tree[i] = to
        while i > 1:
            i >>= 1
            left, right = tree[2 * i], tree[2 * i + 1]
            tree[i] = left if left >= right else right

    def search(self, val: int) -> int:
        tree, i = self.tree, 1
        while i < self.size:
            i = 2 * i if tree[2 * i] >= val else 2 * i + 1
        return tree[i]
