"""A source's rows, read in place: the `Rows` interface and one class per layout on disk.

`DatasetRows` is a `datasets.Dataset` (save_to_disk memory-mapped, a hub dataset's cache, a JSON
document in memory); `StreamedRows` reads a stream in a seeded shuffled order, only as far as the mix
asks; `MegatronRows`, `ParquetRows`, `JsonLinesRows` and `TextLinesRows` read files in place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts import megatron_format
from openseek_cpt.errors import UserError, first_line

# Streamed sources: rows per batch read (and per Arrow file written), rows in the shuffle buffer.
STREAM_BATCH = 4096
STREAM_BUFFER = 10_000


class Rows:
    """A source's rows, read in place: `len`, `column_names`, `take(indices, columns)` -> Arrow table."""

    column_names: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        """The rows `indices` (in that order) as a `pyarrow.Table` of `columns` (default: all)."""
        raise NotImplementedError

    @property
    def documents_in_source(self) -> int | None:
        """Rows of the whole source (None while unknown: a stream not read to its end)."""
        return len(self)

    def first_row(self) -> dict[str, Any] | None:
        """The first row as a dict (None: the source is empty), for the checks at open time."""
        return self.take([0]).to_pylist()[0] if len(self) else None


class DatasetRows(Rows):
    """A memory-mapped `datasets.Dataset` (save_to_disk, or what load_dataset cached)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.column_names = list(dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        import pyarrow as pa

        ds = self.dataset.select_columns(columns) if columns else self.dataset
        table = ds.with_format("arrow")[np.asarray(indices, dtype=np.int64)]  # a chunk per row
        return pa.Table.from_arrays([one_chunk(c) for c in table.columns], schema=table.schema)


def one_chunk(column: Any) -> Any:
    """An Arrow array of a column: its one chunk as it is, else its chunks concatenated.

    `datasets` gathers a batch of rows as a chunk per row; `concat_arrays` joins 8192 of them ~2.5x
    faster than `ChunkedArray.combine_chunks` (pyarrow 26), which also copies a column of one chunk."""
    import pyarrow as pa

    if not isinstance(column, pa.ChunkedArray):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    return pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)


class StreamedRows(Rows):
    """A dataset read as a stream (`streaming: true`): rows arrive in a seeded shuffled order (data
    files shuffled, then a buffer of STREAM_BUFFER rows) and only as many as the mix asks for are
    downloaded and converted (`fill`), written in batches to Arrow files in the stage's work dir and
    memory-mapped; `len` is the rows read so far. The first row is peeked at open time, for the
    column checks; the text column (`text_field`, once set) is checked on every batch read."""

    def __init__(self, stream: Any, where: str, path: str, locate: Callable[[], str | None] | None = None):
        self.stream = stream
        self.where, self.path = where, path  # named in the error a failing stream gives
        self.locate = locate  # "file:line: what is wrong" of a malformed file, where it can tell
        self.text_field: str | None = None
        self.first = next(iter(stream.take(1)), None)
        self.column_names = list(self.first or {})
        self.exhausted = False
        self._iter: Any = None
        self._tables: list[Any] = []
        self._count = 0
        self._dir: Path | None = None

    def start(self, seed: int, work: Path) -> None:
        """Begin reading, in the order `seed` gives, into files under `work`."""
        self._iter = iter(self.stream.shuffle(seed=seed, buffer_size=STREAM_BUFFER).iter(STREAM_BATCH))
        self._dir = work
        work.mkdir(parents=True, exist_ok=True)

    def fill(self, n: int) -> int:
        """Read until `n` rows are held or the stream ends; returns the rows held."""
        import pyarrow as pa

        while self._count < n and not self.exhausted:
            try:
                batch = next(self._iter, None)
            except Exception as exc:  # a malformed line far into a file, a dropped connection
                bad = self.locate() if self.locate is not None else None
                raise UserError(
                    f"{self.where}.path={self.path!r}: the stream failed after {self._count} rows "
                    f"({bad or f'{type(exc).__name__}: {first_line(exc)[:300]}'}); fix the data "
                    "(or the connection) and run again"
                ) from None
            if batch is None:
                self.exhausted = True
                break
            self._check_text(batch)
            table = pa.Table.from_pydict(batch)
            assert self._dir is not None
            path = self._dir / f"rows-{len(self._tables):06d}.arrow"
            with pa.ipc.new_file(str(path), table.schema) as writer:
                writer.write_table(table)
            self._tables.append(pa.ipc.open_file(pa.memory_map(str(path))).read_all())
            self._count += table.num_rows
        return self._count

    def _check_text(self, batch: dict[str, list]) -> None:
        values = batch.get(self.text_field, ()) if self.text_field else ()
        for k, value in enumerate(values):
            if value is not None and not isinstance(value, str):
                raise UserError(
                    f"{self.where}.text_field={self.text_field!r}: {self.path} is not text at streamed row "
                    f"{self._count + k}, which holds {type(value).__name__}; every row's "
                    f"{self.text_field!r} must be a string: fix or drop that row, or give a formatting "
                    "function that makes its text"
                )

    def __len__(self) -> int:
        return self._count

    @property
    def documents_in_source(self) -> int | None:
        return self._count if self.exhausted else None

    def first_row(self) -> dict[str, Any] | None:
        return self.first

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        import pyarrow as pa

        table = pa.concat_tables(self._tables, promote_options="default")  # a column null in one batch
        table = table.select(columns) if columns else table
        return table.take(pa.array(np.asarray(indices, dtype=np.int64)))


class MegatronRows(Rows):
    """PREFIX.bin/.idx through a memory map: one row (`input_ids`) per Megatron sequence."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = megatron_format.read_index(prefix)
        self.column_names = ["input_ids"]

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        return megatron_format.read_rows(self.index, f"{self.prefix}.bin", indices)


