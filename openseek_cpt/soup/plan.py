"""The key plan: what happens to each key of the base and of every input, decided before any read.

Every key of the base must be in every input with the same shape, else the run stops and lists
the offenders; `allow_partial` averages each key over the inputs that match and records the rest.
Float tensors, buffers included, are averaged (deepseek_v3's router `e_score_correction_bias`
stays float32, see `keep_in_fp32`); non-float tensors (counters, masks) are copied from the base;
tied embeddings (no `lm_head.weight` on disk) are handled. `account_keys` puts every key of every
input in one bucket, so a plan that would leave one out fails instead of writing the soup.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.artifacts.safetensors_stream import ITEMSIZE
from openseek_cpt.errors import UserError
from openseek_cpt.soup.inputs import SoupInput
from openseek_cpt.soup.numerics import FLOAT_DTYPES

MERGE_INFO = "merge_info.json"
# Keys that a model with tied embeddings does not store: they are read from their source.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}


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
    weight: Counter[str] = Counter()
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
