"""Streaming safetensors reads: headers parsed once and checked, tensors' byte ranges read with pread.

A leaf module (the soup uses it; it knows nothing of averaging). Guarantees:
- each file's header is read and parsed once (`open_model`) and checked as strictly as the
  safetensors library does: no key twice, known dtype, shape x item size == the tensor's byte span,
  and the spans, sorted, tile the data section exactly (no overlap, no two keys on the same bytes,
  no gap, nothing past the end or left over); the index (if any) must name exactly the keys its
  shards hold;
- reads go from the file straight into the caller's buffer (`os.preadv`): no mmap (pages of
  files already read do not stay in the process), no new memory per read;
- the sha256 of every input file comes from the same reads that feed the caller, fed to the hash
  in file order (`Reader.read`): a read that lands past the hash's cursor first hashes the bytes it
  skipped (reading them once more, counted in `Reader.rehashed_bytes`); a read behind the cursor
  was hashed already; bytes never read (unused keys) are hashed by `Reader.finish`. Reads may come
  from several threads; tickets (`Reader.ticket`, handed out in merge order) keep each file's
  hash in order. The same bytes feed each file's content hash (content_hash.py, what checkpoint
  markers record: `Reader.content_hashes`), so checking an input against its marker reads nothing more.
Writing is safetensors_writer.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openseek_cpt.artifacts.content_hash import BlockHasher
from openseek_cpt.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# Headers larger than this are not safetensors files (the format caps them at 100 MB).
MAX_HEADER = 100_000_000
# Bytes hashed per read when filling a gap or a tail (a fixed buffer, whatever the file size).
HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file name, absolute [start, end), as stored (dtype, shape)."""

    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelFiles:
    """The safetensors files of one model directory, their headers parsed once."""

    path: Path
    tensors: dict[str, TensorInfo]
    # Weight files in name order, then the index (if any): the files whose hashes are recorded.
    files: list[str]
    index_file: str | None
    sizes: dict[str, int]
    # Bytes read while opening (headers, index), with the file they belong to: they start each hash.
    opened_bytes: dict[str, bytes] = field(default_factory=dict, repr=False)


def open_model(path: str | Path, field_name: str) -> ModelFiles:
    """Parse the index and every shard header of a model directory; refuse anything but safetensors."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{field_name}: {str(path)!r} is not a directory; give a model or checkpoint-N directory"
        )
    opened: dict[str, bytes] = {}
    if (p / INDEX_FILE).is_file():
        raw = (p / INDEX_FILE).read_bytes()
        try:
            weight_map = json.loads(raw)["weight_map"]
            key_file = {str(k): str(v) for k, v in dict(weight_map).items()}
        except (RecursionError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise UserError(
                f"{field_name}: {p / INDEX_FILE} is not a safetensors index (no weight_map)"
            ) from None
        opened[INDEX_FILE] = raw
        index_file: str | None = INDEX_FILE
        names = sorted(set(key_file.values()))
    elif (p / SINGLE_FILE).is_file():
        key_file, index_file, names = None, None, [SINGLE_FILE]
    else:
        other = sorted(q.name for q in p.iterdir() if q.name.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f"it has {', '.join(other[:3])} but " if other else ""
        raise UserError(
            f"{field_name}: {p} has no {SINGLE_FILE} or {INDEX_FILE} ({found}the soup reads safetensors only); "
            "re-save it with `model.save_pretrained(DIR)` (transformers writes safetensors)"
        )
    tensors: dict[str, TensorInfo] = {}
    sizes: dict[str, int] = {}
    for name in names:
        if not (p / name).is_file():
            raise UserError(
                f"{field_name}: {p / INDEX_FILE} names {name}, which is missing; re-save the model"
            )
        header, raw, size = _read_header(p / name, field_name)
        opened[name] = raw
        sizes[name] = size
        for key, info in header.items():
            if key in tensors:
                raise UserError(f"{field_name}: {key} is in two shards of {p}; re-save the model")
            tensors[key] = info
    if key_file is not None and (
        set(key_file) != set(tensors) or any(tensors[k].file != v for k, v in key_file.items())
    ):
        raise UserError(f"{field_name}: {p / INDEX_FILE} does not match its shard files; re-save the model")
    if index_file:
        sizes[index_file] = len(opened[index_file])
    return ModelFiles(p, tensors, [*names, *([index_file] if index_file else [])], index_file, sizes, opened)


def _read_header(path: Path, field_name: str) -> tuple[dict[str, TensorInfo], bytes, int]:
    """(key -> TensorInfo with absolute spans, the raw bytes read, the file size) of one file."""
    size = path.stat().st_size

    def bad(why: str) -> UserError:
        return UserError(
            f"{field_name}: {path} is not a readable safetensors file ({why}); re-save the model"
        )

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than 8 bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise bad(f"header length {length} does not fit in {size} bytes")
        blob = f.read(length)
    try:
        header = json.loads(blob, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise bad(f"key {exc.args[0]!r} appears twice in the header") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start = 8 + length
    out: dict[str, TensorInfo] = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = v["dtype"], tuple(int(d) for d in v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {key!r} lacks dtype, shape or data_offsets") from None
        if dtype not in ITEMSIZE:
            raise bad(f"{key} has dtype {dtype!r}, not one of {', '.join(ITEMSIZE)}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and start + b <= size):
            raise bad(f"{key} spans bytes {a}..{b}, outside the file")
        if math.prod(shape) * ITEMSIZE[dtype] != b - a:
            raise bad(f"{key} has shape {list(shape)} {dtype} but {b - a} bytes")
        out[key] = TensorInfo(dtype, shape, path.name, start + a, start + b)
    _check_layout(out, start, size, bad)
    return out, head + blob, size


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_layout(
    tensors: dict[str, TensorInfo], start: int, size: int, bad: Callable[[str], UserError]
) -> None:
    """The spans, sorted, must tile [start, size) exactly, as the safetensors library requires."""
    end, previous = start, None
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end, kv[0])):
        a, b = info.start - start, info.end - start
        if previous is not None and info.start < end:
            p = tensors[previous]
            pa, pb = p.start - start, p.end - start
            if (a, b) == (pa, pb):
                raise bad(f"{key} and {previous} share the same bytes {a}..{b} (aliased keys)")
            raise bad(f"{key} (bytes {a}..{b}) overlaps {previous} (bytes {pa}..{pb})")
        if info.start > end:
            raise bad(f"{key} starts at byte {a}, leaving bytes {end - start}..{a} of no key")
        end, previous = info.end, key
    if end != size:
        raise bad(f"bytes {end - start}..{size - start} of the data section belong to no key")


# --------------------------------------------------------------------------- reading


class Turns:
    """Turns taken in order 0, 1, 2, ... by any thread; `abort` wakes every waiter with an error."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._aborted = False

    def wait(self, turn: int, instead: Callable[[], bool] | None = None) -> bool:
        """Block until `turn` comes (True). `instead`, called under the lock while this waits, may
        end the wait by doing something else and returning True (then False: the turn is not held)."""
        if self._next == turn:  # usually so: only this turn's holder can move it on
            return True
        with self._cond:
            self._cond.wait_for(
                lambda: self._next == turn or self._aborted or (instead is not None and instead())
            )
            if self._aborted:
                raise RuntimeError("aborted: another thread failed")
            return self._next == turn

    def done(self, turn: int) -> None:
        with self._cond:
            assert self._next == turn, (self._next, turn)
            self._next += 1
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Ticket:
    """One read of `nbytes` at absolute `start` of `file`, the `turn`-th read of that file."""

    file: str
    start: int
    nbytes: int
    turn: int


