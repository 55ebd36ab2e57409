"""Remote code of the real-shape fixture's tokenizer: a slow tokenizer over tiktoken, as OpenSeek ships.

Never imported by the package: `fixtures.build_real_shape_hub` copies this file into a local
"hub" directory whose tokenizer_config.json names it in `auto_map`, so `AutoTokenizer` loads it with
`trust_remote_code=True` exactly as it loads BAAI/OpenSeek-Small-v1's tokenizer. Modelled on the
public Qwen tokenizer that OpenSeek's derives from: the Qwen BPE ranks (`qwen.tiktoken`, 151,643
ids) plus 208 specials (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`..
`<|extra_204|>`) = 151,851 ids; eos `<|extra_204|>`, pad `<|endoftext|>`. Like the original it
is a Python `PreTrainedTokenizer` (slow: per-document Python around tiktoken), NFC-normalizes text
and encodes special-token strings found in text as control tokens (`allowed_special="all"`).
"""

from __future__ import annotations

import base64
import os
import unicodedata

import tiktoken
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)


def _load_ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


class QWenTiktokenTokenizer(PreTrainedTokenizer):
    """Qwen-style tiktoken tokenizer (slow, Python)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        self.errors = errors
        self.vocab_file = vocab_file
        self.mergeable_ranks = _load_ranks(vocab_file)
        first = len(self.mergeable_ranks)
        self.special_tokens = {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        kwargs.setdefault("eos_token", "<|extra_204|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        super().__init__(errors=errors, **kwargs)

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict:
        return {**self.mergeable_ranks, **self.special_tokens}

    def tokenize(self, text: str, allowed_special="all", disallowed_special=(), **kwargs) -> list:  # type: ignore[override]  # Qwen's signature
        text = unicodedata.normalize("NFC", text)
        return [
            self.decoder[t]
            for t in self.tokenizer.encode(
                text, allowed_special=allowed_special, disallowed_special=disallowed_special
            )
        ]

    def _convert_token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        if isinstance(token, str):
            token = token.encode("utf-8")
        return self.mergeable_ranks.get(token)

    def _convert_id_to_token(self, index: int):
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"unknown id {index}")

    def convert_tokens_to_string(self, tokens: list) -> str:
        out, buffer = "", b""
        for token in tokens:
            if isinstance(token, bytes):
                buffer += token
            else:
                out += buffer.decode("utf-8", errors=self.errors) + token
                buffer = b""
        return out + buffer.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:  # type: ignore[override]  # Qwen's signature
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < len(self.mergeable_ranks)]
        return self.tokenizer.decode(token_ids, errors=self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        path = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + "qwen.tiktoken"
        )
        with open(path, "wb") as f:
            for token, rank in self.mergeable_ranks.items():
                f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        return (path,)
