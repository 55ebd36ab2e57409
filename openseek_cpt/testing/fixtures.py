"""Tiny stand-ins for the real assets, built offline: a BPE tokenizer, a random deepseek_v3, sources.

The tokenizer is trained on the docstrings of Python's standard library (a corpus every Python
install has); the model is OpenSeek-Small-v1's family (deepseek_v3: MLA attention, a dense first
layer, sigmoid-routed MoE with shared experts, tied embeddings) shrunk to a few hundred thousand
parameters. They are saved as a local "hub" directory that `openseek-cpt download` fetches exactly
like the real `BAAI/OpenSeek-Small-v1`, so the same asset code runs in tests and on the cluster.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.provenance import write_provenance
from openseek_cpt.artifacts.temps import sweep_leftovers, temp_path

if TYPE_CHECKING:
    from transformers import DeepseekV3Config, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
TINY_VOCAB = 1024
TINY_MAX_POSITIONS = 256


def stdlib_docstrings(max_files: int = 400) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    return list(_stdlib_docstrings(max_files))


@functools.cache
def _stdlib_docstrings(max_files: int) -> tuple[str, ...]:
    """Parsed once per process: the tokenizer's corpus and the text source both read them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:max_files]
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return tuple(docs)


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a single special token (eos) and, on purpose, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, model_max_length=TINY_MAX_POSITIONS)


def tiny_config(vocab_size: int, eos_token_id: int) -> DeepseekV3Config:
    """OpenSeek-Small-v1's architecture, shrunk (the real sizes: `real_shape_config` below)."""
    return openseek_config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=TINY_MAX_POSITIONS,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def openseek_config(**sizes: Any) -> DeepseekV3Config:
    """A DeepseekV3Config of OpenSeek-Small-v1's family: what every size shares (one dense first
    layer, sigmoid router over one group, no q LoRA, rope theta 1e6, tied embeddings, no KV cache)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        q_lora_rank=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        **sizes,
    )


def build_tiny_hub(out_dir: str | Path, seed: int = 233) -> Path:
    """Write the tiny tokenizer + random model to `out_dir` (a local stand-in for a hub repo)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    corpus = stdlib_docstrings()
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(tiny_config(len(tokenizer), tokenizer.eos_token_id))
    with atomic_output_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        write_provenance(tmp, stage="tiny-assets", extra={"seed": seed})
    return Path(out_dir)


def build_tiny_sources(out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """Two local sources of different kinds for the tiny mix.

    - `docs.jsonl`: text documents (stdlib docstrings) under the field `body` with a `title`,
      read through a formatting function;
    - `code/`: a `save_to_disk` dataset that is already tokenized (`input_ids`), made from
      stdlib source files cut into functions.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = stdlib_docstrings()
    with atomic_output_dir(out_dir) as tmp:
        with open(tmp / "docs.jsonl", "w") as f:
            for i, doc in enumerate(docs):
                title, _, body = doc.partition("\n")
                f.write(json.dumps({"id": i, "title": title, "body": body}) + "\n")
        code = _stdlib_functions()
        ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in code]
        Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp / "code"))
        write_provenance(tmp, stage="tiny-sources", inputs={"tokenizer": str(tokenizer_dir)})
    return Path(out_dir)


def _stdlib_functions(max_files: int = 120) -> list[str]:
    """The source of every top-level function of the first `max_files` stdlib modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:max_files]
    out = []
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = _LINE.findall(source)  # once per file: ast.get_source_segment splits it per call
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                segment = _source_segment(lines, node)
                if segment and len(segment) > 80:
                    out.append(segment)
    return out


# A line with its end, as ast.get_source_segment splits a source (\r\n, \r or \n; no form feed).
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _source_segment(lines: list[str], node: ast.stmt) -> str:
    """`ast.get_source_segment(source, node)` from the source's lines."""
    first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
    start, end = node.col_offset, node.end_col_offset
    if first == last:
        return lines[first].encode()[start:end].decode()
    head, tail = lines[first].encode()[start:].decode(), lines[last].encode()[:end].decode()
    return "".join([head, *lines[first + 1 : last], tail])


def format_title_body(example: dict) -> str:
    """Formatting function of the tiny recipe's text source: `title` then `body`."""
    return f"{example['title']}\n\n{example['body']}".strip()


# ---------------------------------------------------------------- the real-shape fixture

