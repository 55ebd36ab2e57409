"""Megatron `.bin/.idx` helpers for tests and small files: write token-id lists as documents, read a
whole prefix back as an in-memory `datasets.Dataset` (the data stage reads sources in place instead)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import datasets
import numpy as np

from openseek_cpt.artifacts.megatron_format import fingerprint, read_index, read_rows, write_sequences


def read_documents(prefix: str | Path) -> datasets.Dataset:
    """Every Megatron sequence of PREFIX as an in-memory `datasets.Dataset` (column `input_ids`, int32)."""
    index = read_index(prefix)
    table = read_rows(index, Path(f"{prefix}.bin"), np.arange(len(index.sequence_lengths)))
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint(prefix))


def write_documents(prefix: str | Path, documents: Iterable[np.ndarray], vocab_size: int) -> None:
    """Write each array of token ids as one Megatron sequence and document into PREFIX.bin/.idx."""

    def chunks() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for doc in documents:
            ids = np.asarray(doc).reshape(-1)
            yield ids, np.array([ids.size], dtype=np.int64)

    write_sequences(prefix, chunks(), vocab_size)
