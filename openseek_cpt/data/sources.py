"""Open the data sources of a recipe: hub datasets, local dirs/files, Megatron prefixes.

Used by the data stage only. A source is read in place through `Rows` (row count, columns,
`take(indices)`): Megatron `.bin/.idx` through a memory map, parquet files by row group,
`save_to_disk` directories memory-mapped; only the rows the mix samples are ever read, and no
copy of the source is made. json/text files and hub datasets go through `datasets`' own Arrow
cache, as `load_dataset` makes it, unless the source sets `streaming`: then rows are read as a
stream in a seeded shuffled order and only as many as the share needs (plus the shuffle buffer and
one batch) are downloaded and converted, into the stage's work dir (`StreamedRows`). Everything
file-dependent that can be wrong with a source is checked here, before any expensive work, and
reported as a one-line UserError: a missing local path, an empty source, a text field that does
not exist, a formatting function that does not import.
A relative path that exists locally (`data/foo`, even `org/name`) is always local, never a hub id:
the original scripts sent such paths to the hub.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts.fileio import canonical_hash, read_json
from openseek_cpt.artifacts.provenance import directory_fingerprint, read_provenance, sha256_file
from openseek_cpt.errors import UserError, first_line
from openseek_cpt.recipe.schema import SourceConfig

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# Files above this size are fingerprinted by size + mtime: hashing them would read the whole source.
HASH_LIMIT = 1 << 30
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
        ds = self.dataset.select_columns(columns) if columns else self.dataset
        return ds.with_format("arrow")[np.asarray(indices, dtype=np.int64)]


class StreamedRows(Rows):
    """A dataset read as a stream (`streaming: true`): rows arrive in a seeded shuffled order (data
    files shuffled, then a buffer of STREAM_BUFFER rows) and only as many as the mix asks for are
    downloaded and converted (`fill`), written in batches to Arrow files in the stage's work dir and
    memory-mapped; `len` is the rows read so far. The first row is peeked at open time, for the
    column checks."""

    def __init__(self, stream: Any, where: str, path: str):
        self.stream = stream
        self.where, self.path = where, path  # named in the error a failing stream gives
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
                raise UserError(
                    f"{self.where}.path={self.path!r}: the stream failed after {self._count} rows "
                    f"({type(exc).__name__}: {first_line(exc)[:300]}); fix the data (or the connection) "
                    "and run again"
                ) from None
            if batch is None:
                self.exhausted = True
                break
            table = pa.Table.from_pydict(batch)
            path = self._dir / f"rows-{len(self._tables):06d}.arrow"
            with pa.ipc.new_file(str(path), table.schema) as writer:
                writer.write_table(table)
            self._tables.append(pa.ipc.open_file(pa.memory_map(str(path))).read_all())
            self._count += table.num_rows
        return self._count

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
        from openseek_cpt.artifacts import megatron_format

        self.prefix = prefix
        self.index = megatron_format.read_index(prefix)
        self.column_names = ["input_ids"]

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    def take(self, indices: Any, columns: list[str] | None = None) -> Any:
        from openseek_cpt.artifacts import megatron_format

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


@dataclass
class OpenSource:
    """A source, opened: its rows (read in place) and how to turn a row into a document."""

    index: int
    config: SourceConfig
    label: str
    kind: str  # hub, disk, json, parquet, text, megatron (how it was read)
    rows: Rows
    content: str  # "tokens" (input_ids column), "text" (text_field) or "formatting"
    formatting: Callable[[dict], str] | None
    fingerprint: str

    @property
    def where(self) -> str:
        return f"data.sources.{self.index}"

    @property
    def columns(self) -> list[str] | None:
        """The columns a document is made from (None: all, for a formatting function)."""
        if self.content == "tokens":
            return ["input_ids"]
        return [self.config.text_field] if self.content == "text" else None


def open_sources(sources: list[SourceConfig]) -> list[OpenSource]:
    """Open every source and check its columns; raises UserError on the first bad one."""
    opened, labels = [], set()
    for i, src in enumerate(sources):
        label = src.label or _default_label(src.path)
        if label in labels:
            label = f"{label}-{i}"
        labels.add(label)
        opened.append(open_source(i, src, label))
    return opened


def open_source(index: int, src: SourceConfig, label: str) -> OpenSource:
    where = f"data.sources.{index}"
    kind = detect_kind(src, where)
    rows, fingerprint = _load(kind, src, where)
    first = rows.first_row()
    if first is None:
        raise UserError(f"{where}.path={src.path!r} is an empty source (0 rows); remove it or fill it")
    columns = list(rows.column_names)
    formatting = None
    if src.formatting:
        content = "formatting"
        formatting = import_formatting(src.formatting, where)
        try:
            text = formatting(first)
        except Exception as exc:  # the user's function: any failure is a user error
            raise UserError(
                f"{where}.formatting={src.formatting!r} fails on the first row of {src.path} "
                f"({type(exc).__name__}: {exc}); its columns are: {', '.join(columns)}"
            ) from None
        if not isinstance(text, str):
            raise UserError(
                f"{where}.formatting={src.formatting!r} returned {type(text).__name__}, not str; "
                "it must map one example (dict) to its text"
            )
    elif "input_ids" in columns:
        content = "tokens"
    elif src.text_field in columns:
        content = "text"
    else:
        raise UserError(
            f"{where}.text_field={src.text_field!r} is not a column of {src.path} "
            f"(columns: {', '.join(columns)}); set text_field to one of them or give a formatting function"
        )
    return OpenSource(index, src, label, kind, rows, content, formatting, fingerprint)


def detect_kind(src: SourceConfig, where: str) -> str:
    """How to read `src.path`: the recipe's `type`, or for `auto` what exists on disk (local first)."""
    path = Path(src.path).expanduser()
    megatron = Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()
    if src.type != "auto":
        local = src.type != "hub"
        if local and src.type == "megatron" and not megatron:
            raise UserError(
                f"{where}.path={src.path!r}: {path}.bin/.idx do not exist; give a Megatron PREFIX"
            )
        if local and src.type != "megatron" and not path.exists():
            raise UserError(f"{where}.path={src.path!r} does not exist (type {src.type}); fix the path")
        return src.type
    if megatron:
        return "megatron"
    if path.is_dir():
        return "disk" if _is_saved_dataset(path) else "folder"
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(
                f"{where}.path={src.path!r} has an unknown extension; use {', '.join(FILE_BUILDERS)} "
                "or set type (json, parquet, text)"
            )
        return builder
    if _looks_local(src.path):
        raise UserError(
            f"{where}.path={src.path!r} does not exist; fix the path (relative to the current directory)"
        )
    return "hub"


