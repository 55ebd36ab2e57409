"""Stage 3: the soup, a parameter-wise (weighted) average of the base model and its checkpoints.

The original merge script listed one checkpoint twice, held three whole models in RAM and let
a layout mismatch fall back to base weights without a word. Here:
- tensors stream out of the inputs' safetensors files one chunk of one key at a time, read with
  pread into reused buffers (not mmap, so pages of files already read do not stay in the process):
  each chunk of the inputs is accumulated in fp32, cast to the output dtype and written straight
  into a pre-planned shard. Peak memory is a few fixed 16 MB chunks, whatever the number or size
  of the models (bench/soup_memory.py measures it);
- every key of the base must be in every input with the same shape, else the run stops and lists
  the offenders; `allow_partial` averages each key over the inputs that match and records the rest;
- tied embeddings (no `lm_head.weight` on disk) are handled; non-float tensors are copied from the
  base; inputs are sorted by step, and a path given twice is an error;
- `merge_info.json` records inputs (step, weight, sha256 of each file), dtype, per-key counts,
  skipped and non-float keys; with `evaluate`, the eval loss of base, checkpoints and soup.

The mean of a key is sum_i(w_i * x_i) / sum_i(w_i), summed in fp32 in input order ([base,
*checkpoints]); with the default uniform weights every w_i is 1, so the result is exactly the fp32
sum divided by n, rounded once to the output dtype.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openseek_cpt.errors import UserError
from openseek_cpt.provenance import (
    CHECKPOINT_MARKER,
    atomic_output_dir,
    checkpoint_mismatches,
    sha256_file,
    write_provenance,
)
from openseek_cpt.recipe import Recipe

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MERGE_INFO = "merge_info.json"
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# Float dtypes of safetensors that can be averaged, by torch name.
FLOAT_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
# Keys that a model with tied embeddings does not store: they are read from their source.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}
# Files of a model directory that hold weights (never copied from the base into the soup).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".ckpt",
)
NOT_COPIED = {"provenance.json", MERGE_INFO}
# Elements per chunk of a key streamed through the fp32 accumulator (16 MB of fp32).
CHUNK_ELEMS = 1 << 22
STEP_RE = re.compile(r"checkpoint-(\d+)$")


def run(recipe: Recipe) -> Path:
    """Average [base, *checkpoints] into soup.output_dir; returns that directory."""
    s = recipe.soup
    started = time.time()
    out_dtype = _output_dtype(s.dtype)
    max_shard_size = parse_size(s.max_shard_size)
    base = open_input(recipe.soup_base_dir, role="base", field_name="soup.base_dir")
    checkpoints = [open_input(p, role="checkpoint") for p in expand_checkpoints(s.checkpoints)]
    inputs = [base, *checkpoints]
    _check_distinct(inputs)
    weights = _weights(s.weights, len(inputs))
    plan = plan_keys(inputs, weights, allow_partial=s.allow_partial)
    eval_dir = recipe.soup_eval_dataset_dir
    if s.evaluate and not Path(eval_dir).is_dir():
        raise UserError(
            f"soup.eval_dataset_dir={eval_dir!r} does not exist; run `openseek-cpt data` first, "
            "set soup.eval_dataset_dir, or set soup.evaluate=false"
        )
    print(
        f"[soup] {base.path} + {len(checkpoints)} checkpoint(s) -> {s.output_dir} "
        f"({s.dtype}, weights {_fmt_weights(weights)})",
        flush=True,
    )
    for line in plan.warnings():
        print(f"[soup] warning: {line}", flush=True)

    # Hash the input files on other threads while the merge reads them (hashlib drops the GIL).
    with contextlib.ExitStack() as stack:
        pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 1)))
        hashes = {
            (i, name): pool.submit(sha256_file, inp.path / name)
            for i, inp in enumerate(inputs)
            for name in inp.weight_files()
        }
        stack.callback(pool.shutdown, wait=False, cancel_futures=True)  # an error need not wait
        with atomic_output_dir(s.output_dir) as tmp:
            files = merge(inputs, plan, out_dtype, tmp, max_shard_size)
            _copy_side_files(base.path, tmp, s.dtype)
            evaluation = _evaluate(recipe, inputs, tmp) if s.evaluate else None
            info = _merge_info(inputs, weights, plan, s, files, hashes, evaluation, started)
            (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
            write_provenance(
                tmp,
                stage="soup",
                recipe=recipe,
                inputs={
                    f"{inp.label}:{name}": info["inputs"][i]["files"][name]
                    for i, inp in enumerate(inputs)
                    for name in inp.weight_files()
                },
            )
    if evaluation:
        print(format_eval_table(evaluation), flush=True)
    print(
        f"[soup] wrote {len(files)} shard(s) to {s.output_dir} in {time.time() - started:.1f} s", flush=True
    )
    return Path(s.output_dir)


# --------------------------------------------------------------------------- inputs


@dataclass
class SoupInput:
    """One model directory: where each key lives, and each key's (dtype, shape) as stored."""

    path: Path
    role: str
    step: int | None
    key_file: dict[str, str]
    meta: dict[str, tuple[str, tuple[int, ...]]]
    tied: bool
    # key -> (first byte, end byte) of its data in its file
    spans: dict[str, tuple[int, int]]
    index_file: str | None = None
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return "base" if self.role == "base" else self.path.name

    def weight_files(self) -> list[str]:
        return sorted(set(self.key_file.values())) + ([self.index_file] if self.index_file else [])

    def read(self, key: str, offset: int, nbytes: int, buf: bytearray) -> memoryview:
        """Bytes [offset, offset + nbytes) of `key` as stored, read into `buf` (no mmap, no new memory)."""
        name = self.key_file[key]
        if name not in self._fds:
            self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        view = memoryview(buf)[:nbytes]
        start, got = self.spans[key][0] + offset, 0
        while got < nbytes:
            n = os.preadv(self._fds[name], [view[got:]], start + got)
            if n <= 0:
                raise UserError(f"soup: {self.path / name} is truncated (reading {key}); re-save the model")
            got += n
        return view

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_input(path: str | Path, role: str, field_name: str = "soup.checkpoints") -> SoupInput:
    """Read the safetensors headers (and index) of a model directory; refuse other formats."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{field_name}: {str(path)!r} is not a directory; give a model or checkpoint-N directory"
        )
    if role == "checkpoint":
        _check_complete(p)
    index_file = None
    if (p / INDEX_FILE).is_file():
        index_file = INDEX_FILE
        try:
            key_file = dict(json.loads((p / INDEX_FILE).read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{field_name}: {p / INDEX_FILE} is not a safetensors index (no weight_map)"
            ) from None
    elif (p / SINGLE_FILE).is_file():
        key_file = None
    else:
        other = sorted(q.name for q in p.iterdir() if q.name.endswith((".bin", ".pt", ".pth", ".ckpt")))
        found = f"it has {', '.join(other[:3])} but " if other else ""
        raise UserError(
            f"{field_name}: {p} has no {SINGLE_FILE} or {INDEX_FILE} ({found}the soup reads safetensors only); "
            "re-save it with `model.save_pretrained(DIR)` (transformers writes safetensors)"
        )
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    files = sorted(set(key_file.values())) if key_file is not None else [SINGLE_FILE]
    found_keys: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name in files:
        if not (p / name).is_file():
            raise UserError(
                f"{field_name}: {p / INDEX_FILE} names {name}, which is missing; re-save the model"
            )
        try:
            with safe_open(str(p / name), framework="pt", backend="pread") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = f.get_slice(key)
                    meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
                    found_keys[key] = name
            spans.update(_data_spans(p / name))
        except SafetensorError as exc:
            raise UserError(f"{field_name}: {p / name} is not a readable safetensors file ({exc})") from None
    if key_file is None:
        key_file = found_keys
    elif set(key_file) != set(found_keys) or any(found_keys[k] != v for k, v in key_file.items()):
        raise UserError(f"{field_name}: {p / INDEX_FILE} does not match its shard files; re-save the model")
    config = _read_json(p / "config.json")
    step = _step_of(p) if role == "checkpoint" else None
    tied = bool(config.get("tie_word_embeddings"))
    return SoupInput(p, role, step, key_file, meta, tied, spans, index_file)


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte spans of each tensor: u64 header length, JSON header, then the data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    return {
        k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def _check_complete(ckpt: Path) -> None:
    """Refuse a checkpoint the train stage did not finish writing (its marker is written last).

    Checkpoints from elsewhere have no marker at all; only a run whose other checkpoints have one
    (or a marker that disagrees with the files) shows that this one was cut off mid-save.
    """
    bad = checkpoint_mismatches(ckpt)
    if bad == []:
        return
    if bad:
        reason = f"{bad[0]} differs from its {CHECKPOINT_MARKER}"
    elif any((sib / CHECKPOINT_MARKER).is_file() for sib in ckpt.parent.glob("checkpoint-*")):
        reason = f"no {CHECKPOINT_MARKER}, unlike the other checkpoints of the run"
    else:
        return
    raise UserError(
        f"soup.checkpoints: {ckpt} is incomplete ({reason}): training was cut off while saving it; "
        "leave it out (or let `openseek-cpt train` resume, which removes it)"
    )


def expand_checkpoints(items: Iterable[str]) -> list[Path]:
    """Paths and globs -> directories sorted by step (checkpoint-N), then by path."""
    items = list(items)
    if not items:
        raise UserError(
            "soup.checkpoints is empty; list checkpoint directories or a glob like runs/NAME/checkpoint-*"
        )
    out: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_dir())
            if not matches:
                raise UserError(
                    f"soup.checkpoints: glob {item!r} matches no directory (from {os.getcwd()}); "
                    "run `openseek-cpt train` first or fix the pattern"
                )
            out += matches
        else:
            out.append(Path(item))
    return sorted(out, key=lambda p: (_step_of(p) is None, _step_of(p) or 0, str(p)))


def _step_of(path: Path) -> int | None:
    m = STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def _check_distinct(inputs: list[SoupInput]) -> None:
    seen: dict[Path, SoupInput] = {}
    for inp in inputs:
        real = inp.path.resolve()
        if real in seen:
            first = seen[real]
            raise UserError(
                f"soup.checkpoints: {inp.path} is listed twice (also as {first.role} {str(first.path)!r}); "
                "remove the duplicate so no input counts double"
            )
        seen[real] = inp


def _weights(weights: list[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UserError(
            f"soup.weights has {len(weights)} values but there are {n} inputs (base + {n - 1} checkpoints, "
            "sorted by step); give one weight per input or null for a uniform average"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"soup.weights={weights} has a negative or non-finite weight; weights must be >= 0")
    if sum(weights) <= 0:
        raise UserError(f"soup.weights={weights} sum to 0; give at least one positive weight")
    return [float(w) for w in weights]


def _output_dtype(name: str):
    import torch

    if name not in OUTPUT_DTYPES:
        raise UserError(f"soup.dtype={name!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    return getattr(torch, name)


def parse_size(value: str | int) -> int:
    """`2GB`, `500MB`, `1GiB` or a number of bytes -> bytes (GB = 10**9, GiB = 2**30, as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise UserError(
                f"soup.max_shard_size={value!r} is not a size; write e.g. 2GB, 500MB or a byte count"
            )
        unit = m.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1 if unit else 0))
    if size <= 0:
        raise UserError(f"soup.max_shard_size={value!r} must be > 0")
    return size


