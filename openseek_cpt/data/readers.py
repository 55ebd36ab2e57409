"""The source kinds: one table, one entry per way of reading a source (hub, disk, json, ...).

`detect_kind` (sources.py) picks an entry for `type: auto`; the entry's `load` opens the source in
place and fingerprints it: Megatron `.bin/.idx` through a memory map, parquet files by row group,
`save_to_disk` directories memory-mapped, JSON Lines and text files by a line index (only the sampled
lines read), a JSON document parsed in memory; hub datasets go through `datasets`' own Arrow cache, as
`load_dataset` makes it; hub, json and text sources can be read as a stream (`streaming: true`).
Adding a source type = one `Reader` entry here (with its `Rows` in rows.py if none there fits) and
its tests in tests/data/test_sources.py: data/config.py reads its `data.sources.N.type` choices from this
table, so this module imports nothing of the package at load but `errors` (the rest inside functions).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openseek_cpt.errors import UserError, first_line

if TYPE_CHECKING:  # data/config.py reads READERS: this module imports no more of the package at load
    from openseek_cpt.data.config import SourceConfig
    from openseek_cpt.data.rows import Rows

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# Files above this size are fingerprinted by size + mtime: hashing them would read the whole source.
HASH_LIMIT = 1 << 30


@dataclass(frozen=True)
class Reader:
    """One source kind: how it is opened (rows read in place + fingerprint of the input)."""

    name: str
    doc: str
    # Can be read as a stream (`streaming: true`); the others are read in place already.
    streams: bool
    # (source config, "data.sources.N", expanded path, kind) -> (rows, fingerprint)
    load: Callable[[SourceConfig, str, str, str], tuple[Rows, str]]
    # A recipe may name it in `type` (folder is only what auto finds for a plain directory).
    selectable: bool = True


def load(kind: str, src: SourceConfig, where: str) -> tuple[Rows, str]:
    """(rows read in place, fingerprint of the input) of `src`, read as `kind`."""
    reader = READERS[kind]
    if src.streaming and not reader.streams:
        raise UserError(
            f"{where}.streaming=true, but {src.path!r} is a {kind} source, already read in place (only "
            "the sampled rows); streaming is for hub datasets and json/jsonl/text files: remove it"
        )
    return reader.load(src, where, str(Path(src.path).expanduser()), kind)


# --------------------------------------------------------------------------- megatron


def _load_megatron(src: SourceConfig, where: str, path: str, kind: str) -> tuple[Rows, str]:
    from openseek_cpt.artifacts import megatron_format
    from openseek_cpt.data.rows import MegatronRows

    rows = MegatronRows(path)  # validates the files first (one-line UserError)
    return rows, f"megatron:{megatron_format.fingerprint(path)}"


# --------------------------------------------------------------------------- files and datasets-backed kinds


def _load_disk(src: SourceConfig, where: str, path: str, kind: str) -> tuple[Rows, str]:
    import datasets

    from openseek_cpt.data.rows import DatasetRows

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if src.split not in loaded:
            raise UserError(
                f"{where}.split={src.split!r} is not a split of {src.path} (splits: {', '.join(loaded)})"
            )
        loaded = loaded[src.split]
    return DatasetRows(loaded), _fingerprint_dir(Path(path))


def _load_files(src: SourceConfig, where: str, path: str, kind: str) -> tuple[Rows, str]:
    """json/jsonl, parquet and text: one file or a directory of them."""
    import datasets

    from openseek_cpt.data.rows import DatasetRows, ParquetRows, StreamedRows
    from openseek_cpt.data.text_checks import first_bad_line

    files, left_out = kind_files(path, kind)
    if left_out:
        from openseek_cpt.data import STAGE
        from openseek_cpt.logs import get_logger

        names = ", ".join(str(f.relative_to(path)) for f in left_out[:5]) + (
            " ..." if len(left_out) > 5 else ""
        )
        get_logger(STAGE).info(f"{where}: reading the {kind} files of {src.path}; left out: {names}")
    if not files:
        raise UserError(f"{where}.path={src.path!r} holds no {kind} files; fix the path or its type")
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
    if kind == "json" and not src.streaming and all(map(_is_json_lines, files)):
        from openseek_cpt.data.rows import JsonLinesRows

        return JsonLinesRows(files, where, src.path), _fingerprint_files(files)
    if kind == "text" and not src.streaming:
        from openseek_cpt.data.rows import TextLinesRows

        return TextLinesRows(files, where, src.path), _fingerprint_files(files)
    if kind == "json" and not src.streaming:
        return DatasetRows(_json_documents(files, where, src.path)), _fingerprint_files(files)
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", streaming=src.streaming
        )
        if src.streaming:
            locate = functools.partial(first_bad_line, files, kind)
            return StreamedRows(ds, where, src.path, locate), _fingerprint_files(files)
    except Exception as exc:  # malformed file: its first bad line, else the builder's error, on one line
        bad = first_bad_line(files, kind)
        if bad is not None:
            raise UserError(
                f"{where}.path={src.path!r} could not be read as {kind}: {bad}; fix or drop that line"
            ) from None
        raise UserError(
            f"{where}.path={src.path!r} could not be read as {kind} ({type(exc).__name__}: {first_line(exc)[:300]}); "
            "check the file or set type"
        ) from None
    return DatasetRows(ds), _fingerprint_files(files)


def _json_documents(files: list[Path], where: str, path: str) -> Any:
    """JSON files that are one document each (a list of objects), parsed in memory: no `datasets` cache."""
    import json

    import datasets
    import pyarrow as pa

    records: list = []
    for f in files:
        try:
            value = json.loads(f.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise UserError(
                f"{where}.path={path!r}: {f} is neither JSON Lines nor one JSON document ({first_line(exc)[:200]}); "
                "fix the file"
            ) from None
        if not (isinstance(value, list) and all(isinstance(r, dict) for r in value)):
            raise UserError(
                f"{where}.path={path!r}: {f} holds one JSON {type(value).__name__}, not a list of objects "
                "(one per document); write it as JSON Lines or as a list of objects"
            )
        records += value
    try:
        return datasets.Dataset(datasets.table.InMemoryTable(pa.Table.from_pylist(records)))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(
            f"{where}.path={path!r}: its objects' fields differ in type ({first_line(exc)[:200]}); fix the file"
        ) from None


def _is_json_lines(path: Path) -> bool:
    """Does the file hold one JSON object per line (read in place), not one JSON document?"""
    import json

    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw), dict)
                except ValueError:
                    return False
    return True


def kind_files(path: str, kind: str) -> tuple[list[Path], list[Path]]:
    """(files of a `kind` source read, files of its directory left out: those of another kind)."""
    p = Path(path)
    if not p.is_dir():
        return [p], []
    files = source_files(path, recursive=True)
    read = [f for f in files if FILE_BUILDERS.get(f.suffix.lower()) == kind]
    return read, [f for f in files if f not in read]


def folder_kinds(path: str) -> dict[str | None, list[Path]]:
    """A directory's files by the kind their suffix names (None: no data file: README.md, ...)."""
    kinds: dict[str | None, list[Path]] = {}
    for f in source_files(path, recursive=True):
        kinds.setdefault(FILE_BUILDERS.get(f.suffix.lower()), []).append(f)
    return kinds


