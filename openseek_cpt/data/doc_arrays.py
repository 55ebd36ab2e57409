"""Documents as flat arrays (all ids + a length per document), the form the encoder hands on: the
eos rules on arrays and the Arrow table of documents, without a Python object per document."""

from __future__ import annotations

from typing import Any

import numpy as np


def with_one_eos(values: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat documents (ids, lengths) with trailing eos ids dropped and exactly one eos appended to
    each: `Encoder.end_with_eos` on arrays."""
    values, kept = drop_trailing_eos(values, lengths, eos)
    return with_eos(values, kept + 1, kept, eos), kept + 1


def with_eos(values: np.ndarray, lengths: np.ndarray, stored: np.ndarray, eos: int) -> np.ndarray:
    """All ids of documents with every eos in place: inserted after those whose `stored` ids are one
    fewer than their `lengths` (see `Encoder.documents`)."""
    missing = lengths > stored
    if not missing.any():
        return values
    return np.insert(values, np.cumsum(stored)[missing], eos).astype(np.int32, copy=False)


def drop_trailing_eos(values: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat documents (ids, lengths) with the eos ids each ends with dropped (a copy only where one does)."""
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    if not len(values) or not (values[ends[lengths > 0] - 1] == eos).any():  # no trailing eos to drop
        return values, lengths
    starts = ends - lengths
    kept = lengths.copy()
    while len(values):
        trailing = (kept > 0) & (values[np.maximum(starts + kept - 1, 0)] == eos)
        if not trailing.any():
            break
        kept -= trailing
    if (kept != lengths).any():
        doc = np.repeat(np.arange(len(lengths)), lengths)
        values = values[np.arange(len(values)) - starts[doc] < kept[doc]]
    return values, kept


def documents_table(values: np.ndarray, lengths: np.ndarray, special: np.ndarray) -> Any:
    """Arrow table: input_ids and doc_start (list per document), special_text (per document)."""
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # no wrap past 2**31 tokens
    starts = np.zeros(len(values), dtype=np.uint8)
    starts[offsets[:-1][lengths > 0]] = 1
    return pa.Table.from_arrays(
        [
            pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
            pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(starts)),
            pa.array(special),
        ],
        names=["input_ids", "doc_start", "special_text"],
    )