# --------------------------------------------------------------------------- key plan


@dataclass
class KeyPlan:
    """What happens to each base key: which inputs (and weights) it is averaged over."""

    keys: list[str]
    # key -> [(input index, source key in that input, weight)]
    sources: dict[str, list[tuple[int, str, float]]]
    non_float: list[str]
    # {"key", "input", "reason"} for every key left out of an input (allow_partial only).
    skipped: list[dict[str, str]]
    # Keys that inputs store but the base ties (e.g. lm_head.weight when the base has none).
    ignored_tied: list[dict[str, str]]
    # Keys the model class keeps in fp32 whatever the dtype (its _keep_in_fp32_modules[_strict]).
    fp32_keys: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        out = []
        if self.skipped:
            out.append(
                f"{len(self.skipped)} key(s) left out of some inputs (allow_partial), see {MERGE_INFO}"
            )
        if self.non_float:
            out.append(
                f"{len(self.non_float)} non-float key(s) copied from the base: {', '.join(self.non_float[:3])}"
            )
        return out


def plan_keys(inputs: list[SoupInput], weights: list[float], allow_partial: bool) -> KeyPlan:
    """Match every base key in every input; list offenders unless allow_partial."""
    base = inputs[0]
    problems: list[dict[str, str]] = []
    ignored_tied: list[dict[str, str]] = []
    sources: dict[str, list[tuple[int, str, float]]] = {k: [(0, k, weights[0])] for k in base.meta}
    non_float = sorted(k for k, (dtype, _) in base.meta.items() if not _is_float(dtype))
    for i, inp in enumerate(inputs[1:], start=1):
        for key, (dtype, shape) in base.meta.items():
            src = key
            if key not in inp.meta and key in TIED_ALIASES and inp.tied and TIED_ALIASES[key] in inp.meta:
                src = TIED_ALIASES[key]
            if src not in inp.meta:
                problems.append({"key": key, "input": str(inp.path), "reason": "missing"})
            elif inp.meta[src][1] != shape:
                reason = f"shape {list(inp.meta[src][1])} != base {list(shape)}"
                problems.append({"key": key, "input": str(inp.path), "reason": reason})
            elif _is_float(inp.meta[src][0]) != _is_float(dtype):
                reason = f"dtype {inp.meta[src][0]} != base {dtype}"
                problems.append({"key": key, "input": str(inp.path), "reason": reason})
            elif key not in non_float:
                sources[key].append((i, src, weights[i]))
        for key in sorted(set(inp.meta) - set(base.meta)):
            if key in TIED_ALIASES and TIED_ALIASES[key] in base.meta:
                ignored_tied.append({"key": key, "input": str(inp.path), "reason": "the base ties it"})
            else:
                problems.append({"key": key, "input": str(inp.path), "reason": "not in the base"})
    if problems and not allow_partial:
        shown = "; ".join(f"{p['input']}: {p['key']} {p['reason']}" for p in problems[:4])
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise UserError(
            f"soup: {len(problems)} key mismatch(es) between the base and the checkpoints ({shown}{more}); "
            "use checkpoints of the base's architecture, or set soup.allow_partial=true to average each "
            f"key over the inputs that match (recorded in {MERGE_INFO})"
        )
    return KeyPlan(
        sorted(base.meta), sources, non_float, problems, ignored_tied, keep_in_fp32(base, non_float)
    )


