"""The GigaToken path of the encoder: the same BPE in Rust, on all cores, over Arrow text buffers.

GigaToken (PyPI `gigatoken`, what Megatron-LM's `preprocess_data_fast.py` uses) encodes a batch
of documents from one flat buffer on its own thread pool, with the GIL released. It serves:
- a tiktoken `Encoding` (OpenSeek's and Qwen's remote-code tokenizers): its ranks, loaded with the
  GigaToken pretokenizer scheme whose ids equal the Encoding's on a probe text (a .tiktoken file
  names no scheme), and no special tokens: raw text stays text;
- an HF fast tokenizer's `tokenizer.json` (byte-level BPE), with its special added tokens removed
  (as `split_special_tokens=True` does) and what its post-processor adds around a text put back.
`load` returns None, with the reason, where neither applies; the encoder still compares the ids
with the tokenizer's own on the estimate sample before it uses this path (encoder.choose_path).

GigaToken 0.10 caches every distinct pretoken it has seen, per worker thread, without a bound
(upstream issue #36: a TB-scale job runs out of memory); `Giga` builds a fresh tokenizer, which
frees the old caches, once the process has grown by CACHE_BUDGET_BYTES since the current one was
built (or after CACHE_WINDOW_TOKENS where that cannot be read): the caches' memory follows a budget,
not the corpus nor how varied its words are. They live in the C heap, where glibc keeps what they
freed in its per-thread arenas (RSS crept ~10 MiB a rebuild at 1 B tokens): `malloc_trim` hands it
back after each rebuild.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# GigaToken's named pretokenizer schemes, tried in this order against a tiktoken Encoding's split pattern.
SCHEMES = ("qwen2", "qwen35", "gpt4", "o200k", "gpt2", "deepseek_v3", "olmo3", "nemotron", "kimi")
# Text on which the pretokenizer schemes disagree: contractions, digit runs, letters of several
# scripts, punctuation runs, newlines and space runs, emoji.
PROBE = (
    "It's THEY'RE we'll I'M 1234567 3.14159 x=y+1; def f(a, b):\n\treturn a**2\r\n\r\n"
    "   spaces   \n\n\n  Ünïcödé 中文字符测试 日本語 한국어 Ελληνικά кириллица 😀👍🏽 ...!!! ?? "
    "<tag attr='v'>  </tag>\u00a0\u2003end. 'S 's 'Ll\n"
)
# Growth of the process's anonymous memory, since the tokenizer was built, at which a fresh one
# replaces it (its caches freed). A rebuild costs ~0.4 CPU-s and re-misses of common pretokens; on
# fresh text (every word new, the costly case) this budget is spent about every 2**26 tokens.
CACHE_BUDGET_BYTES = 128 << 20
# Tokens encoded by one tokenizer at most (the budget's backstop where RSS cannot be read).
CACHE_WINDOW_TOKENS = 2**28


@dataclass
class Giga:
    """A GigaToken tokenizer (rebuilt by `build` after each cache window) plus the ids its HF
    tokenizer adds around each text (post-processor)."""

    build: Callable[[], Any]
    prefix: list[int]
    suffix: list[int]
    about: str
    tokenizer: Any = None  # the first one, when `load` already built it to probe it
    window: int = CACHE_WINDOW_TOKENS
    budget: int = CACHE_BUDGET_BYTES

    def __post_init__(self) -> None:
        self.tokenizer = self.tokenizer or self.build()
        self.encoded = 0  # tokens encoded by this tokenizer
        self.built_at: int | None = None  # anonymous memory when its first batch came (bytes)

    def encode(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        """(all ids int32, ids per text int64) of an Arrow string array (no nulls), on all cores."""
        memory = anonymous_memory()  # measured at the same point of every call: batches alike
        if self.built_at is None:
            self.built_at = memory
        grown = memory - self.built_at if memory is not None and self.built_at is not None else 0
        if self.encoded >= self.window or grown >= self.budget:
            self.tokenizer = None  # its caches go before the next one's are filled
            release_freed_memory()
            self.tokenizer, self.encoded = self.build(), 0
            self.built_at = anonymous_memory()
        values, offsets = _flat(self.tokenizer.encode_batch(_awkward_strings(texts)))
        self.encoded += len(values)
        lengths = np.diff(offsets)
        if not (self.prefix or self.suffix):  # uint32 ids < 2**31: the same bits as int32, no copy
            return (values.view(np.int32) if values.dtype == np.uint32 else values.astype(np.int32)), lengths
        out_lengths = lengths + len(self.prefix) + len(self.suffix)
        starts = np.cumsum(out_lengths) - out_lengths
        out = np.empty(int(out_lengths.sum()), dtype=np.int32)
        body = np.ones(len(out), dtype=bool)
        for k, token in enumerate(self.prefix):
            out[starts + k], body[starts + k] = token, False
        for k, token in enumerate(self.suffix):
            at = starts + out_lengths - len(self.suffix) + k
            out[at], body[at] = token, False
        out[body] = values
        return out, out_lengths


def anonymous_memory() -> int | None:
    """This process's resident anonymous memory in bytes (Linux: RssAnon), else None."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return trim  # glibc only: elsewhere freed memory is the allocator's business


