"""The recipe: one YAML file describes a whole run (assets, data, train, soup, seed).

Every field is declared once here, with its doc, its choices and its range in the declaration
(`setting(default, doc, ...)`), so `openseek-cpt recipe --keys` and the README's key table are
generated from the same place the values are checked. `load_recipe` parses the YAML, applies
`--set KEY=VALUE` overrides (each value parsed against the type of the key it sets, so
`--set train.args.eval_strategy=no` is the string "no" and `--set assets.revision=1e3` stays
"1e3"), rejects unknown keys (suggesting the nearest valid one) and conflicting keys, and checks
every section, including `train.args` against `transformers.TrainingArguments`, so a typo in any
stage's settings fails at load, for every stage, as one line.
Relative paths stay relative: they resolve against the current directory, as in the original scripts.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from openseek_cpt.artifacts.fileio import canonical_hash
from openseek_cpt.data import packing
from openseek_cpt.errors import UserError, first_line
from openseek_cpt.modeling import attention

PACKING_CHOICES = packing.NAMES
SOURCE_TYPES = ("auto", "hub", "disk", "json", "parquet", "text", "megatron")
PRECISIONS = ("bf16-mixed", "bf16-pure", "fp32")
# Only the transformers attention implementations proven to keep packed documents apart
# (attention.py; others, hub kernels included, are refused at load: fail closed).
ATTN_IMPLEMENTATIONS = attention.NAMES
# transformers' experts implementations + ours (experts.py: grouped_mm in bf16 under autocast).
EXPERTS_IMPLEMENTATIONS = (
    "eager",
    "grouped_mm",
    "batched_mm",
    "deepgemm",
    "deepgemm_megamoe",
    "sonicmoe",
    "grouped_mm_autocast",
)
LOSS_IMPLEMENTATIONS = ("chunked", "liger", "hf")  # loss.IMPLEMENTATIONS (loss.py imports torch)
SOUP_DTYPES = ("bfloat16", "float16", "float32")

# TrainingArguments keys the train stage derives from the recipe -> the recipe key to set instead.
DERIVED_ARGS = {
    "output_dir": "train.output_dir",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "seed": "seed",
    "data_seed": "seed",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "bf16_full_eval": "train.precision",
    "fp16_full_eval": "train.precision",
    "use_cpu": "train.precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "resume_from_checkpoint": "train.output_dir (resume is automatic)",
    "remove_unused_columns": "nothing (the collator needs seq_lengths)",
}
# train.args keys that are the train stage's own, not TrainingArguments fields (in transformers 5).
STAGE_ARGS: dict[str, Any] = {"overwrite_output_dir": bool}
# Ranges TrainingArguments does not check itself: key -> (lowest allowed, exclusive?, also allowed).
ARG_RANGES: dict[str, tuple[float, bool, tuple[Any, ...]]] = {
    "learning_rate": (0, False, ()),
    "max_steps": (0, True, (-1,)),
    "num_train_epochs": (0, True, ()),
    "save_steps": (0, True, ()),
    "eval_steps": (0, True, (None,)),
    "logging_steps": (0, True, ()),
    "save_total_limit": (0, True, (None,)),
    "warmup_steps": (0, False, ()),
    "weight_decay": (0, False, ()),
    "max_grad_norm": (0, False, ()),
    "adam_epsilon": (0, True, ()),
    "dataloader_num_workers": (0, False, ()),
    "eval_accumulation_steps": (0, True, (None,)),
}


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    choices: tuple[str, ...] = (),
    above: float | None = None,
    at_least: float | None = None,
    required: bool = False,
) -> Any:
    """A recipe field: its default, its doc (shown by `recipe --keys`), choices, range, non-empty.

    A class, list or dict default becomes a default_factory (a fresh one per recipe).
    """
    meta = {"doc": doc, "choices": choices, "above": above, "at_least": at_least, "required": required}
    if isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
        choices=PACKING_CHOICES,
    )
    total_sample_size: int = setting(
        7_500_000, "Number of training sequences after packing and ratio sampling.", above=0
    )
    eval_size: int = setting(
        0, "Number of held-out sequences (same mix) for evaluation; 0 means no eval split.", at_least=0
    )
    num_proc: int = setting(4, "Worker processes for tokenization and packing.", above=0)
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
        choices=ATTN_IMPLEMENTATIONS,
    )
    experts_implementation: str | None = setting(
        None,
        "MoE experts implementation (transformers' experts_implementation); null = model default "
        "(grouped_mm; under bf16-mixed grouped_mm_autocast, which runs the experts in bf16).",
        choices=EXPERTS_IMPLEMENTATIONS,
    )
    loss: str = setting(
        "chunked",
        "Causal-LM loss: chunked (no full-vocab logits, any device), liger (fused Triton kernel, GPU, "
        "needs the [gpu] extra), hf (stock: materialises all logits).",
        choices=LOSS_IMPLEMENTATIONS,
    )
    router_bias_update_rate: float = setting(
        1e-3,
        "Aux-loss-free MoE balancing (noaux_tc): per step, router bias += rate * sign(mean load - load); "
        "0 freezes the bias (DeepSeek-V3 default 0.001).",
        at_least=0,
    )
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    allow_missing_keys: bool = setting(
        False, "Accept missing/unexpected keys when loading the base model (otherwise a strict load)."
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
    dtype: str = setting("bfloat16", "Dtype of the written tensors.", choices=SOUP_DTYPES)
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


# ---------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when path is None), apply KEY=VALUE overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe: file {str(path)!r} does not exist; pass --recipe PATH to a YAML file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"recipe: {path} is not valid YAML ({first_line(exc)}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe: {path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value`, the value parsed against the key's declared type (list items by index).

    A string-typed key takes the text as is (no YAML 1.1 surprises: `no` stays "no", `1e3` stays
    "1e3"); numbers and booleans are parsed as such; lists, mappings and untyped keys as YAML.
    """
    if "=" not in item:
        raise UserError(f"--set: {item!r} is not KEY=VALUE; write e.g. --set data.max_length=2048")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    value = parse_value(text, declared_type(parts))
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, parts[: i + 1])]
        elif isinstance(node, dict):
            if node.get(part) is None:  # absent, or an empty YAML section (`soup:`)
                node[part] = {}
            node = node[part]
        else:
            break
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set: {'.'.join(parts[:-1])} is not a section, cannot set {key!r}")


