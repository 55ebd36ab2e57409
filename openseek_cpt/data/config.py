"""The data stage's section of the recipe (`data:`), with what it checks across its keys.

The choices come from the stage's own tables: packing strategies from `packing.STRATEGIES`, source
kinds from `readers.READERS`. Like them, this module imports nothing heavy when it is imported (the
recipe is loaded by every command, before any stage runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from openseek_cpt.data import packing, readers
from openseek_cpt.errors import UserError
from openseek_cpt.recipe.schema import setting

# `auto` + every kind a recipe may name.
SOURCE_TYPES = ("auto", *(name for name, reader in readers.READERS.items() if reader.selectable))


@dataclass
class SourceConfig:
    path: str = setting(
        "",
        "Hub dataset id, local save_to_disk dir, local json/jsonl/parquet/txt file, or Megatron prefix.",
        required=True,
    )
    ratio: float = setting(
        0.0, "Share of the mix, in packed sequences; all ratios of a recipe sum to 1.0.", above=0
    )
    type: str = setting(
        "auto",
        "How to read `path`; auto: existing dir -> disk, file by extension, PREFIX.bin+.idx -> megatron, else hub.",
        choices=SOURCE_TYPES,
    )
    name: str | None = setting(None, "Hub dataset config name.")
    split: str = setting("train", "Split to read (hub datasets and local files).", required=True)
    data_files: str | list[str] | dict[str, Any] | None = setting(
        None, "Hub data_files pattern(s) (a string, list or mapping, as datasets.load_dataset takes them)."
    )
    revision: str | None = setting(None, "Hub revision of the dataset.")
    text_field: str = setting(
        "text",
        "Column with the raw text (not with `formatting`; unused when the source has `input_ids`).",
        required=True,
    )
    formatting: str | None = setting(
        None, '"module:function" mapping one example (dict) to its text; for sources without a text column.'
    )
    label: str | None = setting(None, "A short name for reports; defaults to the last part of `path`.")
    streaming: bool = setting(
        False,
        "Read a hub dataset or json/jsonl/text files as a stream: only the rows the share needs are "
        "downloaded and converted, in a seeded shuffled order; for sources much larger than their share.",
    )

    # Keys that must not both be given (the second would be silently unused).
    CONFLICTS = (("formatting", "text_field", "formatting makes the text, so text_field would be unused"),)


@dataclass
class DataConfig:
    output_dir: str = setting(
        "datasets/OpenSeek-Pretrain-30B",
        "Where the prepared DatasetDict is written (atomically).",
        required=True,
    )
    tokenizer_dir: str | None = setting(None, "Tokenizer directory; default: assets.model_dir.")
    max_length: int = setting(
        4096, "Tokens per packed sequence (<= the model's max_position_embeddings).", above=0
    )
    packing: str = setting(
        "bfd_split",
        "How documents become rows: "
        + "; ".join(f"{s.name}: {s.doc}" for s in packing.STRATEGIES.values())
        + ".",
        choices=packing.NAMES,
    )
    total_sample_size: int = setting(
        7_500_000, "Number of training sequences after packing and ratio sampling.", above=0
    )
    eval_size: int = setting(
        0, "Number of held-out sequences (same mix) for evaluation; 0 means no eval split.", at_least=0
    )
    num_proc: int = setting(
        4,
        "Cores the data stage encodes on: tiktoken threads, or forked workers for the tokenizer's own "
        "and the Rust paths (GigaToken uses every core; the output does not depend on it).",
        above=0,
    )
    read_margin: float = setting(
        0.2, "Documents read per source beyond the estimate of what its share needs (fraction).", at_least=0
    )
    max_repetition: float = setting(
        4.0,
        "Most times a source short of its share may be repeated (train rows / rows it packs into); "
        "more is an error naming the source: add data or lower its ratio.",
        at_least=1,
    )
    megatron_prefix: str | None = setting(
        None, "Also write a Megatron PREFIX.bin/.idx of the train split at the end of the stage."
    )
    sources: list[SourceConfig] = setting(
        [], "The sources of the mix (each: path, ratio, ...; see data.sources.N.*)."
    )

    def check(self) -> None:
        """What spans keys: each `formatting` is module:function, the ratios sum to 1."""
        for i, src in enumerate(self.sources):
            if src.formatting is not None and not re.fullmatch(r"[\w.]+:\w+", src.formatting):
                raise UserError(
                    f"recipe: data.sources.{i}.formatting={src.formatting!r} is not 'module:function'; "
                    "write e.g. my_package.formats:to_text"
                )
        if self.sources:
            total = sum(s.ratio for s in self.sources)
            if abs(total - 1.0) > 1e-6:
                listing = ", ".join(f"{s.label or s.path}={s.ratio:g}" for s in self.sources)
                raise UserError(
                    f"recipe: data.sources ratios sum to {total:.6g}, not 1.0 ({listing}); fix them"
                )
