"""The tokenizer the data stage encodes with, and the limit the model puts on row length.

Guardrails checked before any work: right padding, pad falls back to eos, eos required (it
separates documents), and `data.max_length` within the model's position embeddings.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.data import STAGE
from openseek_cpt.errors import UserError, first_line
from openseek_cpt.logs import get_logger

log = get_logger(STAGE)


@contextmanager
def remote_code_cache(path: Path) -> Iterator[None]:
    """transformers copies a tokenizer's remote code into HF_MODULES_CACHE, by default under $HOME, where
    a cluster's quota is small: while the stage loads the tokenizer, unless the user set HF_MODULES_CACHE
    or HF_HOME, it goes to `path` (removed after; the loaded module stays imported)."""
    if "HF_MODULES_CACHE" in os.environ or "HF_HOME" in os.environ:
        yield
        return
    os.environ["HF_MODULES_CACHE"] = str(path)
    try:
        yield
    finally:
        del os.environ["HF_MODULES_CACHE"]
        shutil.rmtree(path, ignore_errors=True)


def load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """The tokenizer at `path` (data.tokenizer_dir, resolved) with the guardrails: right padding,
    pad falls back to eos, eos required."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise UserError(
            f"data.tokenizer_dir={path!r} does not exist; run `openseek-cpt download` first or set data.tokenizer_dir"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"data.tokenizer_dir={path!r} has no loadable tokenizer ({first_line(exc)})"
        ) from None
    if tok.eos_token_id is None:
        if tok.pad_token_id is None:
            raise UserError(
                f"data.tokenizer_dir={path!r}: the tokenizer has neither an eos nor a pad token; "
                "documents need an eos separator: add eos_token to its tokenizer_config.json"
            )
        raise UserError(
            f"data.tokenizer_dir={path!r}: the tokenizer has no eos token (pad is {tok.pad_token!r}); "
            "documents need an eos separator: add eos_token to its tokenizer_config.json"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.info(f"tokenizer has no pad token: using eos {tok.eos_token!r} (id {tok.eos_token_id}) as pad")
    tok.padding_side = "right"  # packed rows are right-padded by the collator; never left
    return tok


def check_max_length(max_length: int, model_dir: str) -> None:
    """max_length must fit the model's position embeddings (config.json of `model_dir`, if present)."""
    cfg_path = Path(model_dir, "config.json")
    cfg = read_json(cfg_path)
    if cfg is None:
        return
    limit = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    if limit and max_length > limit:
        raise UserError(
            f"recipe: data.max_length={max_length} exceeds the model's max_position_embeddings="
            f"{limit} ({cfg_path}); set data.max_length <= {limit}"
        )