def _index(part: str, node: list, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set: {'.'.join(parts)} needs a list index in 0..{len(node) - 1}, got {part!r}")
    return int(part)


def declared_type(parts: list[str]) -> Any:
    """The annotation of the dotted key `parts` (Any when it is not a declared key)."""
    tp: Any = Recipe
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return Any
            tp = hints[part]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif parts[:i] == ["train", "args"] and i == len(parts) - 1:
            return training_args_types().get(part, Any)
        else:
            return Any
    return tp


def parse_value(text: str, tp: Any) -> Any:
    """`--set` text -> value, read as the declared type `tp` says (see apply_override)."""
    members = _members(tp)
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:  # a quoted YAML string ('no', "1e3"): the string inside, whatever the type
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return text
    if type(None) in members and stripped in ("null", "~", "Null", "NULL"):
        return None
    if str in members and not (stripped.startswith(("[", "{")) and ({list, dict} & set(members))):
        scalar = [m for m in members if m in (bool, int, float)]
        for m in scalar:  # str | int (soup.max_shard_size): a number where it reads as one
            value = _scalar(text, m)
            if value is not None:
                return value
        return text
    if members and all(m in (bool, int, float, type(None)) for m in members):
        for m in members:
            value = _scalar(text, m)
            if value is not None:
                return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _members(tp: Any) -> list[Any]:
    """The plain types a value of annotation `tp` may have (enums count as str; [] for Any)."""
    if tp is Any:
        return []
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    origin = typing.get_origin(tp)
    if origin is not None:
        return [origin]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str]
    return [tp]