def release_freed_memory() -> None:
    """Return the C heap's free pages, every arena's, to the system (glibc `malloc_trim(0)`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load(tokenizer: Any, encoding: Any) -> tuple[Giga | None, str]:
    """(the GigaToken twin of `tokenizer`, or None, and why)."""
    try:
        import gigatoken
    except ImportError:
        return None, "gigatoken is not installed"
    try:
        if encoding is not None:
            return _from_tiktoken(gigatoken, encoding)
        if getattr(tokenizer, "is_fast", False):
            return _from_tokenizer_json(gigatoken, tokenizer)
    except Exception as exc:  # a tokenizer GigaToken cannot load is simply not served by this path
        return None, f"gigatoken cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None, "neither a tiktoken encoding nor a fast tokenizer"


def _from_tiktoken(gigatoken: Any, encoding: Any) -> tuple[Giga | None, str]:
    ranks = b"".join(
        base64.b64encode(token) + b" %d\n" % rank for token, rank in encoding._mergeable_ranks.items()
    )
    expected = encoding.encode_ordinary(PROBE)

    def build(scheme: str) -> Any:
        fd, path = tempfile.mkstemp(suffix=".tiktoken")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(ranks)
            return gigatoken.Tokenizer.from_tiktoken(path, pretokenizer=scheme, special_tokens={})
        finally:
            os.unlink(path)

    for scheme in SCHEMES:
        try:
            tok = build(scheme)
        except Exception:  # a scheme this GigaToken does not know
            continue
        if tok.encode(PROBE).tolist() == expected:
            about = f"tiktoken ranks, pretokenizer {scheme}"
            return Giga(functools.partial(build, scheme), [], [], about, tokenizer=tok), ""
    return None, "no GigaToken pretokenizer scheme splits text as the tiktoken pattern does"


def _from_tokenizer_json(gigatoken: Any, tokenizer: Any) -> tuple[Giga | None, str]:
    spec, model = _split_model(tokenizer.backend_tokenizer.to_str())
    kind = re.match(r'\s*\{\s*"type"\s*:\s*"(\w+)"', model)
    if kind is None or kind.group(1) != "BPE":
        return None, f"a {kind.group(1) if kind else 'type-less'} model, not BPE"
    # Raw text is text: special tokens are not matched in it (HF's split_special_tokens=True).
    spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
    spec["post_processor"] = None
    spec["truncation"] = spec["padding"] = None
    text = json.dumps(spec)[:-1] + ',"model":' + model + "}"
    tok = gigatoken.Tokenizer.from_json(text)
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    if at is None:
        return None, "its post-processor changes the text's own ids"
    build = functools.partial(gigatoken.Tokenizer.from_json, text)
    return Giga(build, full[:at], full[at + len(bare) :], "tokenizer.json", tokenizer=tok), ""


def _split_model(text: str) -> tuple[dict, str]:
    """(a tokenizer.json's top-level entries but its model, parsed; the model's JSON text).

    The model (vocab and merges: nearly all of the text, ~7 MB for 151k ids) is carried as text: Python's
    json took seconds of the stage's start-up to parse it and write it back unchanged. `to_str()` writes
    "model" as the last top-level key; where the text before its first `"model":` is not the
    object's other entries, the whole text is parsed instead.
    """
    at = text.find('"model":')
    try:
        head = json.loads(text[:at].rstrip().removesuffix(",") + "}") if at > 0 else None
        tail = text[at + len('"model":') :].rstrip()
        if isinstance(head, dict) and head and tail.endswith("}"):
            return head, tail[:-1]  # the model object (and whatever follows it), without the closing brace
    except ValueError:  # "model" was not a top-level key there
        pass
    spec = json.loads(text)
    return spec, json.dumps(spec.pop("model", None))


def _awkward_strings(texts: Any) -> Any:
    """An Arrow string array as an awkward array of strings over the same buffers (no Python str per text)."""
    import awkward as ak
    import pyarrow as pa

    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    _, offsets, data = texts.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    content = ak.contents.NumpyArray(data, parameters={"__array__": "char"})
    layout = ak.contents.ListOffsetArray(
        ak.index.Index64(offsets), content, parameters={"__array__": "string"}
    )
    return ak.Array(layout)


def _flat(ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets from 0) of GigaToken's awkward result, without a Python object per document."""
    layout = ids.layout
    offsets = np.asarray(layout.offsets.data).astype(np.int64)
    values = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]
