"""The recipe: one YAML file describes a whole run (assets, data, train, soup, seed).

Every field is declared once here, with its meaning in the comment above it. `load_recipe`
parses the YAML, applies `--set KEY=VALUE` overrides, rejects unknown keys (suggesting the
nearest valid one) and checks values, so the stages receive a typed, validated `Recipe`.
Relative paths stay relative: they resolve against the current directory, as in the
original scripts. `train.args` is passed through to `transformers.TrainingArguments` and
is validated by the train stage against that class, not re-declared here.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openseek_cpt import packing
from openseek_cpt.errors import UserError

PACKING_CHOICES = packing.NAMES
SOURCE_TYPES = ("auto", "hub", "disk", "json", "parquet", "text", "megatron")
PRECISIONS = ("bf16-mixed", "bf16-pure", "fp32")


@dataclass
class AssetsConfig:
    # Hub id (e.g. BAAI/OpenSeek-Small-v1) or a local directory holding the base model + tokenizer.
    base_model: str = "BAAI/OpenSeek-Small-v1"
    # Hub revision (branch, tag or commit) of base_model; ignored for local directories.
    revision: str | None = None
    # Where `download` saves model + tokenizer (save_pretrained); later stages read from here.
    model_dir: str = "models/OpenSeek_Small_v1"
    # trust_remote_code for the tokenizer (OpenSeek's tiktoken tokenizer ships as remote code).
    tokenizer_trust_remote_code: bool = True
    # trust_remote_code for the model: off, so transformers' native deepseek_v3 classes train it.
    model_trust_remote_code: bool = False


@dataclass
class SourceConfig:
    # Hub dataset id, local save_to_disk dir, local json/jsonl/parquet/txt file, or Megatron prefix.
    path: str = ""
    # Share of the mix, in packed sequences; all ratios of a recipe sum to 1.0.
    ratio: float = 0.0
    # How to read `path`; auto: existing dir -> disk, file by extension, PREFIX.bin+.idx -> megatron, else hub.
    type: str = "auto"
    # Hub dataset config name.
    name: str | None = None
    # Split to read (hub datasets and local files).
    split: str = "train"
    # Hub data_files pattern(s) (a string, list or dict as datasets.load_dataset takes them).
    data_files: Any = None
    # Hub revision of the dataset.
    revision: str | None = None
    # Column with the raw text (ignored if `formatting` is given or the source has `input_ids`).
    text_field: str = "text"
    # "module:function" mapping one example (dict) to its text; for sources without a text column.
    formatting: str | None = None
    # A short name for reports; defaults to the last part of `path`.
    label: str | None = None


@dataclass
class DataConfig:
    # Where the prepared DatasetDict is written (atomically).
    output_dir: str = "datasets/OpenSeek-Pretrain-30B"
    # Tokenizer directory; default: assets.model_dir.
    tokenizer_dir: str | None = None
    # Tokens per packed sequence (<= the model's max_position_embeddings).
    max_length: int = 4096
    # bfd_split (no token lost), bfd (truncates long documents), wrapped (crosses documents), truncate (no packing).
    packing: str = "bfd_split"
    # Number of training sequences after packing and ratio sampling.
    total_sample_size: int = 7_500_000
    # Number of held-out sequences (same mix) for evaluation; 0 means no eval split.
    eval_size: int = 0
    # Worker processes for tokenization and packing.
    num_proc: int = 4
    # Documents read per source beyond the estimate of what its share needs (fraction).
    read_margin: float = 0.2
    # Also write a Megatron PREFIX.bin/.idx of the train split at the end of the stage.
    megatron_prefix: str | None = None
    # The sources of the mix.
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    # Where checkpoints, TensorBoard logs and the final model go.
    output_dir: str = "runs/OpenSeek-1.4B-A0.4B"
    # Prepared dataset (output of the data stage); default: data.output_dir.
    dataset_dir: str | None = None
    # Base model directory; default: assets.model_dir.
    model_dir: str | None = None
    # Sequences per optimizer step over all processes; gradient accumulation is derived from it.
    global_batch_size: int = 1024
    # Sequences per forward pass per process.
    per_device_batch_size: int = 1
    # bf16-mixed: fp32 master weights + bf16 autocast; bf16-pure: bf16 weights (loses small updates); fp32.
    precision: str = "bf16-mixed"
    # Attention implementation (sdpa, flash_attention_2, flex_attention, eager).
    attn_implementation: str = "sdpa"
    # MoE experts implementation (transformers' experts_implementation); null = model default.
    experts_implementation: str | None = None
    # Recompute activations in backward to save memory.
    gradient_checkpointing: bool = False
    # Accept missing/unexpected keys when loading the base model (otherwise a strict load).
    allow_missing_keys: bool = False
    # Resume even if the checkpoint was made with another dataset fingerprint.
    force_resume: bool = False
    # Accelerate config file for `accelerate launch`.
    accelerate_config: str = "recipes/accelerate_configs/ddp.yaml"
    # Passed straight to transformers.TrainingArguments (learning_rate, max_steps, save_steps, ...).
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SoupConfig:
    # Base model directory; default: assets.model_dir.
    base_dir: str | None = None
    # Checkpoint directories: a list of paths and/or globs (sorted by step).
    checkpoints: list[str] = field(default_factory=list)
    # Weights of [base, *checkpoints]; null = uniform average.
    weights: list[float] | None = None
    # Output directory of the soup.
    output_dir: str = "models/OpenSeek_Small_v1-soup"
    # Dtype of the written tensors.
    dtype: str = "bfloat16"
    # Merge only keys present (with the same shape) everywhere, and record the rest.
    allow_partial: bool = False
    # Maximum shard size of the output (bytes or a string like "2GB").
    max_shard_size: str | int = "2GB"
    # Evaluate base, checkpoints and soup on the prepared eval split.
    evaluate: bool = False
    # Prepared dataset for evaluation; default: data.output_dir.
    eval_dataset_dir: str | None = None
    # Sequences of the eval split used for evaluation (0 = all).
    eval_max_sequences: int = 0


@dataclass
class Recipe:
    # Seed of everything random: sampling, shuffling, initialisation, data order.
    seed: int = 233
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    # The file it was loaded from (not a recipe key).
    source_path: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what is hashed and recorded in provenance)."""
        out = dataclasses.asdict(self)
        out.pop("source_path", None)
        return out

    def hash(self) -> str:
        """sha256 of the canonical JSON of the recipe: identifies the run's settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

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
            first = str(exc).splitlines()[0] if str(exc) else "parse error"
            raise UserError(f"recipe: {path} is not valid YAML ({first}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe: {path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    recipe = _build(Recipe, raw, "")
    recipe.source_path = str(path) if path is not None else None
    validate(recipe)
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML; list items by index, e.g. data.sources.0.ratio=0.5)."""
    if "=" not in item:
        raise UserError(f"--set: {item!r} is not KEY=VALUE; write e.g. --set data.max_length=2048")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
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


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn a mapping into the dataclass `cls`, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe: {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise UserError(f"recipe: unknown key {dotted!r}{hint} (valid: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
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
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"recipe: {where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"recipe: {where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"recipe: {where} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"recipe: {where} must be an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise UserError(f"recipe: {where} must be a {tp.__name__}, got {value!r}")
    return value


def validate(recipe: Recipe) -> None:
    """Checks that need no files: ranges, choices, and the ratio sum."""
    d = recipe.data
    if d.packing not in PACKING_CHOICES:
        raise UserError(f"recipe: data.packing={d.packing!r} is not one of {', '.join(PACKING_CHOICES)}")
    for name in ("max_length", "total_sample_size", "num_proc"):
        if getattr(d, name) <= 0:
            raise UserError(f"recipe: data.{name}={getattr(d, name)} must be > 0")
    if d.eval_size < 0:
        raise UserError(f"recipe: data.eval_size={d.eval_size} must be >= 0")
    for i, src in enumerate(d.sources):
        if not src.path:
            raise UserError(f"recipe: data.sources.{i}.path is empty; give a hub id, directory or file")
        if src.type not in SOURCE_TYPES:
            raise UserError(
                f"recipe: data.sources.{i}.type={src.type!r} is not one of {', '.join(SOURCE_TYPES)}"
            )
        if src.ratio <= 0:
            raise UserError(
                f"recipe: data.sources.{i}.ratio={src.ratio} ({src.path}) must be > 0; remove the source instead"
            )
    if d.sources:
        total = sum(s.ratio for s in d.sources)
        if abs(total - 1.0) > 1e-6:
            listing = ", ".join(f"{s.label or s.path}={s.ratio:g}" for s in d.sources)
            raise UserError(f"recipe: data.sources ratios sum to {total:.6g}, not 1.0 ({listing}); fix them")
    t = recipe.train
    if t.precision not in PRECISIONS:
        raise UserError(f"recipe: train.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if t.global_batch_size <= 0 or t.per_device_batch_size <= 0:
        raise UserError(
            f"recipe: train.global_batch_size={t.global_batch_size} and "
            f"train.per_device_batch_size={t.per_device_batch_size} must be > 0"
        )
    s = recipe.soup
    if s.weights is not None and any(w < 0 for w in s.weights):
        raise UserError(f"recipe: soup.weights={s.weights} has a negative weight; weights must be >= 0")
