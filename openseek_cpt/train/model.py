"""The model as training runs it: loaded strictly with native classes, the training dtype, no KV
cache, and the stage's levers installed (attention, experts kernel, loss); the vocabulary check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.modeling import attention, experts, router_precision
from openseek_cpt.modeling import loss as lm_loss
from openseek_cpt.train import STAGE
from openseek_cpt.train.config import TrainConfig
from openseek_cpt.train.setup import process_rank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = get_logger(STAGE)


def load_model(t: TrainConfig, model_dir: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """The base (or a checkpoint) in `model_dir` with native classes, strictly, in the training
    dtype, no KV cache."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir, "config.json").is_file():
        raise UserError(
            f"train.model_dir: {model_dir!r} has no config.json; run `openseek-cpt download` or fix the path"
        )
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "attn_implementation": t.attn_implementation,
        "dtype": torch.bfloat16 if t.precision == "bf16-pure" else torch.float32,
        "output_loading_info": True,
    }
    # Deviation: under bf16-mixed the routed experts' grouped_mm gets bf16 operands (experts.py).
    experts_implementation = experts.resolve(t.experts_implementation, t.precision)
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    attention.prepare(t.attn_implementation)  # flex: q/k/v in one dtype under autocast
    loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)  # (model, loading info)
    model, info = loaded
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        summary = "; ".join(f"{k}: {len(v)} (e.g. {v[0]})" for k, v in problems.items())
        if not t.allow_missing_keys:
            raise UserError(
                f"train.model_dir: {model_dir} does not match the model class ({summary}); "
                "fix the checkpoint or set train.allow_missing_keys=true"
            )
        if process_rank() == 0:
            log.warning(f"loaded {model_dir} with {summary} (train.allow_missing_keys)")
    else:  # an info line: logs prints it once per job (rank 0)
        log.info(f"loaded {model_dir} strictly: no missing, unexpected or mismatched keys")
    # Deviation from the checkpoint config: with use_cache=True a cache is built even in training,
    # and transformers then ignores the per-document position resets (documents see each other).
    model.config.use_cache = False
    # Deviation: the MoE routers compute in fp32 under autocast too (router_precision.py).
    router_precision.keep_routers_fp32(model)
    # Deviation: the loss from hidden states and the LM head in chunks, no full-vocab logits (loss.py).
    return lm_loss.install(model, t.loss)


def check_vocab(
    model_dir: str, trust_remote_code: bool, model, manifest: dict[str, Any], dataset_dir: Path
) -> None:
    """The dataset's tokenizer must be the model's (same vocabulary size and eos)."""
    data_vocab = manifest.get("vocab_size")
    model_vocab = model.config.vocab_size
    if data_vocab is None:
        if process_rank() == 0:
            log.warning(
                f"{dataset_dir}/manifest.json records no tokenizer vocab size; vocabulary not checked"
            )
        return
    expected = model_vocab
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        expected = len(tokenizer)
    except (OSError, ValueError):
        pass  # no tokenizer beside the model: only the embedding size can be checked
    if int(data_vocab) != expected or int(data_vocab) > model_vocab:
        raise UserError(
            f"train.dataset_dir: {dataset_dir} was tokenized with a vocabulary of {data_vocab} tokens but the "
            f"model {model_dir} uses {expected} (embeddings {model_vocab}); rebuild the dataset "
            "with the model's tokenizer (data.tokenizer_dir)"
        )
