"""Stage 3: the soup, a parameter-wise (weighted) average of the base model and its checkpoints.

The original merge script listed one checkpoint twice, held three whole models in RAM and let
a layout mismatch fall back to base weights without a word. Here:
- tensors stream out of the inputs' safetensors files one chunk of one key at a time
  (safetensors_stream: pread into reused buffers, headers parsed once); each chunk of the inputs
  is combined in fp32 (`combine`, method "linear"), cast to the output dtype and written straight
  into a pre-planned shard. Memory is a few fixed chunks per worker thread, whatever the number or
  size of the models (bench/soup_memory.py measures it);
- every input byte is read once: each file's sha256 comes from the reads that feed the merge, the
  output's from the bytes as written; worker threads (pread, hashlib and numpy release the GIL)
  keep every core busy, each on its own chunk, and write in order;
- any HF causal-LM checkpoint set whose keys match will do (llama-shaped as well as deepseek_v3):
  every key of the base must be in every input with the same shape, else the run stops and lists
  the offenders; `allow_partial` averages each key over the inputs that match and records the rest;
  `merge_info.json` accounts for every key of every input (averaged, copied, skipped, ignored), and
  the run fails rather than write a soup that leaves one out;
- float tensors, buffers included, are averaged: deepseek_v3's router `e_score_correction_bias`
  (a float32 parameter-buffer) is averaged like any weight and stays float32 (see `keep_in_fp32`);
  non-float tensors (counters, masks) are copied from the base; buffers a model does not save
  (rotary inv_freq) are not in the files and are rebuilt by from_pretrained;
- tied embeddings (no `lm_head.weight` on disk) are handled; inputs are sorted by step, and a path
  given twice is an error; merge_info records inputs (step, weight, sha256 of each file), dtype,
  per-key counts and, with `evaluate`, the eval loss of base, checkpoints and soup.

The mean of a key is sum_i(w_i * x_i) / sum_i(w_i), summed in fp32 in input order ([base,
*checkpoints]); with the default uniform weights every w_i is 1, so the result is exactly the fp32
sum divided by n, rounded once to the output dtype (round to nearest even, bit for bit what
torch's conversion gives). The merge path is numpy: it imports neither torch nor transformers
(only `evaluate`, float8 inputs, and an fp32 base souped to a narrower dtype, need them).
"""

from __future__ import annotations

import gc
import glob
import json
import math
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.artifacts.provenance import atomic_output_dir, write_provenance
from openseek_cpt.artifacts.safetensors_stream import (
    ITEMSIZE,
    ModelFiles,
    Reader,
    ShardWriter,
    Ticket,
    open_model,
)
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import Recipe, parse_size

log = get_logger("soup")

MERGE_INFO = "merge_info.json"
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
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
NOT_COPIED = {"provenance.json", MERGE_INFO, checkpoints.MARKER}
# Elements per chunk of a key streamed through the fp32 accumulator (1 MB of fp32): a chunk read
# is hashed and widened while it is still in the core's cache.
CHUNK_ELEMS = 1 << 18
# Worker threads of the merge: one per core (a third on 2 cores was slower on a quiet machine, measured).
WORKERS = max(2, min(8, os.cpu_count() or 2))
# Finished chunks that may wait, copied, for the one before them to be written (see _OutputQueue):
# with one worker per core more than 2 never sped it up, and each parked chunk is memory.
MAX_PARKED = 2
METHOD = "linear"