# OpenSeek-Small-v1's tokenizer vocabulary: the Qwen BPE ranks ship inside this PyPI wheel (pinned
# by version and by the ranks file's hash); 151,643 ranks + 208 specials = 151,851 ids.
QWEN_RANKS_WHEEL = "dashscope==2.0.2"
QWEN_RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
REAL_VOCAB = 151_851
REAL_LAYERS = 2  # the real model has 6: one dense layer + one MoE layer keep every per-layer shape


def cache_dir() -> Path:
    """Where fetched fixture files live: $OPENSEEK_CPT_CACHE, else ~/.cache/openseek-cpt."""
    import os

    return Path(os.environ.get("OPENSEEK_CPT_CACHE") or Path.home() / ".cache" / "openseek-cpt")


def qwen_ranks() -> Path:
    """The Qwen BPE ranks file, from the cache; fetched once (`pip download` of the wheel) if absent."""
    import hashlib
    import subprocess
    import sys
    import zipfile

    root = cache_dir()
    ranks = root / "qwen.tiktoken"
    if ranks.is_file() and hashlib.sha256(ranks.read_bytes()).hexdigest() == QWEN_RANKS_SHA256:
        return ranks
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob("dashscope-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", QWEN_RANKS_WHEEL, "-d", str(root)],
            check=True,
        )
        wheels = sorted(root.glob("dashscope-*.whl"))
    data = zipfile.ZipFile(wheels[-1]).read(QWEN_RANKS_MEMBER)
    if hashlib.sha256(data).hexdigest() != QWEN_RANKS_SHA256:
        raise RuntimeError(f"{wheels[-1]}:{QWEN_RANKS_MEMBER} is not the expected Qwen ranks file")
    sweep_leftovers(root, ranks.name)  # a killed earlier fetch's temp file
    tmp = temp_path(ranks, "tmp")
    tmp.write_bytes(data)
    tmp.replace(ranks)
    return ranks


def write_qwen_tokenizer(out_dir: str | Path) -> Path:
    """OpenSeek's kind of tokenizer into `out_dir`: remote code over tiktoken + the Qwen ranks."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qwen_ranks(), out / "qwen.tiktoken")
    code = Path(__file__).with_name("tokenization_qwen_tiktoken.py")
    shutil.copyfile(code, out / code.name)
    config = {
        "tokenizer_class": "QWenTiktokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen_tiktoken.QWenTiktokenTokenizer", None]},
        "eos_token": "<|extra_204|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_qwen_tokenizer_json(tokenizer, out_dir: str | Path) -> Path:
    """The HF fast-tokenizer twin of `write_qwen_tokenizer`'s (loaded: `tokenizer`) into `out_dir`,
    built once: a byte-level BPE `tokenizer.json` made by transformers' `TikTokenConverter` from the
    same ranks, with the tokenizer's split pattern, its 208 special tokens and an NFC normalizer, so
    its ids equal the tiktoken tokenizer's (what Megatron's HuggingFaceTokenizer route reads)."""
    import tempfile

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    encoding = tokenizer.tokenizer
    specials = sorted(encoding._special_tokens, key=encoding._special_tokens.get)
    backend = TikTokenConverter(
        vocab_file=str(Path(tokenizer.vocab_file)),
        pattern=encoding._pat_str,
        extra_special_tokens=specials,
    ).converted()
    backend.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        model_max_length=tokenizer.model_max_length,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    fast.save_pretrained(str(tmp))
    tmp.replace(out)
    return out


def real_shape_config(num_layers: int = REAL_LAYERS) -> DeepseekV3Config:
    """BAAI/OpenSeek-Small-v1's config.json with `num_layers` layers: every tensor keeps its real shape."""
    return openseek_config(
        vocab_size=REAL_VOCAB,
        hidden_size=1280,
        intermediate_size=7168,
        moe_intermediate_size=896,
        num_hidden_layers=num_layers,
        num_attention_heads=10,
        num_key_value_heads=10,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=4096,
        eos_token_id=151850,
        pad_token_id=151643,
    )


def build_real_shape_hub(out_dir: str | Path, seed: int = 233, num_layers: int = REAL_LAYERS) -> Path:
    """A local "hub" repo shaped like BAAI/OpenSeek-Small-v1: its tiktoken remote-code tokenizer
    (151,851 ids) and a random bf16 deepseek_v3 with its per-layer shapes, `num_layers` deep."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(real_shape_config(num_layers)).to(torch.bfloat16)  # type: ignore[arg-type]
    with atomic_output_dir(out_dir) as tmp:
        write_qwen_tokenizer(tmp)
        model.save_pretrained(tmp)
        write_provenance(tmp, stage="real-shape-assets", extra={"seed": seed, "layers": num_layers})
    return Path(out_dir)
