"""What the soup writes beside its shards: the base's side files, the evaluation, merge_info.json.

merge_info records the inputs (step, weight, sha256 of each file), method, dtype, per-key counts,
the accounting of every key of every input and, with `evaluate`, the eval loss of base,
checkpoints and soup.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts import checkpoints
from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.logs import get_logger
from openseek_cpt.soup import STAGE, methods
from openseek_cpt.soup.config import SoupConfig
from openseek_cpt.soup.inputs import SoupInput
from openseek_cpt.soup.pipeline import MergeResult
from openseek_cpt.soup.plan import MERGE_INFO, KeyPlan

log = get_logger(STAGE)

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


def copy_side_files(base_dir: Path, out_dir: Path, dtype: str) -> None:
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


def evaluate(
    s: SoupConfig, eval_dataset_dir: str, trust_remote_code: bool, inputs: list[SoupInput], soup_dir: Path
) -> list[dict[str, Any]]:
    """Eval loss of every input and of the soup on the prepared eval split (imports torch)."""
    from openseek_cpt.evaluation import eval_loss

    rows = []
    for name, path in [*((inp.label, inp.path) for inp in inputs), ("soup", soup_dir)]:
        log.info(f"evaluating {name} ...")
        result = eval_loss(
            path,
            eval_dataset_dir,
            max_sequences=s.eval_max_sequences,
            trust_remote_code=trust_remote_code,
        )
        rows.append({"name": name, "path": str(path if name != "soup" else s.output_dir), **result})
    return rows


def merge_info(
    inputs: list[SoupInput],
    weights: list[float],
    plan: KeyPlan,
    accounting: list[dict[str, Any]],
    s: SoupConfig,
    result: MergeResult,
    evaluation: list[dict[str, Any]] | None,
    started: float,
) -> dict[str, Any]:
    n = len(inputs)
    key_counts = {k: sum(1 for _, _, w in plan.sources[k] if w > 0) for k in plan.keys}
    return {
        "method": s.method,
        "formula": f"{methods.summary(s.method)}, cast once to dtype",
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