def _scalar(text: str, tp: type) -> Any:
    """`text` as a bool/int/float, or None when it does not read as one."""
    s = text.strip()
    if tp is bool:
        return {"true": True, "false": False}.get(s.lower())
    if tp is int:
        return int(s) if re.fullmatch(r"[-+]?\d[\d_]*", s) else None
    if tp is float:  # an integer literal stays an int, as YAML reads it (same recipe hash as in a file)
        if re.fullmatch(r"[-+]?\d[\d_]*", s):
            return int(s)
        try:
            return float(s)
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------- building


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn a mapping into the dataclass `cls`, rejecting unknown keys, wrong types and conflicts."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise UserError(f"recipe: unknown key {dotted!r}{hint} (valid: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    for a, b, why in CONFLICTS.get(cls, ()):
        if raw.get(a) is not None and b in raw:
            raise UserError(f"recipe: {where} sets both {a} and {b}; {why}: remove one of them")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (ints become floats where floats are expected)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `Enum | str`: the string must still name a member
            return _coerce(enums[0], value, where)
        errors = []
        for arg in sorted(args, key=lambda a: a is not str or not isinstance(value, bool)):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise UserError(f"recipe: {where} must be a list, got {value!r}")
        return [_coerce(args[0] if args else Any, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"recipe: {where} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [str(e.value) for e in tp]
        if value not in allowed:
            raise UserError(f"recipe: {where}={value!r} is not one of {', '.join(allowed)}")
        return value
    if tp is float and isinstance(value, str):
        # PyYAML reads 1e-5 (no dot) as a string; YAML 1.2 and the user mean a number.
        number = _scalar(value, float) if re.fullmatch(r"\s*[-+]?[\d.]+[eE][-+]?\d+\s*", value) else None
        if number is not None:
            return number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"recipe: {where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"recipe: {where} must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        quote = "; quote it in YAML (no/yes/on/off/1e3 are read as non-strings)" if value is not None else ""
        raise UserError(f"recipe: {where} must be a string, got {value!r}{quote}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, float)):
        raise UserError(f"recipe: {where} must be a float, got {value!r}")
    return value


# ---------------------------------------------------------------------------------- validation


def validate(recipe: Recipe) -> None:
    """Every section's values: declared choices and ranges, then what spans several keys."""
    for where, f, value in _declared(recipe, ""):
        _check_field(where, f, value)
    d = recipe.data
    for i, src in enumerate(d.sources):
        if src.formatting is not None and not re.fullmatch(r"[\w.]+:\w+", src.formatting):
            raise UserError(
                f"recipe: data.sources.{i}.formatting={src.formatting!r} is not 'module:function'; "
                "write e.g. my_package.formats:to_text"
            )
    if d.sources:
        total = sum(s.ratio for s in d.sources)
        if abs(total - 1.0) > 1e-6:
            listing = ", ".join(f"{s.label or s.path}={s.ratio:g}" for s in d.sources)
            raise UserError(f"recipe: data.sources ratios sum to {total:.6g}, not 1.0 ({listing}); fix them")
    s = recipe.soup
    if s.weights is not None and not all(math.isfinite(w) for w in s.weights):
        raise UserError(f"recipe: soup.weights={s.weights} has a non-finite weight; weights must be finite")
    if s.weights is not None and s.weights and sum(s.weights) <= 0:
        raise UserError(f"recipe: soup.weights={s.weights} sum to 0; give at least one positive weight")
    parse_size(s.max_shard_size)
    check_training_args(recipe.train.args)


def _declared(obj: Any, prefix: str) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every declared field, list items of sections included."""
    for f in dataclasses.fields(obj):
        where = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        yield where, f, value
        if dataclasses.is_dataclass(value):
            yield from _declared(value, where + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _declared(item, f"{where}.{i}.")


def _check_field(where: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if meta.get("required") and not (isinstance(value, str) and value.strip()):
        raise UserError(f"recipe: {where} is empty; give a value ({meta['doc']})")
    choices = meta.get("choices") or ()
    if choices and value is not None and value not in choices:
        if where == "train.attn_implementation":
            attention.check(value, where)  # one line: why it is refused and what to use
        raise UserError(f"recipe: {where}={value!r} is not one of {', '.join(choices)}")
    numbers = value if isinstance(value, list) else [value]
    for number in (n for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)):
        if meta.get("above") is not None and not number > meta["above"]:
            raise UserError(f"recipe: {where}={value} must be > {meta['above']:g}")
        if meta.get("at_least") is not None and not number >= meta["at_least"]:
            raise UserError(f"recipe: {where}={value} must be >= {meta['at_least']:g}")


def parse_size(value: str | int) -> int:
    """`2GB`, `500MB`, `1GiB` or a number of bytes -> bytes (GB = 10**9, GiB = 2**30, as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise UserError(
                f"soup.max_shard_size={value!r} is not a size; write e.g. 2GB, 500MB or a byte count"
            )
        unit = m.group(2).upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        size = int(float(m.group(1)) * base ** ("KMGT".index(unit[0]) + 1 if unit else 0))
    if size <= 0:
        raise UserError(f"soup.max_shard_size={value!r} must be > 0")
    return size


# ---------------------------------------------------------------------------------- train.args


def training_args_types() -> dict[str, Any]:
    """TrainingArguments field -> annotation, plus the stage's own keys (imports transformers)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}
    return {**fields, **STAGE_ARGS}


def check_training_args(args: dict[str, Any]) -> None:
    """train.args: known TrainingArguments fields, not derived ones, typed, in range, accepted by it.

    Runs at load for every stage; transformers is imported only when train.args is non-empty.
    """
    if not args:
        return
    from transformers import TrainingArguments

    known = training_args_types()
    for key, value in list(args.items()):
        where = f"train.args.{key}"
        if key in DERIVED_ARGS:
            raise UserError(
                f"{where} is set by the train stage; remove it and set {DERIVED_ARGS[key]} instead"
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean train.args.{close[0]}?" if close else ""
            raise UserError(f"{where} is not a transformers.TrainingArguments field{hint}")
        number = _coerce(known[key], value, where)
        if isinstance(value, str) and not isinstance(number, str):
            args[key] = number  # PyYAML's 1e-5 string; other values stay as written (the recipe hash)
        if key in ARG_RANGES and number not in ARG_RANGES[key][2]:
            low, exclusive, allowed = ARG_RANGES[key]
            if not (number > low if exclusive else number >= low):
                bound = f"> {low}" if exclusive else f">= {low}"
                also = f" (or {' or '.join(repr(v) for v in allowed)})" if allowed else ""
                raise UserError(f"recipe: {where}={value!r} must be {bound}{also}")
    user = {k: v for k, v in args.items() if k not in STAGE_ARGS}
    saved = dict(os.environ)  # TrainingArguments writes ACCELERATE_* variables; keep this process clean
    try:
        TrainingArguments(output_dir="recipe-check", use_cpu=True, **user)
    except (ValueError, TypeError) as exc:
        raise UserError(f"recipe: train.args: {first_line(exc)}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------- key listing


@dataclass(frozen=True)
class Key:
    """One dotted recipe key as `recipe --keys` lists it."""

    key: str
    type: str
    value: Any
    doc: str


def keys(recipe: Recipe | None = None) -> list[Key]:
    """Every declared key with its type and doc; values are `recipe`'s (its sources expanded) or defaults."""
    out: list[Key] = []
    _keys(Recipe, recipe, "", out)
    return out


def _keys(cls: type, obj: Any, prefix: str, out: list[Key]) -> None:
    """Append the keys of section `cls` (values from `obj`, or defaults and `N` for list items when None)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, where = hints[f.name], f"{prefix}{f.name}"
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        value = getattr(obj, f.name) if obj is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            _keys(tp, value if obj is not None else None, where + ".", out)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            shown = f"{len(value)} items" if value else []
            out.append(Key(where, f"list[{item.__name__}]", shown, doc))
            if obj is None:
                _keys(item, None, f"{where}.N.", out)
            for i, one in enumerate(value):
                _keys(item, one, f"{where}.{i}.", out)
            continue
        shown = f"{len(value)} keys" if where == "train.args" and value else value
        out.append(Key(where, _type_name(tp), shown, doc))
        if where == "train.args" and value:
            types_, docs = training_args_types(), training_args_docs()
            for k in sorted(value):
                out.append(Key(f"{where}.{k}", _type_name(types_.get(k, Any)), value[k], docs.get(k, "")))


def training_args_docs() -> dict[str, str]:
    """TrainingArguments field -> its help text (transformers' own doc of the field)."""
    from transformers import TrainingArguments

    docs = {
        f.name: " ".join(str(f.metadata.get("help", "")).split())
        for f in dataclasses.fields(TrainingArguments)
    }
    docs["overwrite_output_dir"] = "The train stage's own: delete the checkpoints in train.output_dir first."
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return tp.__name__


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def keys_text(recipe: Recipe | None = None) -> str:
    """`recipe --keys`: one line per key: KEY  TYPE  DEFAULT (or the recipe's VALUE)  DOC."""
    rows = [(k.key, k.type, _show(k.value), k.doc) for k in keys(recipe)]
    head = ("KEY", "TYPE", "VALUE" if recipe is not None else "DEFAULT", "DOC")
    widths = [min(max(len(r[i]) for r in [head, *rows]), 40) for i in range(3)]  # longer ones overflow
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in [head, *rows]
    )


def keys_markdown() -> str:
    """The README's key table (generated: tests check README.md holds exactly this)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in keys():
        cells = [f"`{k.key}`", f"`{k.type}`", f"`{_show(k.value)}`", k.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
