"""Open the data sources of a recipe: pick each one's kind, read it in place, check its columns.

Used by the data stage only. The kinds and how each is read are the table in readers.py; rows.py
is how rows are read. Everything file-dependent that can be wrong with a source is checked here,
before any expensive work, and reported as a one-line UserError: a missing local path, an empty
source, a text field that does not exist or is not text, a formatting function that does not import.
A relative path that exists locally (`data/foo`, even `org/name`) is always local, never a hub id:
the original scripts sent such paths to the hub.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openseek_cpt.data import readers
from openseek_cpt.data.config import SourceConfig
from openseek_cpt.data.readers import FILE_BUILDERS
from openseek_cpt.data.rows import Rows
from openseek_cpt.data.text_checks import check_text_column
from openseek_cpt.errors import UserError


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
    rows, fingerprint = readers.load(kind, src, where)
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
        where_from = str(Path(src.path).expanduser())
        files = (
            readers.source_files(where_from, recursive=True)
            if kind == "folder"
            else readers.kind_files(where_from, kind)[0]
            if kind in FILE_BUILDERS.values()
            else []
        )
        check_text_column(rows, src.text_field, where, src.path, files)
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
        return "disk" if _is_saved_dataset(path) else _folder_kind(path, src, where)
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


def _folder_kind(path: Path, src: SourceConfig, where: str) -> str:
    """A plain directory: the one kind of data file it holds (read in place, other files named as
    left out), or a `datasets` folder where it describes itself (a README.md with `configs`, as a hub
    snapshot has). Data files of several kinds are refused, naming them: never some silently dropped."""
    kinds = readers.folder_kinds(str(path))
    data = sorted(k for k in kinds if k is not None)
    if len(data) > 1:
        listing = "; ".join(
            f"{k}: {', '.join(str(f.relative_to(path)) for f in kinds[k][:3])}{' ...' if len(kinds[k]) > 3 else ''}"
            for k in data
        )
        raise UserError(
            f"{where}.path={src.path!r} holds data files of several kinds ({listing}); give each kind its own "
            "source (a file or a subfolder), or set type to read one kind"
        )
    readme = path / "README.md"
    if not data or (readme.is_file() and "configs:" in readme.read_text(errors="replace")):
        return "folder"
    return data[0]


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
