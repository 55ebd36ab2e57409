"""Stage 3: the soup, a parameter-wise combination (by default the weighted mean) of the base and its checkpoints.

No checkpoint counts twice, no whole model is held in RAM, and a layout mismatch is an error, never
a silent fall back to base weights. A run goes:
- inputs.py: checkpoint globs expanded and sorted by step, every model directory's safetensors
  headers read and checked (a path given twice, an unfinished checkpoint: errors), and after the
  merge every checkpoint's weight files checked against its marker's content hashes;
- plan.py: what happens to every key of every input, decided (and accounted for) before any read;
- pipeline.py: the tensors streamed chunk by chunk through the method and written into the shards,
  each input byte read once (its hash from the same reads), memory flat whatever the model count;
- methods.py: `soup.method`, one function per method (`linear` today); numerics.py: the exact
  conversions to fp32 and back;
- outputs.py: the base's side files, the evaluation, merge_info.json; all written atomically
  with provenance.

With `linear` the mean of a key is sum_i(w_i * x_i) / sum_i(w_i), summed in fp32 in input order
([base, *checkpoints]); with the default uniform weights every w_i is 1, so the result is exactly
the fp32 sum divided by n, rounded once to the output dtype (round to nearest even, bit for bit
what torch's conversion gives). The merge path is numpy: it imports neither torch nor transformers
(only `evaluate`, float8 inputs, and an fp32 base souped to a narrower dtype, need them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.provenance import write_provenance
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import RunRecord
from openseek_cpt.soup import STAGE, outputs
from openseek_cpt.soup.config import OUTPUT_DTYPES, SoupConfig, parse_size
from openseek_cpt.soup.inputs import (
    check_content,
    check_distinct,
    damaged_input_message,
    expand_checkpoints,
    non_finite_message,
    open_input,
    weights_for,
)
from openseek_cpt.soup.pipeline import NonFiniteKey, merge
from openseek_cpt.soup.plan import MERGE_INFO, account_keys, plan_keys

log = get_logger(STAGE)


def run(
    soup: SoupConfig,
    record: RunRecord,
    *,
    base_dir: str,
    eval_dataset_dir: str,
    trust_remote_code: bool = False,
) -> Path:
    """Combine [base, *checkpoints] into soup.output_dir; returns that directory.

    From outside its section the soup takes the base and eval dataset directories (resolved), how
    to load a model for the evaluation (`trust_remote_code`), and the run record."""
    s = soup
    started = time.time()
    out_code = OUTPUT_DTYPES[s.dtype]
    max_shard_size = parse_size(s.max_shard_size)
    base = open_input(base_dir, role="base", field_name="soup.base_dir")
    ckpts = [open_input(p, role="checkpoint") for p in expand_checkpoints(s.checkpoints)]
    inputs = [base, *ckpts]
    check_distinct(inputs)
    weights = weights_for(s.weights, len(inputs))
    plan = plan_keys(inputs, weights, allow_partial=s.allow_partial, out_code=out_code)
    accounting = account_keys(inputs, plan)
    eval_dir = eval_dataset_dir
    if s.evaluate and not Path(eval_dir).is_dir():
        raise UserError(
            f"soup.eval_dataset_dir={eval_dir!r} does not exist; run `openseek-cpt data` first, "
            "set soup.eval_dataset_dir, or set soup.evaluate=false"
        )
    log.info(
        f"{base.path} + {len(ckpts)} checkpoint(s) -> {s.output_dir} "
        f"({s.method}, {s.dtype}, weights {_fmt_weights(weights)})"
    )
    for line in plan.warnings():
        log.warning(line)

    read = [inp.path for inp in inputs] + ([eval_dir] if s.evaluate else [])
    with atomic_output_dir(s.output_dir, stage=STAGE, inputs=read, field="soup.output_dir") as tmp:
        try:
            result = merge(inputs, plan, s.method, out_code, tmp, max_shard_size, s.allow_non_finite)
        except NonFiniteKey as exc:  # a damaged input explains it better than its NaN does
            raise UserError(damaged_input_message(inputs) or non_finite_message(inputs, exc.key)) from None
        check_content(inputs, result.input_content_hashes)
        outputs.copy_side_files(base.path, tmp, s.dtype)
        evaluation = outputs.evaluate(s, eval_dir, trust_remote_code, inputs, tmp) if s.evaluate else None
        info = outputs.merge_info(inputs, weights, plan, accounting, s, result, evaluation, started)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        write_provenance(
            tmp,
            stage=STAGE,
            recipe=record,
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


def _fmt_weights(weights: list[float]) -> str:
    return "uniform" if len(set(weights)) == 1 else ", ".join(f"{w:g}" for w in weights)