def source_files(path: str, recursive: bool = False) -> list[Path]:
    """The files of a json/jsonl, parquet or text source: the file, or a directory's files in order
    (`recursive`: those of its subdirectories too, as a folder source's)."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    return sorted(f for f in (p.rglob("*") if recursive else p.glob("*")) if f.is_file())


def _load_hub(src: SourceConfig, where: str, path: str, kind: str) -> tuple[Rows, str]:
    """A hub dataset id, or (kind "folder") a local directory `load_dataset` reads."""
    import datasets

    from openseek_cpt.artifacts.fileio import canonical_hash
    from openseek_cpt.data.rows import DatasetRows, StreamedRows
    from openseek_cpt.data.text_checks import first_bad_line

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
            locate = (
                functools.partial(first_bad_line, source_files(path, True), kind)
                if kind == "folder"
                else None
            )
            return StreamedRows(ds, where, src.path, locate), fingerprint
    except Exception as exc:  # hub/network/builder errors all mean: this source cannot be read
        bad = first_bad_line(source_files(path, recursive=True), kind) if kind == "folder" else None
        if bad is not None:
            raise UserError(
                f"{where}.path={src.path!r} could not be read as a folder: {bad}; fix or drop that line"
            ) from None
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


# --------------------------------------------------------------------------- the table

READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader(
            "hub", "a dataset on the Hugging Face hub (`load_dataset(path, name, split)`)", True, _load_hub
        ),
        Reader("disk", "a `save_to_disk` directory, memory-mapped", False, _load_disk),
        Reader(
            "json",
            "json/jsonl files: JSON Lines read in place (sampled lines only), a JSON document (a list of "
            "objects) parsed in memory",
            True,
            _load_files,
        ),
        Reader("parquet", "parquet files, read by row group", False, _load_files),
        Reader(
            "text", "text files (a line per document), read in place (sampled lines only)", True, _load_files
        ),
        Reader("megatron", "a Megatron PREFIX (.bin + .idx), memory-mapped", False, _load_megatron),
        Reader("folder", "a local directory `load_dataset` reads", True, _load_hub, selectable=False),
    )
}


# --------------------------------------------------------------------------- fingerprints


def _fingerprint_files(files: list[Path]) -> str:
    from openseek_cpt.artifacts.provenance import sha256_file

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest = sha256_file(f) if st.st_size <= HASH_LIMIT else f"stat:{st.st_size}:{int(st.st_mtime)}"
        h.update(f"{f.name}:{digest}\n".encode())
    return h.hexdigest()


def _fingerprint_dir(path: Path) -> str:
    """The directory's provenance fingerprint, else its files (large ones by size + mtime)."""
    from openseek_cpt.artifacts.fileio import canonical_hash, read_json
    from openseek_cpt.artifacts.provenance import directory_fingerprint, read_provenance

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