class _FileHash:
    """The sha256 and the content hash of one file, fed in file order; `cursor` = bytes hashed so far."""

    def __init__(self, head: bytes) -> None:
        self.sha = hashlib.sha256(head)
        self.content = BlockHasher()
        self.content.update(head)
        self.cursor = len(head)
        self.turns = Turns()
        self.issued = 0


class Reader:
    """Reads byte ranges of one model's tensors and hashes every file from those same reads."""

    def __init__(self, model: ModelFiles) -> None:
        self.model = model
        self._fds: dict[str, int] = {}
        self._hash = {name: _FileHash(model.opened_bytes.get(name, b"")) for name in model.files}
        self._lock = threading.Lock()
        self.rehashed_bytes = 0

    def ticket(self, key: str, offset: int, nbytes: int) -> Ticket:
        """Reserve the next read of `key` (bytes [offset, offset + nbytes) of its data).

        Tickets must be taken in the order their hashes should be fed (the merge's order); the
        reads themselves may then run on any thread.
        """
        info = self.model.tensors[key]
        state = self._hash[info.file]
        t = Ticket(info.file, info.start + offset, nbytes, state.issued)
        state.issued += 1
        return t

    def read(self, t: Ticket, buf: bytearray, scratch: bytearray) -> memoryview:
        """The ticket's bytes, read into `buf`; fed to the file's hash when its turn comes.

        `scratch` (any size) receives skipped bytes when this read jumps ahead of the hash.
        """
        view = memoryview(buf)[: t.nbytes]
        self._pread(t.file, view, t.start)
        state = self._hash[t.file]
        state.turns.wait(t.turn)
        try:
            if t.start > state.cursor:
                self._hash_range(t.file, state, t.start, scratch)
            if t.start == state.cursor:
                state.sha.update(view)
                state.content.update(view)
                state.cursor += t.nbytes
            elif t.start + t.nbytes > state.cursor:
                raise RuntimeError(f"overlapping reads of {self.model.path / t.file} at {t.start}")
        finally:
            state.turns.done(t.turn)
        return view

    def finish(self, scratch: bytearray) -> dict[str, str]:
        """Hash what was never read, close the files; returns {file: sha256 hex} for every file."""
        try:
            for name, state in self._hash.items():
                state.turns.wait(state.issued)
                self._hash_range(name, state, self.model.sizes[name], scratch)
            return {name: state.sha.hexdigest() for name, state in self._hash.items()}
        finally:
            self.close()

    def content_hashes(self) -> dict[str, str]:
        """{file: content hash} of every file (after `finish`): what a checkpoint marker records."""
        return {name: state.content.hexdigest() for name, state in self._hash.items()}

    def abort(self) -> None:
        for state in self._hash.values():
            state.turns.abort()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _hash_range(self, name: str, state: _FileHash, end: int, scratch: bytearray) -> None:
        """Read [cursor, end) of `name` into `scratch` block by block and hash it."""
        block = memoryview(scratch)[: max(1, min(len(scratch), HASH_BLOCK))]
        while state.cursor < end:
            n = min(len(block), end - state.cursor)
            self._pread(name, block[:n], state.cursor)
            state.sha.update(block[:n])
            state.content.update(block[:n])
            state.cursor += n
            with self._lock:
                self.rehashed_bytes += n

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        with self._lock:
            if name not in self._fds:
                self._fds[name] = os.open(self.model.path / name, os.O_RDONLY)
            return self._fds[name]

    def _pread(self, name: str, view: memoryview, start: int) -> None:
        fd, got = self._fd(name), 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], start + got)
            if n <= 0:
                raise UserError(
                    f"{self.model.path / name} is truncated (reading at byte {start + got}); re-save it"
                )
            got += n
