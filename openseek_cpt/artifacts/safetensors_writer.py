"""Streaming safetensors writes: shards written tensor by tensor, without holding tensors.

`ShardWriter` writes each shard's header (every key, dtype, shape and offset is known up front)
and then the tensors' bytes as they come, so the files are byte for byte what safetensors writes
for that layout; the sha256 of each output file is computed from the bytes as written, and each
finished shard is fsynced in the background while the next is written (the fileio policy).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.safetensors_stream import INDEX_FILE, ITEMSIZE, SINGLE_FILE

# Bytes written between two background fdatasync calls of the shard being written.
SYNC_EVERY = 256 << 20


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes safetensors shards tensor by tensor, holding none of them, hashing what it writes.

    All keys, dtypes and shapes are known before the first byte, so each shard's header (with
    every offset) is written first and the tensors are appended as they come. Shards are filled
    in the given key order up to `max_shard_size` bytes (a bigger tensor gets a shard of its own),
    named as transformers names them, with `model.safetensors.index.json` when there are several.
    Calls must come in key order (one thread at a time; the caller orders them).
    """

    def __init__(self, out_dir: Path, entries: list[tuple[str, str, tuple[int, ...]]], max_shard_size: int):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for key, dtype, shape in entries:
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((key, dtype, shape, nbytes))
            size += nbytes
        n = len(shards)
        self.names = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.total_size = sum(e[3] for shard in shards for e in shard)
        self.hashes: dict[str, str] = {}
        self._pos = (0, 0)  # (shard, entry) to be written next
        self._done = 0  # bytes of that entry written so far
        self._fd: int | None = None
        self._sha: Any = None
        # A finished shard is fsynced on this thread while the next one is computed (the fsync
        # policy of fileio: data on disk before the directory is renamed into place).
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-fsync")
        self._synced: list[Future] = []
        self._unsynced = 0

    def write_bytes(self, key: str, data: memoryview) -> None:
        """Append the next bytes of `key` (a whole tensor or the next chunk of it)."""
        shard, entry = self._pos
        want_key, _, _, nbytes = self.shards[shard][entry]
        if key != want_key or self._done + len(data) > nbytes:
            raise RuntimeError(
                f"shard writer expected {want_key} ({nbytes - self._done} bytes left), got {key}"
            )
        if entry == 0 and self._done == 0:
            self._fd = os.open(self.out_dir / self.names[shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._sha = hashlib.sha256()
            self._write(memoryview(self._header(self.shards[shard])))
        self._write(data)
        self._done += len(data)
        if self._done < nbytes:
            return
        self._done = 0
        if entry + 1 == len(self.shards[shard]):
            assert self._fd is not None
            self._synced.append(self._syncer.submit(_fsync_close, self._fd))
            self._fd = None
            self.hashes[self.names[shard]] = self._sha.hexdigest()
            self._pos = (shard + 1, 0)
        else:
            self._pos = (shard, entry + 1)

    def finish(self) -> dict[str, str]:
        """Write the index (if several shards); returns {file: sha256 hex} of every file written."""
        if self._pos != (len(self.shards), 0):
            raise RuntimeError(f"shard writer finished early at {self._pos}")
        for done in self._synced:
            done.result()
        if len(self.names) > 1:
            weight_map = {
                e[0]: name for name, shard in zip(self.names, self.shards, strict=True) for e in shard
            }
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            blob = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            (self.out_dir / INDEX_FILE).write_bytes(blob)
            self.hashes[INDEX_FILE] = hashlib.sha256(blob).hexdigest()
        return dict(self.hashes)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._syncer.shutdown(wait=True)

    def _write(self, data: memoryview) -> None:
        fd = self._fd
        assert fd is not None, "_write outside a shard"
        self._sha.update(data)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:  # start the disk writes now, not all at the end
            self._synced.append(self._syncer.submit(os.fdatasync, fd))
            self._unsynced = 0

    @staticmethod
    def _header(shard: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape, nbytes in shard:
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
        return struct.pack("<Q", len(blob)) + blob