def run(recipe: Recipe) -> Path:
    """Average [base, *checkpoints] into soup.output_dir; returns that directory."""
    s = recipe.soup
    started = time.time()
    out_code = _output_code(s.dtype)
    max_shard_size = parse_size(s.max_shard_size)
    base = open_input(recipe.soup_base_dir, role="base", field_name="soup.base_dir")
    ckpts = [open_input(p, role="checkpoint") for p in expand_checkpoints(s.checkpoints)]
    inputs = [base, *ckpts]
    _check_distinct(inputs)
    weights = _weights(s.weights, len(inputs))
    plan = plan_keys(inputs, weights, allow_partial=s.allow_partial, out_code=out_code)
    accounting = account_keys(inputs, plan)
    eval_dir = recipe.soup_eval_dataset_dir
    if s.evaluate and not Path(eval_dir).is_dir():
        raise UserError(
            f"soup.eval_dataset_dir={eval_dir!r} does not exist; run `openseek-cpt data` first, "
            "set soup.eval_dataset_dir, or set soup.evaluate=false"
        )
    log.info(
        f"{base.path} + {len(ckpts)} checkpoint(s) -> {s.output_dir} ({s.dtype}, weights {_fmt_weights(weights)})"
    )
    for line in plan.warnings():
        log.warning(line)

    read = [inp.path for inp in inputs] + ([eval_dir] if s.evaluate else [])
    with atomic_output_dir(s.output_dir, stage="soup", inputs=read, field="soup.output_dir") as tmp:
        result = merge(inputs, plan, out_code, tmp, max_shard_size)
        _copy_side_files(base.path, tmp, s.dtype)
        evaluation = _evaluate(recipe, inputs, tmp) if s.evaluate else None
        info = _merge_info(inputs, weights, plan, accounting, s, result, evaluation, started)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        write_provenance(
            tmp,
            stage="soup",
            recipe=recipe,
            inputs={
                f"{inp.label}:{name}": digest
                for inp, hashes in zip(inputs, result.input_hashes, strict=True)
                for name, digest in hashes.items()
            },
            known_hashes=result.output_hashes,  # hashed as written: the shards are not read again
        )
    if evaluation:
        from openseek_cpt.evaluation import format_eval_table

        log.info(format_eval_table(evaluation))
    log.info(
        f"wrote {len(result.files)} shard file(s) to {s.output_dir} in {time.time() - started:.1f} s "
        f"({result.seconds:.1f} s merging {result.input_bytes / 1e9:.2f} GB)"
    )
    return Path(s.output_dir)


# --------------------------------------------------------------------------- inputs