class ParquetRows(Rows):
    """Parquet files read by row group: only the row groups (and columns) holding sampled rows."""

    def __init__(self, files: list[Path]):
        import pyarrow.parquet as pq

        self.files = [pq.ParquetFile(f) for f in files]
        self.column_names = list(self.files[0].schema_arrow.names)
        groups = [
            (f, g, f.metadata.row_group(g).num_rows) for f in self.files for g in range(f.num_row_groups)
        ]
        self.groups = [(f, g) for f, g, _ in groups]
        self.starts = np.concatenate([[0], np.cumsum([n for _, _, n in groups])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        import pyarrow as pa

        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        group_of = np.searchsorted(self.starts, ordered, side="right") - 1
        parts = []
        for g in np.unique(group_of):
            f, k = self.groups[g]
            table = f.read_row_group(int(k), columns=columns)
            parts.append(table.take(pa.array(ordered[group_of == g] - self.starts[g])))
        table = pa.concat_tables(parts) if parts else self.files[0].schema_arrow.empty_table()
        return table.take(pa.array(np.argsort(order, kind="stable")))


class LineFileRows(Rows):
    """Rows that are lines of files, read in place: an index of line offsets (one pass over the bytes,
    16 bytes a row), then only the sampled lines read, through a memory map. No copy of the file."""

    def __init__(self, files: list[Path], where: str, path: str, spans: Callable[[Path], tuple]):
        self.files, self.where, self.path = files, where, path
        found = [spans(f) for f in files]
        self.starts = np.concatenate([s for s, _ in found]) if found else np.empty(0, np.int64)
        self.ends = np.concatenate([e for _, e in found]) if found else np.empty(0, np.int64)
        self.file_of = np.concatenate([np.full(len(s), k, np.int32) for k, (s, _) in enumerate(found)])
        self._maps: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def lines(self, indices: np.ndarray) -> list[bytes]:
        """The raw lines `indices`, in file order (read through a memory map)."""
        import mmap

        out: list[bytes] = []
        for k in np.unique(self.file_of[indices]).tolist():
            if k not in self._maps:
                with open(self.files[k], "rb") as f:
                    self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            m, rows = self._maps[k], indices[self.file_of[indices] == k]
            out += [m[a:b] for a, b in zip(self.starts[rows].tolist(), self.ends[rows].tolist(), strict=True)]
        return out

    def line_number(self, row: int) -> int:
        """The 1-based line of `row` in its file (counted only on the error path)."""
        k = int(self.file_of[row])
        with open(self.files[k], "rb") as f:
            return f.read(int(self.starts[row])).count(b"\n") + 1


class JsonLinesRows(LineFileRows):
    """JSON Lines files read in place, only the sampled lines parsed, by Arrow's multi-threaded JSON
    reader (no `datasets` cache). A line is checked when it is read: one that is not JSON, or whose
    text is not a string, is named by file:line."""

    def __init__(self, files: list[Path], where: str, path: str):
        super().__init__(files, where, path, _line_spans)
        first = self.take([0]) if len(self) else None
        self.column_names = list(first.column_names) if first is not None else []

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        import io

        import pyarrow as pa
        import pyarrow.json as pj

        asked = np.asarray(indices, dtype=np.int64)
        order = np.argsort(asked, kind="stable")  # read in file order, then put back in the order asked
        indices = asked[order]
        lines = self.lines(indices)
        options = pj.ParseOptions(newlines_in_values=False)
        if columns:
            schema = pa.schema([(c, pa.large_string()) for c in columns])
            options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        # Arrow's reader needs each line inside one block: blocks of 1 MiB, or the longest line's size.
        longest = int((self.ends[indices] - self.starts[indices]).max()) if len(indices) else 0
        read = pj.ReadOptions(block_size=min(max(1 << 20, longest + 2), 2**31 - 1))
        try:
            table = pj.read_json(io.BytesIO(b"\n".join(lines)), read_options=read, parse_options=options)
        except pa.ArrowInvalid:
            raise self._bad_line(indices, lines, columns) from None
        if columns:
            table = table.select(columns)
        if table.num_rows != len(indices):  # Arrow skips what it takes for blank lines
            raise self._bad_line(indices, lines, columns)
        return table if (order[1:] > order[:-1]).all() else table.take(pa.array(np.argsort(order)))

    def _bad_line(self, indices: np.ndarray, lines: list[bytes], columns: list[str] | None) -> UserError:
        """The one-line error naming the first line of `lines` that is not JSON or not text."""
        import json

        for row, raw in zip(indices, lines, strict=True):
            at = f"{self.files[int(self.file_of[row])]}:{self.line_number(int(row))}"
            try:
                value = json.loads(raw)
            except ValueError as exc:
                return UserError(
                    f"{self.where}.path={self.path!r} could not be read as json: {at}: not JSON ({exc}); "
                    "fix or drop that line"
                )
            if not isinstance(value, dict):
                return UserError(
                    f"{self.where}.path={self.path!r}: {at} holds a JSON {type(value).__name__}, not an "
                    "object; every line must be one object: fix or drop that line"
                )
            for c in columns or ():
                if value.get(c) is not None and not isinstance(value[c], str):
                    return UserError(
                        f"{self.where}.text_field={c!r}: {self.path} is not text at {at}, which holds "
                        f"{type(value[c]).__name__}; every row's {c!r} must be a string: fix or drop that row, "
                        "or give a formatting function that makes its text"
                    )
        return UserError(f"{self.where}.path={self.path!r} could not be read as json lines; check the file")


class TextLinesRows(LineFileRows):
    """Text files read in place, a row per line as `datasets`' text builder makes them (every line,
    empty ones too; `\n`, `\r\n` and `\r` end a line and are not kept), the sampled lines gathered
    into one Arrow text column, checked as UTF-8. No `datasets` cache."""

    column_names = ["text"]

    def __init__(self, files: list[Path], where: str, path: str):
        super().__init__(files, where, path, _text_line_spans)

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        import pyarrow as pa

        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")  # read in file order, then put back in the order asked
        in_file_order = self.lines(indices[order])
        lines: list[bytes] = [b""] * len(indices)
        for at, line in zip(order.tolist(), in_file_order, strict=True):
            lines[at] = line
        lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        texts = pa.LargeStringArray.from_buffers(
            len(lines), pa.py_buffer(offsets), pa.py_buffer(b"".join(lines))
        )
        try:
            texts.validate(full=True)
        except pa.ArrowInvalid:
            bad = next(i for i, line in enumerate(lines) if not _is_utf8(line))
            row = int(indices[bad])
            at = f"{self.files[int(self.file_of[row])]}:{self.line_number(row)}"
            raise UserError(
                f"{self.where}.path={self.path!r} could not be read as text: {at} is not UTF-8; fix or drop that line"
            ) from None
        return pa.table({"text": texts})


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _text_line_spans(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of every line of a text file, without its line end (universal
    newlines, as Python's text mode reads them; no empty row after a final line end)."""
    import mmap

    size = path.stat().st_size
    if size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        buffer = np.frombuffer(m, dtype=np.uint8)
        cr = np.flatnonzero(buffer == 13)
        lf = np.flatnonzero(buffer == 10)
        crlf = cr[(cr + 1 < size) & (buffer[np.minimum(cr + 1, size - 1)] == 10)]
        del buffer
    lone_cr = np.setdiff1d(cr, crlf, assume_unique=True)
    # a line ends at its \n (the \r before it dropped too) or at a lone \r
    breaks = np.sort(np.concatenate([lf, lone_cr])).astype(np.int64)
    starts = np.concatenate([[0], breaks + 1]).astype(np.int64)
    ends = np.concatenate([breaks, [size]]).astype(np.int64)
    ends[np.isin(ends, crlf + 1)] -= 1
    if starts[-1] == size:  # the file ends with a line end: no empty last row
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


def _line_spans(path: Path, block: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-blank lines of a file, found in blocks of `block` bytes."""
    import mmap

    size = path.stat().st_size
    if size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        buffer = np.frombuffer(m, dtype=np.uint8)
        newlines = [np.flatnonzero(buffer[i : i + block] == 10) + i for i in range(0, size, block)]
        del buffer
        ends = np.concatenate(newlines).astype(np.int64)
        starts = np.concatenate([[0], ends + 1])
        ends = np.concatenate([ends, [size]])
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if len(starts):  # blank lines (spaces, a \r) are no rows, as for Arrow's reader
            short = np.flatnonzero(ends - starts <= 2)
            blank = [i for i in short if not m[starts[i] : ends[i]].strip()]
            keep = np.ones(len(starts), dtype=bool)
            keep[blank] = False
            starts, ends = starts[keep], ends[keep]
    return starts, ends
