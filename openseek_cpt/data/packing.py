"""The packing strategies of the data stage: one table, one entry per strategy, with its properties.

The data stage asks this table (never a strategy's name) what a strategy does: whether it drops
the tokens of a document past `max_length`, whether it makes one row per document, whether a
document can continue in another row. `data.packing` takes its choices from the same table
(data/config.py), so this module imports no numpy when it is imported.

The stage packs by index: a strategy's `plan` turns document lengths into a `Plan`, each row a list
of (document, first token, length) segments, and no token is copied until the output rows are
written. Each entry's `reference` is what TRL's `pack_dataset` (or `truncate_dataset`) does with the
same documents in `Dataset.map`'s default batches of PACK_BATCH: the meaning the plan must have.
Adding a strategy = one `Strategy` entry here; tests/data/test_packing.py then checks its declared
properties and that its plan gives the rows its reference gives.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # data/config.py reads this table: numpy is imported where the plans are made
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
        return row_sums(self.seg_len, self.row_offsets)

    def row_documents(self) -> np.ndarray:
        """Documents that start in each row (a segment from a document's first token)."""
        import numpy as np

        return row_sums((self.seg_start == 0).astype(np.int64), self.row_offsets)


def plan(strategy: str, lengths: np.ndarray, max_length: int) -> Plan:
    """The rows `strategy` makes of documents of `lengths` (all > 0), batch by batch as TRL packs."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    make = STRATEGIES[strategy].plan
    plans = [
        make(lengths[first : first + PACK_BATCH], max_length, first)
        for first in range(0, len(lengths), PACK_BATCH)
    ]
    return _concat(plans)


def _bfd_split(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """Documents longer than max_length cut into max_length fragments (the last one shorter), then BFD."""
    import numpy as np

    pieces = -(-lengths // max_length)
    doc = np.repeat(np.arange(len(lengths)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = k * max_length
    return _bfd(doc + first, start, np.minimum(lengths[doc] - start, max_length), max_length)


def _bfd_truncate(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """Each document's first max_length tokens (the rest dropped), then BFD."""
    import numpy as np

    docs = np.arange(len(lengths))
    return _bfd(docs + first, np.zeros(len(docs), np.int64), np.minimum(lengths, max_length), max_length)


def _bfd(doc: np.ndarray, start: np.ndarray, length: np.ndarray, max_length: int) -> Plan:
    """Best-fit decreasing over the fragments, as TRL's: largest first (stable among equals), each into
    the bin with the least free space that fits it (the oldest such bin), else a new bin. TRL finds that
    space with a segment tree of Python steps; a sorted list of the free spaces in use, searched by
    `bisect`, gives the same answer in C."""
    import numpy as np

    spaces: list[int] = []  # distinct free spaces (0 < space < max_length) some bin has, sorted
    space_to_bin: dict[int, deque] = defaultdict(deque)
    bins: list[list[int]] = []
    for i, n in zip(
        np.argsort(-length, kind="stable").tolist(), (-np.sort(-length, kind="stable")).tolist(), strict=True
    ):
        k = bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            queue = space_to_bin[space]
            bin_ = queue.popleft()
            if not queue:
                del spaces[k]
        else:
            space, bin_ = max_length, []
            bins.append(bin_)
        bin_.append(i)
        space -= n
        if space > 0:
            queue = space_to_bin[space]
            if not queue:
                insort(spaces, space)
            queue.append(bin_)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(doc))
    counts = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    return Plan(np.concatenate([[0], np.cumsum(counts)]), doc[order], start[order], length[order])


def _wrapped(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """The batch's documents concatenated and cut every max_length tokens."""
    import numpy as np

    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    starts = np.union1d(ends - lengths, np.arange(0, total, max_length))
    doc = np.searchsorted(ends, starts, side="right")
    seg_len = np.diff(np.append(starts, total))
    rows = np.bincount(starts // max_length, minlength=-(-total // max_length))
    return Plan(np.concatenate([[0], np.cumsum(rows)]), doc + first, starts - (ends - lengths)[doc], seg_len)


def _truncate(lengths: np.ndarray, max_length: int, first: int) -> Plan:
    """One row per document, its first max_length tokens."""
    import numpy as np

    n = len(lengths)
    return Plan(
        np.arange(n + 1), np.arange(n) + first, np.zeros(n, np.int64), np.minimum(lengths, max_length)
    )


@dataclass(frozen=True)
class Strategy:
    """A way of turning tokenized documents (`input_ids`, `doc_start`) into rows of <= max_length tokens."""

    name: str
    doc: str
    # Tokens of a document past max_length are dropped (counted as tokens_dropped).
    truncates_documents: bool
    # Each row is exactly one document (no packing): rows needed = documents needed.
    one_row_per_document: bool
    # A document can continue in another row (its tail, or, for wrapped, whatever crosses a row end).
    splits_documents: bool
    # plan(lengths of a batch of documents, max_length, index of its first document) -> its rows.
    plan: Callable[[np.ndarray, int, int], Plan]
    # reference(documents Dataset, max_length, map_kwargs) -> Dataset of rows: what TRL does (tests).
    reference: Callable[[Any, int, dict[str, Any]], Any]


def _trl(strategy: str) -> Callable[[Any, int, dict[str, Any]], Any]:
    def pack(docs: Any, max_length: int, map_kwargs: dict[str, Any]) -> Any:
        from trl import pack_dataset

        return pack_dataset(docs, max_length, strategy=strategy, map_kwargs=map_kwargs)

    return pack


def _trl_truncate(docs: Any, max_length: int, map_kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():  # TRL moved truncate_dataset to experimental; it does the job as is
        warnings.simplefilter("ignore")
        from trl.experimental.utils import truncate_dataset

    return truncate_dataset(docs, max_length, map_kwargs=map_kwargs)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "bfd_split",
            "best-fit-decreasing bins; documents longer than max_length are split, no token lost",
            truncates_documents=False,
            one_row_per_document=False,
            splits_documents=True,
            plan=_bfd_split,
            reference=_trl("bfd_split"),
        ),
        Strategy(
            "bfd",
            "best-fit-decreasing bins; documents longer than max_length are truncated",
            truncates_documents=True,
            one_row_per_document=False,
            splits_documents=False,
            plan=_bfd_truncate,
            reference=_trl("bfd"),
        ),
        Strategy(
            "wrapped",
            "concatenate all documents and cut every max_length tokens (rows cross documents)",
            truncates_documents=False,
            one_row_per_document=False,
            splits_documents=True,
            plan=_wrapped,
            reference=_trl("wrapped"),
        ),
        Strategy(
            "truncate",
            "no packing: one row per document, truncated to max_length",
            truncates_documents=True,
            one_row_per_document=True,
            splits_documents=False,
            plan=_truncate,
            reference=_trl_truncate,
        ),
    )
}
NAMES = tuple(STRATEGIES)


def get(name: str) -> Strategy:
    """The strategy called `name` (recipe validation has already rejected unknown names)."""
    return STRATEGIES[name]


def _concat(plans: list[Plan]) -> Plan:
    import numpy as np

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


def row_sums(values: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    """Sum of `values` over each row's span row_offsets[r]:row_offsets[r+1]."""
    import numpy as np

    sums = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return sums[row_offsets[1:]] - sums[row_offsets[:-1]]
