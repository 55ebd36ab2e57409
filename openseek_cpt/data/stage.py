"""Stage 1: mix, tokenize, pack and sample the sources into a reproducible training set.

`run(data, record, ...)` reads every source of the `data` section (sources.py), tokenizes only as many
documents as its share of the mix needs (estimated from a sample, plus `read_margin`, topped up if
short), packs them per source with TRL's `pack_dataset` (default `bfd_split`: no token lost) and
samples `total_sample_size` train (+ `eval_size` eval) rows by ratio, randomly with the seed. The
result is a `DatasetDict` with `input_ids` (int32) and `seq_lengths` (the document segments of each
row, which the train stage turns into per-document attention), a `manifest.json` that reports what
was realized, and `provenance.json`. Same recipe -> byte-identical files: every datasets operation
gets an explicit cache file and fingerprint, so nothing random or path-dependent reaches the output.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts import prepared
from openseek_cpt.artifacts.atomic import (
    atomic_output_dir,
    check_output_dir,
    check_output_files,
    check_output_prefix,
)
from openseek_cpt.artifacts.provenance import directory_fingerprint, write_provenance
from openseek_cpt.artifacts.sidecar import sidecar_path, write_sidecar
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path
from openseek_cpt.data import STAGE
from openseek_cpt.data.config import DataConfig
from openseek_cpt.data.encoder import Encoder
from openseek_cpt.data.prepare import prepare_source, short_hash
from openseek_cpt.data.sample import largest_remainder, sample_and_save
from openseek_cpt.data.sources import open_sources
from openseek_cpt.data.tokenizer import check_max_length, load_tokenizer, remote_code_cache
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import RunRecord

log = get_logger(STAGE)


def run(
    data: DataConfig, record: RunRecord, *, tokenizer_dir: str, model_dir: str, trust_remote_code: bool = True
) -> Path:
    """Build the prepared dataset at `data.output_dir`; returns that path.

    From outside its section the stage takes the tokenizer (`tokenizer_dir`, resolved, loaded with
    `trust_remote_code`), the model directory whose config bounds `max_length`, and the run record."""
    started = time.perf_counter()
    d = data
    if not d.sources:
        raise UserError("recipe: data.sources is empty; list at least one source with path and ratio")
    out = Path(d.output_dir)
    read = [tokenizer_dir, *(s.path for s in d.sources)]
    check_outputs(d, out, read)
    sweep_leftovers(out.parent, out.name)  # a killed earlier build's work dir
    with remote_code_cache(temp_path(out, "modules")):
        tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    check_max_length(d.max_length, model_dir)
    sources = open_sources(d.sources)
    ratios = [s.ratio for s in d.sources]
    train_counts = largest_remainder(ratios, d.total_sample_size)
    eval_counts = largest_remainder(ratios, d.eval_size)
    inputs = {
        "tokenizer": tokenizer_dir,
        "tokenizer_fingerprint": directory_fingerprint(tokenizer_dir),
    }
    for s in sources:
        inputs[f"source.{s.label}"] = s.config.path
        inputs[f"source.{s.label}.fingerprint"] = s.fingerprint
    # Deterministic datasets fingerprint of this build: what shapes the rows (not where they are written
    # nor how many processes wrote them).
    ignored = ("output_dir", "megatron_prefix", "sources", "num_proc")
    shaping = {k: v for k, v in d.__dict__.items() if k not in ignored}
    build_id = short_hash([shaping, [s.__dict__ for s in d.sources], record.seed, inputs])

    work = temp_path(out, "work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        encoder = Encoder(tokenizer)
        packed = [
            prepare_source(
                s,
                encoder,
                d,
                record.seed,
                need=train_counts[s.index] + eval_counts[s.index],
                work=work,
                build_id=build_id,
            )
            for s in sources
        ]
        with atomic_output_dir(out, stage=STAGE, inputs=read, field="data.output_dir") as tmp:
            manifest = sample_and_save(packed, train_counts, eval_counts, d, record.seed, tmp, build_id)
            manifest.update(
                tokenizer_dir=tokenizer_dir,
                vocab_size=len(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                padding_side=tokenizer.padding_side,
                # Which encoding ran (tiktoken, rust or tokenizer) and why: see encoder.py.
                tokenizer_path=encoder.path,
                tokenizer_path_note=encoder.path_note,
            )
            (tmp / prepared.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            prov = write_provenance(tmp, stage=STAGE, recipe=record, inputs=inputs)
            if d.megatron_prefix:  # beside the directory, not in it: its provenance is the sidecar's
                from datasets import load_from_disk

                from openseek_cpt.artifacts import megatron_format

                fields = megatron_format.export_dataset(
                    load_from_disk(str(tmp / "train")), d.megatron_prefix, len(tokenizer)
                )
                write_sidecar(
                    d.megatron_prefix,
                    stage=STAGE,
                    dataset_dir=out,
                    split="train",
                    fields=fields,
                    dataset_provenance=prov,
                )
                log.info(f"Megatron copy of train written to {d.megatron_prefix}.bin/.idx")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_summary(manifest)
    log.info(f"saved to {out} in {time.perf_counter() - started:.1f} s")
    return out


def check_outputs(d: DataConfig, out: Path, read: list[str]) -> None:
    """Refuse, before any work, outputs that would replace what the stage did not write or its inputs."""
    check_output_dir(out, stage=STAGE, inputs=read, field="data.output_dir")
    prefix = d.megatron_prefix
    if prefix:
        check_output_prefix(prefix, "data.megatron_prefix")
        megatron_inputs = [*read, *(f"{path}.{ext}" for path in read for ext in ("bin", "idx"))]
        check_output_files(
            [f"{prefix}.bin", f"{prefix}.idx"],
            sidecar=sidecar_path(prefix),
            stage=STAGE,
            inputs=[*megatron_inputs, out],
            field="data.megatron_prefix",
        )


def print_summary(manifest: dict[str, Any]) -> None:
    """One line per source: requested vs realized ratio, documents, tokens, dropped, repeats."""
    for s in manifest["sources"]:
        log.info(
            f"{s['label']}: ratio {s['requested_ratio']:.4f} -> {s['realized_ratio']:.4f} "
            f"({s['train_rows']} train + {s['eval_rows']} eval rows), documents {s['documents']} "
            f"(read {s['documents_read']} of {s['documents_in_source'] or 'a stream'}), tokens {s['tokens_used']}, "
            f"dropped {s['tokens_dropped']}, repeated x{s['times_repeated']:g} ({s['tokens_repeated']} tokens), "
            f"documents with special-token text {s['documents_with_special_text']}, "
            f"empty texts skipped {s['documents_empty']}"
        )
    t = manifest["totals"]
    log.info(
        f"total: {t['train_rows']} train + {t['eval_rows']} eval rows of {manifest['max_length']} tokens "
        f"({manifest['packing']}), tokens {t['tokens_used']}, dropped {t['tokens_dropped']}, "
        f"padding {manifest['padding_fraction']:.2%}"
    )