def keep_in_fp32(base: SoupInput, non_float: list[str]) -> list[str]:
    """Keys the architecture keeps in fp32 (e.g. deepseek_v3's router e_score_correction_bias).

    save_pretrained of a bf16 model writes them in fp32 and from_pretrained upcasts them, so the
    soup keeps them in fp32 too rather than rounding them through bf16.
    """
    import transformers

    config = _read_json(base.path / "config.json")
    patterns: set[str] = set()
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            patterns.update(getattr(cls, attr, None) or [])
    return sorted(k for k in base.meta if k not in non_float and any(p in k.split(".") for p in patterns))


def _is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


# --------------------------------------------------------------------------- merge


def merge(inputs: list[SoupInput], plan: KeyPlan, out_dtype, out_dir: Path, max_shard_size: int) -> list[str]:
    """Stream every key, chunk by chunk, through an fp32 accumulator into the shard writer.

    Reads go straight from the files into one reused buffer (os.preadv at offsets taken from the
    safetensors headers): safe_open's get_tensor allocates a fresh tensor per read and its slicing
    is ~10x slower, and reused buffers keep the peak at a few chunks, whatever the tensor sizes.
    Chunking a key along its flat elements does not change any result (the mean is elementwise).
    Returns the files written.
    """
    import torch

    out_code = OUTPUT_DTYPES[str(out_dtype).removeprefix("torch.")]
    base = inputs[0]
    entries = [(key, _stored_dtype(key, plan, base, out_code), base.meta[key][1]) for key in plan.keys]
    writer = ShardWriter(out_dir, entries, max_shard_size)
    torch_dtypes = {code: getattr(torch, name) for code, name in FLOAT_DTYPES.items()}
    widest = max(ITEMSIZE[dtype] for inp in inputs for dtype, _ in inp.meta.values())
    raw = bytearray(CHUNK_ELEMS * widest)
    acc = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
    tmp = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
    out = torch.empty(CHUNK_ELEMS, dtype=out_dtype)
    # One intra-op thread: the work is elementwise and memory-bound, the other cores hash the
    # inputs, and OpenMP's spinning threads made it 5-10x slower on a busy machine (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key in plan.keys:
            dtype, shape = base.meta[key]
            numel = math.prod(shape)
            if key in plan.non_float:  # copied from the base, byte for byte
                nbytes = numel * ITEMSIZE[dtype]
                for b0 in range(0, max(nbytes, 1), len(raw)):
                    n = min(len(raw), nbytes - b0)
                    writer.write_bytes(key, base.read(key, b0, n, raw))
                continue
            contributors = [(i, src, w) for i, src, w in plan.sources[key] if w > 0]
            total = sum(w for _, _, w in contributors)
            for e0 in range(0, max(numel, 1), CHUNK_ELEMS):
                n = min(CHUNK_ELEMS, numel - e0)
                a = acc[:n]
                for j, (i, src, w) in enumerate(contributors):
                    src_dtype = inputs[i].meta[src][0]
                    size = ITEMSIZE[src_dtype]
                    inputs[i].read(src, e0 * size, n * size, raw)
                    x = torch.frombuffer(raw, dtype=torch_dtypes[src_dtype], count=n) if n else a
                    if j == 0:
                        a.copy_(x)  # = 0 + x; copy_ converts to fp32 exactly
                        if w != 1.0:
                            a.mul_(w)
                    else:
                        if x.dtype != torch.float32:
                            x = tmp[:n].copy_(x)  # exact conversion into a reused buffer
                        if w != 1.0:
                            a.add_(x, alpha=w)
                        else:
                            a.add_(x)
                if total != 1.0:
                    a.div_(total)
                writer.write_bytes(key, _bytes_of(a if key in plan.fp32_keys else out[:n].copy_(a)))
    finally:
        torch.set_num_threads(threads)
        for inp in inputs:
            inp.close()
    return writer.finish()