def import_formatting(ref: str, where: str) -> Callable[[dict], str]:
    """Import "module:function" (the module must be importable, e.g. on PYTHONPATH)."""
    module_name, _, func_name = ref.partition(":")
    if not module_name or not func_name:
        raise UserError(f"{where}.formatting={ref!r} must be 'module:function', e.g. mypkg.fmt:to_text")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own import-time error
        raise UserError(
            f"{where}.formatting={ref!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
            "check the name and PYTHONPATH"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{where}.formatting={ref!r}: {module_name} has no function {func_name!r}")
    return func


def _load(kind: str, src: SourceConfig, where: str) -> tuple[Rows, str]:
    """(rows read in place, fingerprint of the input)."""
    import datasets

    path = str(Path(src.path).expanduser())
    if src.streaming and kind in ("megatron", "disk", "parquet"):
        raise UserError(
            f"{where}.streaming=true, but {src.path!r} is a {kind} source, already read in place (only "
            "the sampled rows); streaming is for hub datasets and json/jsonl/text files: remove it"
        )
    if kind == "megatron":
        from openseek_cpt.artifacts import megatron_format

        rows = MegatronRows(path)  # validates the files first (one-line UserError)
        return rows, f"megatron:{megatron_format.fingerprint(path)}"
    if kind == "disk":
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if src.split not in loaded:
                raise UserError(
                    f"{where}.split={src.split!r} is not a split of {src.path} (splits: {', '.join(loaded)})"
                )
            loaded = loaded[src.split]
        return DatasetRows(loaded), _fingerprint_dir(Path(path))
    if kind in ("json", "parquet", "text"):
        p = Path(path)
        files = sorted(f for f in p.glob("*") if f.is_file()) if p.is_dir() else [p]
        if all(f.stat().st_size == 0 for f in files):
            raise UserError(f"{where}.path={src.path!r} is an empty source (no data); remove it or fill it")
        if kind == "parquet":
            try:
                return ParquetRows(files), _fingerprint_files(files)
            except Exception as exc:  # pyarrow's error for a damaged file, on one line
                raise UserError(
                    f"{where}.path={src.path!r} could not be read as parquet ({type(exc).__name__}: {first_line(exc)[:300]}); "
                    "check the file or set type"
                ) from None
        try:
            ds = datasets.load_dataset(
                kind, data_files=[str(f) for f in files], split="train", streaming=src.streaming
            )
            if src.streaming:
                return StreamedRows(ds, where, src.path), _fingerprint_files(files)
        except Exception as exc:  # malformed file: the builder's error, on one line
            raise UserError(
                f"{where}.path={src.path!r} could not be read as {kind} ({type(exc).__name__}: {first_line(exc)[:300]}); "
                "check the file or set type"
            ) from None
        return DatasetRows(ds), _fingerprint_files(files)
    try:
        ds = datasets.load_dataset(
            path,
            name=src.name,
            split=src.split,
            data_files=src.data_files,
            revision=src.revision,
            streaming=src.streaming,
        )
        if src.streaming:
            # Nothing is downloaded up front, so nothing to hash: the request is the fingerprint
            # (with a revision, a fixed one); a local folder is fingerprinted as one.
            request = [path, src.name, src.split, src.data_files, src.revision]
            fingerprint = (
                _fingerprint_dir(Path(path)) if kind == "folder" else f"stream:{canonical_hash(request)}"
            )
            return StreamedRows(ds, where, src.path), fingerprint
    except Exception as exc:  # hub/network/builder errors all mean: this source cannot be read
        first = first_line(exc)[:300]
        hint = "no such local path either; " if kind == "hub" else ""
        raise UserError(
            f"{where}.path={src.path!r} could not be loaded as a {'hub dataset' if kind == 'hub' else 'folder'} "
            f"({type(exc).__name__}: {first}); {hint}check path/name/split, HF_ENDPOINT or HF_HUB_OFFLINE"
        ) from None
    if isinstance(ds, datasets.DatasetDict | datasets.IterableDataset):
        raise UserError(f"{where}: {src.path!r} did not give one split; set split (e.g. train)")
    return DatasetRows(ds), (
        _fingerprint_dir(Path(path)) if kind == "folder" else f"datasets:{ds._fingerprint}"
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _looks_local(path: str) -> bool:
    """A missing path that cannot be a hub id (hub ids are `name` or `org/name`)."""
    return (
        path.startswith((".", "/", "~"))
        or path.count("/") >= 2
        or Path(path).suffix.lower() in (*FILE_BUILDERS, ".gz", ".arrow", ".bin", ".idx")
    )


def _default_label(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.stem if p.suffix.lower() in FILE_BUILDERS else p.name


def _fingerprint_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest = sha256_file(f) if st.st_size <= HASH_LIMIT else f"stat:{st.st_size}:{int(st.st_mtime)}"
        h.update(f"{f.name}:{digest}\n".encode())
    return h.hexdigest()


def _fingerprint_dir(path: Path) -> str:
    """The directory's provenance fingerprint, else its files (large ones by size + mtime)."""
    if read_provenance(path):
        return directory_fingerprint(path)
    state = path / "state.json"
    if state.is_file():  # a save_to_disk dir: datasets' own fingerprint + the files' sizes
        fp = (read_json(state) or {}).get("_fingerprint", "")
        sizes = sorted(
            (p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file()
        )
        return canonical_hash([fp, sizes])
    return _fingerprint_files(sorted(p for p in path.rglob("*") if p.is_file()))
