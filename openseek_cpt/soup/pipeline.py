"""The streamed merge: every key, chunk by chunk, from the inputs' files through a method into the shards.

Tensors stream out of the inputs' safetensors files one chunk of one key at a time
(safetensors_stream: pread into reused buffers, headers parsed once); each chunk of the inputs is
combined in fp32 (methods), rounded once to the output dtype (numerics) and written straight into
a pre-planned shard. Memory is a few fixed chunks per worker thread, whatever the number or size
of the models (bench/soup_memory.py measures it). Every input byte is read once: each file's
sha256 comes from the reads that feed the merge, the output's from the bytes as written; worker
threads (pread, hashlib and numpy release the GIL) keep every core busy, each on its own chunk,
and write in order.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openseek_cpt.artifacts.safetensors_stream import ITEMSIZE, Reader, Ticket, Turns
from openseek_cpt.artifacts.safetensors_writer import ShardWriter
from openseek_cpt.soup.inputs import SoupInput
from openseek_cpt.soup.methods import combine
from openseek_cpt.soup.numerics import Workspace, from_fp32, to_fp32
from openseek_cpt.soup.plan import KeyPlan

# Elements per chunk of a key streamed through the fp32 accumulator (1 MB of fp32): a chunk read
# is hashed and widened while it is still in the core's cache.
CHUNK_ELEMS = 1 << 18
# Worker threads of the merge: one per core (more threads than cores only compete for them).
WORKERS = max(2, min(8, os.cpu_count() or 2))
# Finished chunks that may wait, copied, for the one before them to be written (see OutputQueue):
# with one worker per core a deeper queue does not speed it up, and each parked chunk is memory.
MAX_PARKED = 2


@dataclass
class MergeResult:
    files: list[str]
    output_hashes: dict[str, str]
    # Per input, {file: sha256} of every weight file (and index), in input order.
    input_hashes: list[dict[str, str]]
    # Per input, {file: content hash} (content_hash.py) from the same reads: checked against markers.
    input_content_hashes: list[dict[str, str]]
    input_bytes: int
    # Bytes read only to complete a hash (a read order that jumps in a file, keys not merged).
    rehashed_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Step:
    """One chunk of one key: elements [e0, e0 + n); its reads, one per contributing input."""

    index: int
    key: str
    n: int
    copy: bool
    reads: tuple[tuple[int, str, Ticket], ...]  # (input, stored dtype, ticket)
    weights: tuple[float, ...]


class NonFiniteKey(Exception):
    """A key's combined chunk holds NaN/inf: some input holds them there (no arithmetic of a
    method makes them from finite values short of fp32's range)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def merge(
    inputs: list[SoupInput],
    plan: KeyPlan,
    method: str,
    out_code: str,
    out_dir: Path,
    max_shard_size: int,
    allow_non_finite: bool = False,
) -> MergeResult:
    """Stream every key, chunk by chunk, through `combine(method, ...)` into the shard writer.

    Chunks are handed out in key order to WORKERS threads; each reads its chunk of every input
    into its own buffer, feeds the inputs' hashes (in file order, see safetensors_stream), combines
    and hands its output to `OutputQueue` (written in order; a worker that finishes early parks a
    copy and goes on), so reads, hashes, adds and writes of neighbouring chunks overlap on all
    cores. Chunking a key along its flat elements does not change any result (a method is
    elementwise, each element combined in input order). Unless `allow_non_finite`, a chunk whose
    result is not finite stops the merge with NonFiniteKey (one float64 sum per chunk finds it).
    Returns the files written.
    """
    started = time.perf_counter()
    base = inputs[0]
    entries = [(key, _stored_dtype(key, plan, base, out_code), base.meta[key][1]) for key in plan.keys]
    writer = ShardWriter(out_dir, entries, max_shard_size)
    readers = [Reader(inp.files) for inp in inputs]
    steps = _StepQueue(_steps(inputs, readers, plan))
    outputs = OutputQueue(writer)
    widest = max((ITEMSIZE[dtype] for inp in inputs for dtype, _ in inp.meta.values()), default=1)
    failures: list[BaseException] = []

    def work() -> None:
        raw = bytearray(CHUNK_ELEMS * widest)
        scratch = bytearray(1 << 20)
        ws = Workspace(CHUNK_ELEMS)
        out = np.empty(CHUNK_ELEMS * ITEMSIZE[out_code], np.uint8)
        try:
            while (step := steps.next()) is not None:
                data = _run_step(
                    step, readers, raw, scratch, ws, out, plan, method, out_code, allow_non_finite
                )
                outputs.put(step.index, step.key, data)
        except BaseException as exc:  # stop the others: they may wait for this one's turns
            failures.append(exc)
            outputs.abort()
            for r in readers:
                r.abort()
            steps.close()

    gc_was_on = gc.isenabled()
    gc.disable()  # the loop makes no garbage cycles: collections would be pure overhead
    try:
        pool = [threading.Thread(target=work, name=f"soup-{i}", daemon=True) for i in range(WORKERS)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if failures:
            raise failures[0]  # the first failure; the others are the waiters it aborted
        hashes = writer.finish()
        input_hashes = _finish_readers(readers)
    finally:
        if gc_was_on:
            gc.enable()
        writer.close()
        for r in readers:
            r.close()
    return MergeResult(
        files=list(hashes),
        output_hashes=hashes,
        input_hashes=input_hashes,
        input_content_hashes=[r.content_hashes() for r in readers],
        input_bytes=sum(sum(inp.files.sizes.values()) for inp in inputs),
        rehashed_bytes=sum(r.rehashed_bytes for r in readers),
        seconds=time.perf_counter() - started,
    )


def _steps(inputs: list[SoupInput], readers: list[Reader], plan: KeyPlan) -> Iterator[_Step]:
    """Every chunk of every key in output order, with the reads' tickets taken in that order."""
    base = inputs[0]
    index = 0
    for key in plan.keys:
        dtype, shape = base.meta[key]
        numel = math.prod(shape)
        copy = key in plan.non_float
        contributors = [(0, key, 1.0)] if copy else [(i, src, w) for i, src, w in plan.sources[key] if w > 0]
        for e0 in range(0, max(numel, 1), CHUNK_ELEMS):
            n = min(CHUNK_ELEMS, numel - e0)
            reads = []
            for i, src, _ in contributors:
                src_dtype = inputs[i].meta[src][0]
                size = ITEMSIZE[src_dtype]
                if n:
                    reads.append((i, src_dtype, readers[i].ticket(src, e0 * size, n * size)))
            yield _Step(index, key, n, copy, tuple(reads), tuple(w for _, _, w in contributors))
            index += 1


class OutputQueue:
    """Writes the steps' outputs in step order without making a finished worker wait its turn.

    The worker whose output is next writes it, then every parked output that follows; a worker
    that finishes early parks a copy of its output (its buffers are reused by its next step) and
    goes on. At most MAX_PARKED outputs are parked; past that a worker waits, so memory stays
    bounded whatever the order threads finish in.
    """

    def __init__(self, writer: ShardWriter) -> None:
        self._writer = writer
        self._turns = Turns()
        self._parked: dict[int, tuple[str, bytes]] = {}

    def put(self, index: int, key: str, data: memoryview) -> None:
        def park() -> bool:  # under the turns' lock: the turn cannot pass `index` meanwhile
            if len(self._parked) >= MAX_PARKED:
                return False
            self._parked[index] = (key, bytes(data))
            return True

        if not self._turns.wait(index, instead=park):
            return
        while True:  # this thread holds the turn: only it writes until the turn moves on
            self._writer.write_bytes(key, data)
            self._turns.done(index)
            index += 1
            # Parked before the turn reached it (a later put takes the turn itself): no race.
            parked = self._parked.pop(index, None)
            if parked is None:
                return
            key, data = parked[0], memoryview(parked[1])

    def abort(self) -> None:
        self._turns.abort()


class _StepQueue:
    """Hands steps out in order to any thread (the tickets inside are taken under the lock)."""

    def __init__(self, steps: Iterator[_Step]) -> None:
        self._steps = steps
        self._lock = threading.Lock()
        self._closed = False

    def next(self) -> _Step | None:
        with self._lock:
            return None if self._closed else next(self._steps, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True


def _run_step(
    step: _Step,
    readers: list[Reader],
    raw: bytearray,
    scratch: bytearray,
    ws: Workspace,
    out: np.ndarray,
    plan: KeyPlan,
    method: str,
    out_code: str,
    allow_non_finite: bool = False,
) -> memoryview:
    """Read one chunk of every contributor and combine it; returns the output bytes of the chunk."""
    if step.n == 0:
        return memoryview(b"")
    if step.copy:  # non-float: the base's bytes as they are
        i, _, ticket = step.reads[0]
        return readers[i].read(ticket, raw, scratch)

    split = step.n % 2 == 0  # every input's chunk de-interleaved alike (to_fp32); undone on output

    def chunks() -> Iterator[np.ndarray]:
        into = ws.acc(step.n)  # the first input widens straight into the accumulator
        for i, dtype, ticket in step.reads:
            readers[i].read(ticket, raw, scratch)
            yield to_fp32(raw, dtype, step.n, into, split)
            into = ws.tmp(step.n)

    a = combine(method, chunks(), step.weights, ws)
    if not allow_non_finite and not math.isfinite(np.add.reduce(a, dtype=np.float64)):
        raise NonFiniteKey(step.key)
    code = "F32" if step.key in plan.fp32_keys else out_code
    return memoryview(from_fp32(a, code, out, ws.bits(step.n), split).view(np.uint8))  # type: ignore[arg-type]


def _finish_readers(readers: list[Reader]) -> list[dict[str, str]]:
    """Hash what the merge did not read (usually nothing), a few files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(lambda r: r.finish(bytearray(1 << 22)), readers))


def _stored_dtype(key: str, plan: KeyPlan, base: SoupInput, out_code: str) -> str:
    if key in plan.non_float:
        return base.meta[key][0]
    return "F32" if key in plan.fp32_keys else out_code
