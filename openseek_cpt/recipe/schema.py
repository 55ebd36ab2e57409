"""The recipe's schema: one YAML file describes a whole run (assets, data, train, soup, seed).

Every field is declared once here, with its doc, its choices and its range in the declaration
(`setting(default, doc, ...)`), so `openseek-cpt recipe --keys` (keys.py) and the key table are
generated from the same place the values are checked (checks.py). A choice list or default that
a stage or model module implements is read from that module's table, never copied here.
Relative paths stay relative: they resolve against the current directory, as in the original scripts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from openseek_cpt.artifacts.fileio import canonical_hash
from openseek_cpt.data import packing, readers
from openseek_cpt.modeling import attention, experts, loss_names, router_defaults
from openseek_cpt.soup import methods as soup_methods
from openseek_cpt.soup.dtypes import OUTPUT_DTYPES

# `auto` + every kind a recipe may name, read from the data stage's table (a leaf at load).
SOURCE_TYPES = ("auto", *(name for name, reader in readers.READERS.items() if reader.selectable))
PRECISIONS = ("bf16-mixed", "bf16-pure", "fp32")


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: Collection[str] = (),
    above: float | None = None,
    at_least: float | None = None,
    required: bool = False,
    explain: Callable[[str, str], Any] | None = None,
    item_types: Callable[[], dict[str, Any]] | None = None,
    item_docs: Callable[[], dict[str, str]] | None = None,
) -> Any:
    """A recipe field: its default, its doc (shown by `recipe --keys`), choices, range, non-empty.

    `choices` may be the owner's live table (a dict: its keys). `explain(value, key)` raises the
    one-line reason a value outside `choices` is refused. A mapping whose keys belong to another
    schema declares `item_types()` and `item_docs()` (key -> annotation, key -> doc): `--set`
    parses its items by type and `recipe --keys` lists them.
    A class, list or dict default becomes a default_factory (a fresh one per recipe).
    """
    meta = {
        "doc": doc,
        "choices": choices,
        "above": above,
        "at_least": at_least,
        "required": required,
        "explain": explain,
        "item_types": item_types,
        "item_docs": item_docs,
    }
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------- train.args

# train.args keys that are the train stage's own, not TrainingArguments fields (in transformers 5).
STAGE_ARGS: dict[str, Any] = {"overwrite_output_dir": bool}


def training_args_types() -> dict[str, Any]:
    """TrainingArguments field -> annotation, plus the stage's own keys (imports transformers)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}
    return {**fields, **STAGE_ARGS}


def training_args_docs() -> dict[str, str]:
    """TrainingArguments field -> its help text (transformers' own doc of the field)."""
    from transformers import TrainingArguments

    docs = {
        f.name: " ".join(str(f.metadata.get("help", "")).split())
        for f in dataclasses.fields(TrainingArguments)
    }
    docs["overwrite_output_dir"] = "The train stage's own: delete the checkpoints in train.output_dir first."
    return docs


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


# Keys of one mapping that must not both be given (the second would be silently unused).
CONFLICTS: dict[type, tuple[tuple[str, str, str], ...]] = {
    SourceConfig: (("formatting", "text_field", "formatting makes the text, so text_field would be unused"),),
}


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