def _bytes_of(tensor) -> memoryview:
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _stored_dtype(key: str, plan: KeyPlan, base: SoupInput, out_code: str) -> str:
    if key in plan.non_float:
        return base.meta[key][0]
    return "F32" if key in plan.fp32_keys else out_code


class ShardWriter:
    """Writes safetensors shards tensor by tensor, holding none of them.

    All keys, dtypes and shapes are known before the first tensor is averaged, so each shard's
    header (with every offset) is written first and the tensors are appended as they come: the
    files are byte-for-byte what safetensors expects. Shards are filled in key order up to
    `max_shard_size` bytes (a bigger tensor gets a shard of its own), named as transformers names
    them, with `model.safetensors.index.json` when there is more than one.
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
        self._pos = (0, 0)  # (shard, entry) to be written next
        self._done = 0  # bytes of that entry written so far
        self._file = None

    def write_bytes(self, key: str, data: memoryview) -> None:
        """Append the next bytes of `key` (a whole tensor or the next chunk of it)."""
        shard, entry = self._pos
        want_key, _, _, nbytes = self.shards[shard][entry]
        if key != want_key or self._done + len(data) > nbytes:
            raise RuntimeError(
                f"shard writer expected {want_key} ({nbytes - self._done} bytes left), got {key}"
            )
        if entry == 0 and self._done == 0:
            self._file = open(self.out_dir / self.names[shard], "wb")  # noqa: SIM115 (spans write calls)
            self._file.write(self._header(self.shards[shard]))
        self._file.write(data)
        self._done += len(data)
        if self._done < nbytes:
            return
        self._done = 0
        if entry + 1 == len(self.shards[shard]):
            self._file.close()
            self._file = None
            self._pos = (shard + 1, 0)
        else:
            self._pos = (shard, entry + 1)

    def finish(self) -> list[str]:
        if self._pos != (len(self.shards), 0):
            raise RuntimeError(f"shard writer finished early at {self._pos}")
        if len(self.names) > 1:
            weight_map = {
                e[0]: name for name, shard in zip(self.names, self.shards, strict=True) for e in shard
            }
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            return [*self.names, INDEX_FILE]
        return list(self.names)

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


# --------------------------------------------------------------------------- outputs


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """Tokenizer, config, generation config and any remote-code files come from the base."""
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(p, out_dir / p.name)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for name in ("dtype", "torch_dtype"):
            if name in config or name == "dtype":
                config[name] = dtype  # the soup's tensors are stored in this dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _evaluate(recipe: Recipe, inputs: list[SoupInput], soup_dir: Path) -> list[dict[str, Any]]:
    from openseek_cpt.evaluation import eval_loss

    s = recipe.soup
    rows = []
    for name, path in [*((inp.label, inp.path) for inp in inputs), ("soup", soup_dir)]:
        print(f"[soup] evaluating {name} ...", flush=True)
        result = eval_loss(
            path,
            recipe.soup_eval_dataset_dir,
            max_sequences=s.eval_max_sequences,
            trust_remote_code=recipe.assets.model_trust_remote_code,
        )
        rows.append({"name": name, "path": str(path if name != "soup" else s.output_dir), **result})
    return rows


def format_eval_table(rows: list[dict[str, Any]]) -> str:
    """The eval losses as a table, with the change against the base (did the soup gain anything?)."""
    base = rows[0]["loss"]
    lines = [
        f"[soup] eval loss on split {rows[0]['split']!r} ({rows[0]['sequences']} sequences, {rows[0]['tokens']} tokens):",
        f"  {'model':<24} {'loss':>9} {'perplexity':>11} {'vs base':>9}",
    ]
    for r in rows:
        lines.append(
            f"  {r['name']:<24} {r['loss']:>9.4f} {r['perplexity']:>11.3f} {r['loss'] - base:>+9.4f}"
        )
    best = min(rows, key=lambda r: r["loss"])
    lines.append(f"  lowest: {best['name']}")
    return "\n".join(lines)


def _merge_info(
    inputs: list[SoupInput],
    weights: list[float],
    plan: KeyPlan,
    s,
    files: list[str],
    hashes: dict[tuple[int, str], Future],
    evaluation: list[dict[str, Any]] | None,
    started: float,
) -> dict[str, Any]:
    n = len(inputs)
    key_counts = {k: sum(1 for _, _, w in plan.sources[k] if w > 0) for k in plan.keys}
    return {
        "method": "weighted_mean" if len(set(weights)) > 1 else "uniform_mean",
        "formula": "sum_i(w_i * x_i) / sum_i(w_i), accumulated in float32 in input order, cast once to dtype",
        "inputs": [
            {
                "role": inp.role,
                "path": str(inp.path),
                "step": inp.step,
                "weight": weights[i],
                "files": {name: hashes[(i, name)].result() for name in inp.weight_files()},
            }
            for i, inp in enumerate(inputs)
        ],
        "weights": weights,
        "dtype": s.dtype,
        "allow_partial": s.allow_partial,
        "output_files": files,
        "counts": {
            "keys": len(plan.keys),
            "averaged_over_all_inputs": sum(
                1 for k in plan.keys if k not in plan.non_float and key_counts[k] == n
            ),
            "averaged_over_some_inputs": sum(
                1 for k in plan.keys if k not in plan.non_float and key_counts[k] < n
            ),
            "non_float_copied_from_base": len(plan.non_float),
        },
        "key_counts": key_counts,
        "skipped_keys": plan.skipped,
        "ignored_tied_keys": plan.ignored_tied,
        "non_float_keys": plan.non_float,
        "fp32_keys": plan.fp32_keys,
        "evaluation": evaluation,
        "time": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
        },
    }


def _fmt_weights(weights: list[float]) -> str:
    return "uniform" if len(set(weights)) == 1 else ", ".join(f"{w:g}" for w in weights)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
