"""Is a text source's text text? Checked when the source is opened, before any tokenizing.

`datasets` stores a json column holding one non-string value (an int, a list) as JSON text for every
row; tokenized, each document would be its JSON (quotes, literal `\\n`). So a text column must have a
string Arrow type; otherwise the first non-string row is named (index, and file:line for jsonl).
A malformed line or invalid UTF-8 in a json/text file is named by file and line the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.data.rows import Rows, StreamedRows
from openseek_cpt.errors import UserError

# Files a folder source reads line by line (checked line by line when it fails).
LINE_SUFFIXES = (".json", ".jsonl", ".txt")
# Rows read per step while looking for the first non-string one (only on the error path).
SCAN_ROWS = 1 << 16


def is_string_type(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def check_text_column(rows: Rows, field: str, where: str, path: str, files: list[Path]) -> None:
    """Raise a one-line UserError unless column `field` of `rows` holds strings (or nulls) only.

    A stream (`StreamedRows`) holds no rows before the stage reads it: its batches are checked as
    they are read, and its jsonl files (if local) here, when `datasets` saw a non-string value.
    """
    if isinstance(rows, StreamedRows):
        rows.text_field = field
        feature = (getattr(rows.stream, "features", None) or {}).get(field)
        place = _line_of_non_string(files, field) if files and type(feature).__name__ == "Json" else None
        if place is not None:
            raise not_text(where, field, path, *place)
        return
    type_ = rows.take([0], [field]).schema.field(field).type
    if is_string_type(type_):
        return
    index, found = _first_non_string(rows, field)
    place = _line_of_non_string(files, field) if files else None
    at = f"row {index}"
    if place is not None:
        at, found = f"{place[0]} (row {index})", place[1]
    raise not_text(where, field, path, at, found, f" (the column is read as {type_})")


def not_text(where: str, field: str, path: str, at: str, found: str, note: str = "") -> UserError:
    """The one-line error for a row whose text is not a string."""
    return UserError(
        f"{where}.text_field={field!r}: {path} is not text at {at}, which holds {found}; every row's "
        f"{field!r} must be a string{note}: fix or drop that row, or give a formatting function that "
        "makes its text"
    )


def _first_non_string(rows: Rows, field: str) -> tuple[int, str]:
    """(index, type name) of the first row whose value is neither a string nor null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for start in range(0, len(rows), SCAN_ROWS):
        column = rows.take(np.arange(start, min(start + SCAN_ROWS, len(rows))), [field]).column(field)
        for chunk in column.chunks:
            if isinstance(chunk, pa.ExtensionArray):  # datasets' Json: the JSON text of each value
                texts = chunk.storage.to_pylist()
                for k, text in enumerate(texts):
                    if text is not None and not text.startswith('"'):
                        value = json.loads(text)
                        if value is not None:
                            return start + k, type(value).__name__
            else:
                valid = np.flatnonzero(pc.is_valid(chunk).to_numpy(zero_copy_only=False))
                if len(valid):
                    return start + int(valid[0]), str(chunk.type)
            start += len(chunk)
    return 0, "only nulls (no text at all)"


def _line_of_non_string(files: list[Path], field: str) -> tuple[str, str] | None:
    """("file:line", type name) of the first jsonl line whose `field` is neither a string nor null."""
    for f in files:
        if f.suffix.lower() not in (".jsonl", ".json"):
            continue
        with f.open("rb") as lines:
            for n, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:
                    return None  # a whole-file JSON document: the row index says where
                value = row.get(field) if isinstance(row, dict) else None
                if value is not None and not isinstance(value, str):
                    return f"{f.name}:{n}", type(value).__name__
    return None


def first_bad_line(files: list[Path], kind: str) -> str | None:
    """ "file:line: what is wrong" of the first line that is not UTF-8 (or, for json, not JSON).

    `kind` json or text reads every file so; folder, those named .json/.jsonl/.txt by their suffix.
    """
    for f in files:
        suffix = f.suffix.lower()
        if kind == "folder":
            if suffix not in LINE_SUFFIXES:
                continue
            kind_of_file = "text" if suffix == ".txt" else "json"
        else:
            kind_of_file = kind
        with f.open("rb") as lines:
            for n, raw in enumerate(lines, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{f.name}:{n}: invalid UTF-8 (byte {exc.start} of the line: {raw[exc.start : exc.start + 1]!r})"
                if kind_of_file != "json" or not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as exc:
                    if n == 1 and _whole_file_json(f):
                        break  # one JSON document over several lines, not JSON lines
                    return f"{f.name}:{n}: not valid JSON ({exc})"
    return None


def _whole_file_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True