@dataclass
class TrainConfig:
    output_dir: str = setting(
        "runs/OpenSeek-1.4B-A0.4B",
        "Where checkpoints, TensorBoard logs and the final model go.",
        required=True,
    )
    dataset_dir: str | None = setting(
        None, "Prepared dataset (output of the data stage); default: data.output_dir."
    )
    model_dir: str | None = setting(None, "Base model directory; default: assets.model_dir.")
    global_batch_size: int = setting(
        1024,
        "Sequences per optimizer step over all processes; gradient accumulation is derived from it.",
        above=0,
    )
    per_device_batch_size: int = setting(1, "Sequences per forward pass per process.", above=0)
    precision: str = setting(
        "bf16-mixed",
        "bf16-mixed: fp32 master weights + bf16 autocast; bf16-pure: bf16 weights (loses small updates); fp32.",
        choices=PRECISIONS,
    )
    attn_implementation: str = setting(
        "sdpa",
        "Attention implementation; only ones that keep packed documents apart. GPUs: flash_attention_2 "
        "(varlen, needs flash-attn) or flex_attention (block mask); sdpa/eager build a dense mask.",
        choices=attention.NAMES,
        explain=attention.check,
    )
    experts_implementation: str | None = setting(
        None,
        "MoE experts implementation (transformers' experts_implementation); null = grouped_mm_autocast "
        "under bf16-mixed (the experts' GEMMs in bf16), else transformers' default. grouped_mm named "
        "explicitly is transformers' stock path (fp32 GEMMs under bf16-mixed).",
        choices=experts.IMPLEMENTATIONS,
    )
    loss: str = setting(
        "chunked",
        "Causal-LM loss: chunked (no full-vocab logits, any device), liger (fused Triton kernel, GPU, "
        "needs the [gpu] extra), hf (stock: materialises all logits).",
        choices=loss_names.IMPLEMENTATIONS,
    )
    router_bias_update_rate: float = setting(
        router_defaults.DEFAULT_RATE,
        "Aux-loss-free MoE balancing (noaux_tc): per step, router bias += rate * sign(mean load - load); "
        "0 freezes the bias (DeepSeek-V3 default 0.001).",
        at_least=0,
    )
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    allow_missing_keys: bool = setting(
        False, "Accept missing/unexpected keys when loading the base model (otherwise a strict load)."
    )
    max_nonfinite_steps: int = setting(
        0,
        "Consecutive optimizer steps with a NaN/inf loss or grad norm to skip (their update dropped); one "
        "more stops the run (exit 2) naming the step and the last complete checkpoint. 0: stop at the first.",
        at_least=0,
    )
    force_resume: bool = setting(
        False, "Resume even if the checkpoint was made with another dataset fingerprint."
    )
    accelerate_config: str = setting(
        "recipes/accelerate_configs/ddp.yaml",
        "Accelerate config file for `accelerate launch`.",
        required=True,
    )
    args: dict[str, Any] = setting(
        {},
        "Passed to transformers.TrainingArguments (learning_rate, max_steps, save_steps, ...), checked against "
        "it at load; overwrite_output_dir: true deletes the checkpoints in output_dir and starts from the base.",
        item_types=training_args_types,
        item_docs=training_args_docs,
    )


@dataclass
class SoupConfig:
    base_dir: str | None = setting(None, "Base model directory; default: assets.model_dir.")
    checkpoints: list[str] = setting(
        [], "Checkpoint directories: a list of paths and/or globs (sorted by step)."
    )
    weights: list[float] | None = setting(
        None, "Weights of [base, *checkpoints]; null = uniform average.", at_least=0
    )
    output_dir: str = setting("models/OpenSeek_Small_v1-soup", "Output directory of the soup.", required=True)
    method: str = setting(
        "linear",
        "How the inputs are combined, key by key: "
        + "; ".join(f"{name}: {soup_methods.summary(name)}" for name in soup_methods.METHODS)
        + ".",
        choices=soup_methods.METHODS,
    )
    dtype: str = setting("bfloat16", "Dtype of the written tensors.", choices=OUTPUT_DTYPES)
    allow_non_finite: bool = setting(
        False,
        "Average inputs that hold NaN/inf (the soup is then non-finite there); default: refuse, "
        "naming the input and the key.",
    )
    allow_partial: bool = setting(
        False, "Merge only keys present (with the same shape) everywhere, and record the rest."
    )
    max_shard_size: str | int = setting(
        "2GB", 'Maximum shard size of the output (bytes or a string like "2GB").'
    )
    evaluate: bool = setting(False, "Evaluate base, checkpoints and soup on the prepared eval split.")
    eval_dataset_dir: str | None = setting(None, "Prepared dataset for evaluation; default: data.output_dir.")
    eval_max_sequences: int = setting(
        0, "Sequences of the eval split used for evaluation (0 = all).", at_least=0
    )


@dataclass
class Recipe:
    seed: int = setting(
        233, "Seed of everything random: sampling, shuffling, initialisation, data order.", at_least=0
    )
    assets: AssetsConfig = setting(AssetsConfig, "Base model + tokenizer (`openseek-cpt download`).")
    data: DataConfig = setting(
        DataConfig, "The mix, tokenization, packing and sampling (`openseek-cpt data`)."
    )
    train: TrainConfig = setting(TrainConfig, "Continued pretraining (`openseek-cpt launch` / `train`).")
    soup: SoupConfig = setting(SoupConfig, "Weight averaging of base + checkpoints (`openseek-cpt soup`).")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what is hashed and recorded in provenance)."""
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 of the canonical JSON of the recipe: identifies the run's settings."""
        return canonical_hash(self.to_dict())

    # Defaults that point at another section, resolved in one place.
    @property
    def tokenizer_dir(self) -> str:
        return self.data.tokenizer_dir or self.assets.model_dir

    @property
    def train_dataset_dir(self) -> str:
        return self.train.dataset_dir or self.data.output_dir

    @property
    def train_model_dir(self) -> str:
        return self.train.model_dir or self.assets.model_dir

    @property
    def soup_base_dir(self) -> str:
        return self.soup.base_dir or self.assets.model_dir

    @property
    def soup_eval_dataset_dir(self) -> str:
        return self.soup.eval_dataset_dir or self.data.output_dir