@dataclass
class SoupInput:
    """One model directory: its parsed files, and each key's (dtype, shape) as stored."""

    path: Path
    role: str
    step: int | None
    files: ModelFiles
    tied: bool
    meta: dict[str, tuple[str, tuple[int, ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.meta = {k: (t.dtype, t.shape) for k, t in self.files.tensors.items()}

    @property
    def label(self) -> str:
        return "base" if self.role == "base" else self.path.name


def open_input(path: str | Path, role: str, field_name: str = "soup.checkpoints") -> SoupInput:
    """Read the safetensors headers (and index) of a model directory; refuse other formats."""
    p = Path(path)
    if role == "checkpoint" and p.is_dir():
        _check_complete(p)
    files = open_model(p, field_name)
    config = read_json(p / "config.json") or {}
    step = checkpoints.step_of(p) if role == "checkpoint" else None
    return SoupInput(p, role, step, files, bool(config.get("tie_word_embeddings")))


def _check_complete(ckpt: Path) -> None:
    """Refuse a checkpoint the train stage did not finish writing (its marker is written last).

    Checkpoints from elsewhere have no marker at all; only a run whose other checkpoints have one
    (or a marker that disagrees with the files) shows that this one was cut off mid-save.
    """
    st = checkpoints.status(ckpt)
    if st.complete:
        return
    if st.state == "damaged":
        reason = f"{st.files[0]} differs from its {checkpoints.MARKER}"
    elif any(checkpoints.read_marker(sib) for sib in checkpoints.list_checkpoints(ckpt.parent)):
        reason = f"no {checkpoints.MARKER}, unlike the other checkpoints of the run"
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

    def order(p: Path) -> tuple[bool, int, str]:
        step = checkpoints.step_of(p)
        return (step is None, step or 0, str(p))

    return sorted(out, key=order)


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


def _output_code(name: str) -> str:
    """soup.dtype -> the safetensors dtype written."""
    if name not in OUTPUT_DTYPES:
        raise UserError(f"soup.dtype={name!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


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
    # Float keys written in float32 whatever soup.dtype (see keep_in_fp32).
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


def plan_keys(
    inputs: list[SoupInput], weights: list[float], allow_partial: bool, out_code: str = "BF16"
) -> KeyPlan:
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
    fp32 = keep_in_fp32(base, non_float, out_code)
    return KeyPlan(sorted(base.meta), sources, non_float, problems, ignored_tied, fp32)


def keep_in_fp32(base: SoupInput, non_float: list[str], out_code: str) -> list[str]:
    """Float keys written in float32 although soup.dtype is narrower (deepseek_v3's router bias).

    save_pretrained writes a model's `_keep_in_fp32_modules` in float32 next to its bf16 weights
    and from_pretrained upcasts them, so the soup keeps them in float32 rather than rounding them
    through bf16. The base's files show which they are: the float keys it stores in >= 4 bytes
    while most of its float bytes are narrower. Only when the files cannot tell (every float key
    in one dtype wider than soup.dtype, e.g. an fp32 base souped to bf16) is the architecture's
    class asked, which imports transformers.
    """
    floats = {k: dtype for k, (dtype, _) in base.meta.items() if k not in non_float}
    if not floats or ITEMSIZE[out_code] >= 4:
        return []
    weight = Counter()
    for k, dtype in floats.items():
        weight[dtype] += math.prod(base.meta[k][1]) * ITEMSIZE[dtype]
    dominant = max(weight, key=lambda d: (weight[d], d))
    if ITEMSIZE[dominant] < 4:
        return sorted(k for k, dtype in floats.items() if ITEMSIZE[dtype] >= 4)
    architectures = (read_json(base.path / "config.json") or {}).get("architectures") or []
    if len(weight) > 1 or ITEMSIZE[dominant] <= ITEMSIZE[out_code] or not architectures:
        return []
    import transformers

    patterns: set[str] = set()
    for arch in architectures:
        cls = getattr(transformers, arch, None)
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            patterns.update(getattr(cls, attr, None) or [])
    return sorted(k for k in floats if any(p in k.split(".") for p in patterns))


def _is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def account_keys(inputs: list[SoupInput], plan: KeyPlan) -> list[dict[str, Any]]:
    """What happened to every key of every input; refuses (RuntimeError) a plan that drops one.

    A merge tool that silently skips tensors it does not know (mergekit 0.1.5 drops every routed
    expert of deepseek_v3) writes a model that loads with random or base weights. Here each stored
    key of each input is in exactly one bucket, and the buckets add up to the input's keys.
    """
    out = []
    for i, inp in enumerate(inputs):
        used = {src: w for key in plan.keys for j, src, w in plan.sources[key] if j == i}
        skipped = {p["key"] for p in plan.skipped if p["input"] == str(inp.path)} & set(inp.meta)
        tied = {p["key"] for p in plan.ignored_tied if p["input"] == str(inp.path)}
        buckets: dict[str, set[str]] = {
            "averaged": {k for k, w in used.items() if w > 0 and k not in plan.non_float},
            "weight_zero": {k for k, w in used.items() if w == 0 and k not in plan.non_float},
            "copied_from_base": set(plan.non_float) if i == 0 else set(),
            "non_float_not_used": set(plan.non_float) & set(inp.meta) if i > 0 else set(),
            "skipped": skipped,
            "ignored_tied": tied,
        }
        seen: set[str] = set()
        for name, keys in buckets.items():
            buckets[name] = keys - seen
            seen |= keys
        lost = sorted(set(inp.meta) - seen)
        if lost or seen - set(inp.meta):
            raise RuntimeError(f"soup: keys of {inp.path} not accounted for: {lost[:5]}")
        row: dict[str, Any] = {"input": str(inp.path), "keys": len(inp.meta)}
        row.update({name: len(keys) for name, keys in buckets.items()})
        row["left_out"] = sorted(buckets["skipped"] | buckets["ignored_tied"] | buckets["non_float_not_used"])
        out.append(row)
    return out


# --------------------------------------------------------------------------- combine


class Workspace:
    """Reused fp32 scratch of one worker: an accumulator, a conversion buffer and rounding bits."""

    def __init__(self, elems: int = 0) -> None:
        self._acc = np.empty(0, np.float32)
        self._tmp = np.empty(0, np.float32)
        self._bits = np.empty(0, np.uint32)
        self.reserve(elems)

    def reserve(self, elems: int) -> None:
        if self._acc.size < elems:
            self._acc = np.empty(elems, np.float32)
            self._tmp = np.empty(elems, np.float32)
            self._bits = np.empty(elems, np.uint32)

    def acc(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._acc[:n]

    def tmp(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._tmp[:n]

    def bits(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._bits[:n]


# A method combines the inputs' chunks of one key (flat fp32 arrays, converted exactly from the
# stored dtype, in input order, each valid until the next is drawn: a method that needs them all
# at once copies them) into an fp32 array (usually ws.acc, where the first chunk may already be:
# that saves a copy). The elements of every input's chunk come in the same order, not necessarily
# the stored one (bf16 is de-interleaved, see to_fp32): a method is elementwise.
Method = Callable[[Iterator[np.ndarray], Sequence[float], Workspace], np.ndarray]


def linear(chunks: Iterator[np.ndarray], weights: Sequence[float], ws: Workspace) -> np.ndarray:
    """sum_i(w_i * x_i) / sum_i(w_i), accumulated in fp32 in input order; holds one chunk at a time."""
    a = None
    for x, w in zip(chunks, weights, strict=True):
        if w != 1.0:
            x = np.multiply(x, np.float32(w), out=ws.tmp(x.size))
        if a is None:
            a = ws.acc(x.size)
            if not np.may_share_memory(a, x):
                np.copyto(a, x)
        else:
            np.add(a, x, out=a)
    if a is None:
        raise ValueError("linear: no chunk to combine")
    total = sum(weights)
    if total != 1.0:
        np.divide(a, np.float32(total), out=a)
    return a


METHODS: dict[str, Method] = {"linear": linear}


def combine(
    method: str, chunks: Iterable[np.ndarray], weights: Sequence[float], ws: Workspace | None = None
) -> np.ndarray:
    """The fp32 combination of one chunk of every input: the one seam between I/O and arithmetic."""
    if method not in METHODS:
        raise UserError(f"soup: method {method!r} is not one of {', '.join(METHODS)}")
    return METHODS[method](iter(chunks), list(weights), ws or Workspace())


def to_fp32(
    raw: bytearray | memoryview, dtype: str, n: int, out: np.ndarray, split: bool = False
) -> np.ndarray:
    """The first n stored elements of `raw` as fp32, exactly (bf16/f16 widen; f64 rounds once).

    bf16 is the top half of an fp32, so widening is bit moves. With `split` (n even) the result is
    de-interleaved, even elements then odd: read as uint32 pairs, a pair's high half masked is the
    odd element and its low half shifted up the even one, two cheap ops and no widening cast.
    An F32 chunk (not split) is a view of `raw`; otherwise the result is `out`. Only float8 needs
    torch (imported then).
    """
    h = n // 2
    if dtype == "BF16" and split:
        pairs = np.frombuffer(raw, np.uint32, count=h)
        bits = out.view(np.uint32)
        np.left_shift(pairs, 16, out=bits[:h])
        np.bitwise_and(pairs, np.uint32(0xFFFF0000), out=bits[h:n])
        return out[:n]
    if dtype == "BF16":
        bits = out.view(np.uint32)[:n]
        np.copyto(bits, np.frombuffer(raw, np.uint16, count=n))
        np.left_shift(bits, 16, out=bits)
        return out[:n]
    if dtype in ("F32", "F16", "F64"):
        x = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype], count=n)
        if not split:
            if dtype == "F32":
                return x
            np.copyto(out[:n], x, casting="same_kind")
            return out[:n]
    else:
        import torch  # float8: numpy has no such dtype

        src = torch.frombuffer(raw, dtype=getattr(torch, FLOAT_DTYPES[dtype]), count=n)
        x = torch.empty(n, dtype=torch.float32).copy_(src).numpy()
        if not split:
            np.copyto(out[:n], x)
            return out[:n]
    np.copyto(out[:h], x[0::2], casting="same_kind")
    np.copyto(out[h:n], x[1::2], casting="same_kind")
    return out[:n]


def _rounded_bits(a: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """fp32 bits + 0x7FFF + (bit 16): their high half is the bf16 rounded to nearest, ties to even."""
    u = a.view(np.uint32)
    np.right_shift(u, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, u, out=bits)
    return bits


def round_to_bf16(a: np.ndarray, out: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even, the same bits as torch's `.to(torch.bfloat16)`.

    Adding 0x7FFF plus the kept part's lowest bit and dropping the low half rounds to nearest,
    ties to even; overflow carries into the exponent (max finite -> inf, as torch does); inf stays
    inf. NaN is 0xFFFF, what torch's CPU conversion writes for every NaN (tests/test_soup.py).
    """
    r = _rounded_bits(a, bits[: a.size])
    np.right_shift(r, 16, out=r)
    np.copyto(out, r, casting="unsafe")
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0xFFFF
    return out


def from_fp32(a: np.ndarray, code: str, out: np.ndarray, bits: np.ndarray, split: bool = False) -> np.ndarray:
    """An fp32 chunk in the output dtype (bytes as safetensors stores them, in stored order), rounded once.

    With `split`, `a` is de-interleaved (see to_fp32) and is interleaved back here. `out` holds
    n elements of a 2-byte dtype (bytes), `bits` is uint32 scratch of n elements.
    """
    n = a.size
    if not split:
        if code == "F32":
            return a
        if code == "BF16":
            return round_to_bf16(a, out[: 2 * n].view(np.uint16), bits)
        return _to_f16(a, out[: 2 * n].view(np.float16))
    h = n // 2
    if code == "BF16":
        r = _rounded_bits(a, bits[:n])
        pairs = out[: 2 * n].view(np.uint32)
        np.right_shift(r[:h], 16, out=pairs)  # even element: the low half of a pair
        np.bitwise_and(r[h:], np.uint32(0xFFFF0000), out=r[h:])
        np.bitwise_or(pairs, r[h:], out=pairs)
        nan = np.isnan(a)
        if nan.any():
            halves = pairs.view(np.uint16)
            halves[0::2][nan[:h]] = 0xFFFF
            halves[1::2][nan[h:]] = 0xFFFF
        return pairs
    if code == "F16":
        return _to_f16(
            np.concatenate([a[:h, None], a[h:, None]], axis=1).ravel(), out[: 2 * n].view(np.float16)
        )
    dst = bits[:n].view(np.float32)  # F32 (router bias): `out` is sized for the narrower dtype
    dst[0::2] = a[:h]
    dst[1::2] = a[h:]
    return dst


def _to_f16(a: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """fp32 -> f16 as torch rounds it: numpy's cast (nearest even, overflow to inf), NaN made quiet
    with the payload's top bits kept, which is what torch writes and numpy does not."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(dst, a, casting="same_kind")
    nan = np.isnan(a)
    if nan.any():
        u = a.view(np.uint32)[nan]
        dst.view(np.uint16)[nan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
    return dst


# --------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    files: list[str]
    output_hashes: dict[str, str]
    # Per input, {file: sha256} of every weight file (and index), in input order.
    input_hashes: list[dict[str, str]]
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


def merge(
    inputs: list[SoupInput], plan: KeyPlan, out_code: str, out_dir: Path, max_shard_size: int
) -> MergeResult:
    """Stream every key, chunk by chunk, through `combine` into the shard writer.

    Chunks are handed out in key order to WORKERS threads; each reads its chunk of every input
    into its own buffer, feeds the inputs' hashes (in file order, see safetensors_stream), combines
    and hands its output to `_OutputQueue` (written in order; a worker that finishes early parks a
    copy and goes on), so reads, hashes, adds and writes of neighbouring chunks overlap on all
    cores. Chunking a key along its flat elements does not change any result (the mean is
    elementwise, each element summed in input order). Returns the files written.
    """
    started = time.perf_counter()
    base = inputs[0]
    entries = [(key, _stored_dtype(key, plan, base, out_code), base.meta[key][1]) for key in plan.keys]
    writer = ShardWriter(out_dir, entries, max_shard_size)
    readers = [Reader(inp.files) for inp in inputs]
    steps = _StepQueue(_steps(inputs, readers, plan))
    outputs = _OutputQueue(writer)
    widest = max((ITEMSIZE[dtype] for inp in inputs for dtype, _ in inp.meta.values()), default=1)
    failures: list[BaseException] = []

    def work() -> None:
        raw = bytearray(CHUNK_ELEMS * widest)
        scratch = bytearray(1 << 20)
        ws = Workspace(CHUNK_ELEMS)
        out = np.empty(CHUNK_ELEMS * ITEMSIZE[out_code], np.uint8)
        try:
            while (step := steps.next()) is not None:
                data = _run_step(step, readers, raw, scratch, ws, out, plan, out_code)
                outputs.put(step.index, step.key, data)
        except BaseException as exc:  # stop the others: they may wait for this one's turns
            failures.append(exc)
            outputs.abort()
            for r in readers:
                r.abort()
            steps.close()

    gc_was_on = gc.isenabled()
    gc.disable()  # the loop makes no garbage cycles; collections were 2% of its CPU (perf)
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


class _OutputQueue:
    """Writes the steps' outputs in step order without making a finished worker wait its turn.

    The worker whose output is next writes it, then every parked output that follows; a worker
    that finishes early parks a copy of its output (its buffers are reused by its next step) and
    goes on. At most MAX_PARKED outputs are parked; past that a worker waits, so memory stays
    bounded whatever the order threads finish in.
    """

    def __init__(self, writer: ShardWriter) -> None:
        self._writer = writer
        self._cond = threading.Condition()
        self._next = 0
        self._parked: dict[int, tuple[str, bytes]] = {}
        self._aborted = False

    def put(self, index: int, key: str, data: memoryview) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: index == self._next or len(self._parked) < MAX_PARKED or self._aborted
            )
            if self._aborted:
                raise RuntimeError("aborted: another thread failed")
            if index != self._next:
                self._parked[index] = (key, bytes(data))
                return
        while True:  # this thread holds the turn: only it writes until the turn moves on
            self._writer.write_bytes(key, data)
            with self._cond:
                self._next += 1
                self._cond.notify_all()
                parked = self._parked.pop(self._next, None)
                if parked is None:
                    return
            key, data = parked[0], memoryview(parked[1])

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


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
    out_code: str,
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

    a = combine(METHOD, chunks(), step.weights, ws)
    code = "F32" if step.key in plan.fp32_keys else out_code
    return memoryview(from_fp32(a, code, out, ws.bits(step.n), split).view(np.uint8))


def _finish_readers(readers: list[Reader]) -> list[dict[str, str]]:
    """Hash what the merge did not read (usually nothing), a few files at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(lambda r: r.finish(bytearray(1 << 22)), readers))


def _stored_dtype(key: str, plan: KeyPlan, base: SoupInput, out_code: str) -> str:
    if key in plan.non_float:
        return base.meta[key][0]
    return "F32" if key in plan.fp32_keys else out_code


# --------------------------------------------------------------------------- outputs


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """Tokenizer, config, generation config and any remote-code files come from the base."""
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(p, out_dir / p.name)
    config = read_json(out_dir / "config.json")
    if config is not None:
        for name in ("dtype", "torch_dtype"):
            if name in config or name == "dtype":
                config[name] = dtype  # the soup's tensors are stored in this dtype
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _evaluate(recipe: Recipe, inputs: list[SoupInput], soup_dir: Path) -> list[dict[str, Any]]:
    from openseek_cpt.evaluation import eval_loss

    s = recipe.soup
    rows = []
    for name, path in [*((inp.label, inp.path) for inp in inputs), ("soup", soup_dir)]:
        log.info(f"evaluating {name} ...")
        result = eval_loss(
            path,
            recipe.soup_eval_dataset_dir,
            max_sequences=s.eval_max_sequences,
            trust_remote_code=recipe.assets.model_trust_remote_code,
        )
        rows.append({"name": name, "path": str(path if name != "soup" else s.output_dir), **result})
    return rows


def _merge_info(
    inputs: list[SoupInput],
    weights: list[float],
    plan: KeyPlan,
    accounting: list[dict[str, Any]],
    s: Any,
    result: MergeResult,
    evaluation: list[dict[str, Any]] | None,
    started: float,
) -> dict[str, Any]:
    n = len(inputs)
    key_counts = {k: sum(1 for _, _, w in plan.sources[k] if w > 0) for k in plan.keys}
    return {
        "method": "weighted_mean" if len(set(weights)) > 1 else "uniform_mean",
        "combine": METHOD,
        "formula": "sum_i(w_i * x_i) / sum_i(w_i), accumulated in float32 in input order, cast once to dtype",
        "inputs": [
            {"role": inp.role, "path": str(inp.path), "step": inp.step, "weight": weights[i], "files": hashes}
            for i, (inp, hashes) in enumerate(zip(inputs, result.input_hashes, strict=True))
        ],
        "weights": weights,
        "dtype": s.dtype,
        "allow_partial": s.allow_partial,
        "output_files": result.files,
        "output_hashes": result.output_hashes,
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
        "accounting": accounting,
        "skipped_keys": plan.skipped,
        "ignored_tied_keys": plan.ignored_tied,
        "non_float_keys": plan.non_float,
        "fp32_keys": plan.fp32_keys,
        "io": {
            "input_bytes": result.input_bytes,
            "bytes_read_again_for_hashes": result.rehashed_bytes,
            "merge_seconds": round(result.seconds, 3),
        },
        "evaluation": evaluation,
        "time": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
        },
    }


def _fmt_weights(weights: list[float]) -> str:
    return "uniform" if len(set(weights)) == 1 else ", ".join(f"{w:g}" for w in weights)
