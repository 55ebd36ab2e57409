"""Stage 0: fetch the base model and tokenizer into `assets.model_dir` with save_pretrained.

Runs where the network is (login node); later stages read only the saved directory, so compute
nodes can run with HF_HUB_OFFLINE=1. The hub endpoint (HF_ENDPOINT, e.g. a mirror), cache
(HF_HOME) and offline mode are read by huggingface_hub from the environment. The tokenizer and
the model have separate `trust_remote_code` switches: OpenSeek's tokenizer needs its remote code
(tiktoken), while the model must load with transformers' native deepseek_v3 classes, whose MoE
can train (the remote modelling code asserts eval mode in its gate).

The recipe's `assets` section is declared here, beside the code that uses it; transformers is
imported inside `run`, so the recipe loads without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.atomic import atomic_output_dir, check_output_dir
from openseek_cpt.artifacts.fileio import load_json
from openseek_cpt.artifacts.provenance import directory_fingerprint, write_provenance
from openseek_cpt.errors import UserError, first_line
from openseek_cpt.logs import get_logger
from openseek_cpt.recipe.schema import RunRecord, setting

STAGE = "download"  # the name its logger, output guard and provenance.json use
log = get_logger(STAGE)


@dataclass
class AssetsConfig:
    base_model: str = setting(
        "BAAI/OpenSeek-Small-v1",
        "Hub id (e.g. BAAI/OpenSeek-Small-v1) or a local directory holding the base model + tokenizer.",
        required=True,
    )
    revision: str | None = setting(
        None, "Hub revision (branch, tag or commit) of base_model; ignored for local dirs."
    )
    model_dir: str = setting(
        "models/OpenSeek_Small_v1",
        "Where `download` saves model + tokenizer (save_pretrained); later stages read from here.",
        required=True,
    )
    tokenizer_trust_remote_code: bool = setting(
        True, "trust_remote_code for the tokenizer (OpenSeek's tiktoken tokenizer ships as remote code)."
    )
    model_trust_remote_code: bool = setting(
        False, "trust_remote_code for the model: off, so transformers' native deepseek_v3 classes train it."
    )


def run(assets: AssetsConfig, record: RunRecord) -> Path:
    """Download (or copy from a local directory) model + tokenizer; returns assets.model_dir."""
    a = assets
    source = a.base_model
    is_local = Path(source).is_dir()
    local = [source] if is_local else []
    check_output_dir(a.model_dir, stage=STAGE, inputs=local, field="assets.model_dir")  # before any fetch
    if is_local:
        check_local_model(Path(source))
    revision = None if is_local else a.revision
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the checks: they fail fast

    where = f"{source}@{revision}" if revision else source
    log.info(
        f"{where} -> {a.model_dir} (endpoint {os.environ.get('HF_ENDPOINT', 'default')}, "
        f"offline={os.environ.get('HF_HUB_OFFLINE', '0')})"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=a.tokenizer_trust_remote_code
        )
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=a.model_trust_remote_code,
            dtype="auto",
            output_loading_info=True,
        )
        model, info = loaded
    except (OSError, ValueError) as exc:  # ValueError: transformers' "unrecognized model", bad JSON
        raise UserError(
            f"assets.base_model={source!r} could not be loaded ({first_line(exc)}); check the id/revision, "
            "HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=0 on a machine with network"
        ) from None
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if bad:
        raise UserError(
            f"assets.base_model={source!r}: weights do not match the {type(model).__name__} layout "
            f"({', '.join(f'{k}: {len(v)} e.g. {v[0]}' for k, v in bad.items())}); "
            "set assets.model_trust_remote_code or use a checkpoint of this architecture"
        )
    log.info(f"strict load of {type(model).__name__}: no missing or unexpected keys")
    inputs = {"base_model": where}
    if is_local:
        inputs["base_model_fingerprint"] = directory_fingerprint(source)
    with atomic_output_dir(a.model_dir, stage=STAGE, inputs=local, field="assets.model_dir") as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        write_provenance(tmp, stage=STAGE, recipe=record, inputs=inputs)
    log.info(f"saved to {a.model_dir}")
    return Path(a.model_dir)


def check_local_model(source: Path) -> None:
    """A local base_model is a saved model: config.json present and every JSON file in it whole
    (a tokenizer.json cut off by an interrupted copy otherwise fails deep inside transformers)."""
    if not (source / "config.json").is_file():
        what = "it holds a prepared dataset" if (source / "dataset_dict.json").is_file() else "not a model"
        raise UserError(
            f"assets.base_model={str(source)!r} is a directory without config.json ({what}); point it at "
            "a model directory saved with save_pretrained, or at a hub id"
        )
    for path in sorted(source.glob("*.json")):
        load_json(path, field="assets.base_model", fix="copy or download the model again")
