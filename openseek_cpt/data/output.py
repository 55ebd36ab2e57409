"""The prepared dataset's splits written once, batch by batch of rows, in `save_to_disk`'s layout.

Each shard is written by `datasets`' own `ArrowWriter`, and a split's `state.json` and
`dataset_info.json` are what `Dataset.save_to_disk` writes (shards of at most datasets'
MAX_SHARD_SIZE, contiguous), so `load_from_disk` reads the result as one of its own
(tests/data/test_output.py compares them with save_to_disk's).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("input_ids", "seq_lengths")
# Rows per record batch of a shard (datasets' own writer batch size).
BATCH_ROWS = 1000


def features() -> Any:
    from datasets import Features, List, Value

    return Features({c: List(Value("int32")) for c in COLUMNS})


def row_table(
    values: np.ndarray, row_tokens: np.ndarray, seg_len: np.ndarray, row_segments: np.ndarray
) -> Any:
    """Arrow table of rows: input_ids (values cut by row_tokens), seq_lengths (seg_len cut by row_segments)."""
    import pyarrow as pa

    def lists(flat: np.ndarray, sizes: np.ndarray) -> Any:
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        if offsets[-1] >= 2**31:
            raise OverflowError(f"a batch of {offsets[-1]} values does not fit Arrow list offsets")
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat.astype(np.int32)))

    return pa.Table.from_arrays(
        [lists(values, row_tokens), lists(seg_len, row_segments)], names=list(COLUMNS)
    )


class SplitWriter:
    """One split of `rows` rows and about `nbytes` bytes, written to `path` as save_to_disk shards."""

    def __init__(self, path: Path, rows: int, nbytes: int, fingerprint: str):
        from datasets import config
        from datasets.utils.py_utils import convert_file_size_to_int

        self.path, self.fingerprint = path, fingerprint
        path.mkdir(parents=True, exist_ok=True)
        shards = max(1, min(rows, int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1))
        div, mod = divmod(rows, shards)
        self.sizes = [div + (k < mod) for k in range(shards)]
        self.names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
        self._shard, self._left, self._writer = -1, 0, None
        self._pending: list[Any] = []
        self._pending_rows = 0
        self._next()

    def _next(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
        self._shard += 1
        self._left = self.sizes[self._shard] if self._shard < len(self.sizes) else 0
        path = self.path / self.names[min(self._shard, len(self.names) - 1)]
        self._writer = (
            ArrowWriter(features=features(), path=str(path)) if self._shard < len(self.sizes) else None
        )

    def write(self, table: Any) -> None:
        """Append rows, across shard boundaries, in record batches of BATCH_ROWS (the file's bytes
        depend on the rows only, not on how they were handed over)."""
        import pyarrow as pa

        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= min(BATCH_ROWS, max(self._left, 1)):
            rows = pa.concat_tables(self._pending)
            n = min(BATCH_ROWS, self._left) if self._writer is not None else rows.num_rows
            self._write(rows.slice(0, n))
            self._pending, self._pending_rows = [rows.slice(n)], rows.num_rows - n

    def _write(self, table: Any) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path}: more rows than the {sum(self.sizes)} announced")
        self._writer.write_table(table.combine_chunks())
        self._left -= table.num_rows
        if not self._left:
            self._next()

    def close(self) -> None:
        """Finish the last shard and write the split's state.json and dataset_info.json."""
        import pyarrow as pa
        from datasets import DatasetInfo

        if self._pending_rows:
            self._write(pa.concat_tables(self._pending))
        if self._writer is not None:
            if self._shard < len(self.sizes) - 1 or self._left:
                raise ValueError(f"{self.path}: fewer rows written than the {sum(self.sizes)} announced")
            self._next()
        state: dict[str, Any] = {
            "_data_files": [{"filename": name} for name in self.names],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(DatasetInfo(features=features()))
        (self.path / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


def write_dataset_dict(out: Path, splits: list[str]) -> None:
    """The DatasetDict's own file, naming its splits."""
    (out / "dataset_dict.json").write_text(json.dumps({"splits": splits}))


def split_nbytes(rows: int, tokens: int, segments: int) -> int:
    """What `Dataset._estimate_nbytes` says of such a split: two list<int32> columns."""
    return 4 * tokens + 4 * segments + 2 * 4 * (rows + 1)
