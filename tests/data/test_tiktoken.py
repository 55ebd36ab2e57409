"""OpenSeek's kind of tokenizer (remote code over tiktoken, 151,851 ids) in the data stage.

The tokenizer is the real-shape fixture's: the Qwen BPE ranks (fetched once into the cache, see
fixtures.qwen_ranks) behind a slow `PreTrainedTokenizer` loaded with trust_remote_code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml

from openseek_cpt.config import load_recipe
from openseek_cpt.data import stage as data
from openseek_cpt.data.doc_arrays import with_one_eos
from openseek_cpt.data.encoder import Encoder, _nfc, ascii_texts
from openseek_cpt.errors import UserError
from openseek_cpt.testing import megatron_files
from openseek_cpt.testing.fixtures import (
    REAL_VOCAB,
    stdlib_docstrings,
    write_qwen_tokenizer,
    write_qwen_tokenizer_json,
)

SPECIAL_DOC = "A web page that quotes <|endoftext|> and <|extra_204|> and <|im_start|>user in its text."
FIRST_SPECIAL_ID = 151643  # ids from here on are control tokens (<|endoftext|> .. <|extra_204|>)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_qwen_tokenizer(tmp_path_factory.mktemp("qwen") / "tokenizer")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


def _texts() -> list[str]:
    docs = stdlib_docstrings(max_files=60)[:300]
    return [*docs, "Cafe\u0301 cre\u0300me bru\u0302le\u0301e (decomposed accents)", "", "  \n\t x"]


def test_the_fixture_tokenizer_is_openseeks_shape(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    assert not tok.is_fast and len(tok) == REAL_VOCAB
    assert (tok.eos_token, tok.eos_token_id) == ("<|extra_204|>", 151850)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    # as shipped, it turns special strings inside text into control tokens: what the data stage must not do
    assert FIRST_SPECIAL_ID in tok(SPECIAL_DOC)["input_ids"]


def test_gigatoken_path_is_chosen_first_and_gives_the_tokenizers_own_ids(tokenizer_dir):
    import pyarrow as pa

    tok = _tokenizer(tokenizer_dir)
    texts = _texts()
    encoder = Encoder(tok)
    reference = encoder.choose_path(texts)
    assert encoder.path == "gigatoken" and "same ids" in encoder.path_note
    assert "qwen2" in encoder.giga.about  # the scheme whose split equals the Qwen pattern
    assert reference == tok(texts)["input_ids"]
    assert encoder.encode(texts) == [ids + [tok.eos_token_id] for ids in reference]
    # the Arrow column route (no Python str per text): empty texts dropped, special strings counted
    column = pa.array([*texts, None, SPECIAL_DOC])
    table = encoder.from_text_column(column)
    kept = [t for t in texts if t and not t.isspace()]
    assert table.column("input_ids").to_pylist() == [*encoder.encode(kept), *encoder.encode([SPECIAL_DOC])]
    assert table.column("special_text").to_pylist() == [0] * len(kept) + [1]
    # as a batch of rows gives it: a column of several chunks, or one chunk that is a slice of a buffer
    for part in (pa.chunked_array([column[:100], column[100:]]), pa.chunked_array([column.slice(7)])):
        fresh = pa.array(part.to_pylist(), pa.string())
        assert encoder.from_text_column(part).equals(encoder.from_text_column(fresh))


def test_nfc_of_arrow_texts_is_pythons_and_copies_only_where_a_text_changes():
    """The tiktoken paths' NFC (the tokenizer's, before its BPE) on an Arrow array: Python's own
    normalization, ASCII texts found from the bytes, the array returned as it is when nothing changes."""
    import pyarrow as pa

    texts = [
        "plain ascii",
        "caf\u00e9 composed",
        "Cafe\u0301 decomposed",
        "",
        None,
        "\u212b angstrom sign",
        "中文 日本語 한국어",
        "x" * 5000 + "e\u0301",
    ]
    for kind in (pa.string(), pa.large_string()):
        arr = pa.array(["before", *texts, "after\u0301"], kind).slice(1, len(texts))  # an offset into buffers
        assert ascii_texts(arr).tolist() == [True, False, False, True, True, False, False, False]
        want = [None if t is None else unicodedata.normalize("NFC", t) for t in texts]
        assert _nfc(arr).to_pylist() == want
        assert _nfc(pa.chunked_array([arr[:3], arr[3:]])).to_pylist() == want
        composed = pa.array(["ascii", "caf\u00e9", None, "", "中文"], kind)
        assert _nfc(composed) is composed  # nothing to change: no copy
    assert ascii_texts(pa.array(["", None], pa.string())).tolist() == [True, True]


@pytest.mark.slow
def test_gigatoken_path_serves_a_tokenizer_json_of_the_qwen_ids(tokenizer_dir, tmp_path):
    """The HF fast-tokenizer route at real size: a byte-level BPE tokenizer.json of the same Qwen ids
    (151,851 with 208 specials, an NFC normalizer) goes through GigaToken, with the tiktoken tokenizer's
    ids, its NFC done inside GigaToken and special-token strings in text kept text."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    tiktoken_tok = _tokenizer(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(write_qwen_tokenizer_json(tiktoken_tok, tmp_path / "hf")))
    assert tok.is_fast and len(tok) == REAL_VOCAB and tok.eos_token_id == 151850
    texts = _texts()
    encoder = Encoder(tok)
    encoder.choose_path([*texts, SPECIAL_DOC])
    assert encoder.path == "gigatoken" and "tokenizer.json" in encoder.giga.about
    assert encoder.encoding is None and not encoder.nfc  # the normalizer is the tokenizer.json's own
    assert encoder.encode(texts) == Encoder(tiktoken_tok).encode(texts)
    (ids,) = encoder.encode([SPECIAL_DOC])
    assert max(ids[:-1]) < FIRST_SPECIAL_ID and tok.decode(ids[:-1]) == SPECIAL_DOC
    table = encoder.from_text_column(pa.array([*texts, SPECIAL_DOC]))
    kept = [t for t in texts if t and not t.isspace()]
    assert table.column("input_ids").to_pylist() == encoder.encode([*kept, SPECIAL_DOC])
    assert table.column("special_text").to_pylist() == [0] * len(kept) + [1]


def test_gigatoken_tokenizer_is_rebuilt_after_each_cache_window_with_the_same_ids(tokenizer_dir, monkeypatch):
    """GigaToken 0.10 caches every pretoken it sees without a bound: a fresh tokenizer per window,
    the freed caches handed back to the system in between."""
    import pyarrow as pa

    from openseek_cpt.data import giga

    trims = []
    monkeypatch.setattr(giga, "release_freed_memory", lambda: trims.append(1))
    encoder = Encoder(_tokenizer(tokenizer_dir))
    encoder.choose_path(_texts())
    column = pa.array([t for t in _texts() if t])
    first_ids, _ = encoder.giga.encode(column)
    encoder.giga.window = len(first_ids)  # the next call starts a new window
    first = encoder.giga.tokenizer
    again, _ = encoder.giga.encode(column)
    assert encoder.giga.tokenizer is not first and encoder.giga.encoded == len(again) and trims == [1]
    assert np.array_equal(again, first_ids)
    encoder.giga.window = 10 * len(first_ids)
    second = encoder.giga.tokenizer
    encoder.giga.encode(column)
    assert encoder.giga.tokenizer is second  # within the window: the same one, caches kept


def test_gigatoken_tokenizer_is_rebuilt_once_the_process_grew_by_its_cache_budget(tokenizer_dir, monkeypatch):
    """The caches' memory follows a budget, whatever the number of tokens: the growth since the
    tokenizer was built, measured at the start of each batch, triggers the rebuild."""
    import pyarrow as pa

    from openseek_cpt.data import giga

    encoder = Encoder(_tokenizer(tokenizer_dir))
    encoder.choose_path(_texts())
    column = pa.array([t for t in _texts() if t])
    g = encoder.giga
    g.built_at = None  # counted afresh from the next batch (choose_path's encoding set it already)
    memory = iter([500 << 20, 500 << 20, (500 << 20) + g.budget - 1, (500 << 20) + g.budget, 400 << 20])
    monkeypatch.setattr(giga, "anonymous_memory", lambda: next(memory))
    first = g.tokenizer
    ids, _ = g.encode(column)  # 500 MiB: where this tokenizer's growth is counted from
    g.encode(column)  # grown by 0
    g.encode(column)  # by one byte less than the budget: kept
    assert g.tokenizer is first
    again, _ = g.encode(column)  # by the budget: a fresh tokenizer, counted from 400 MiB
    assert g.tokenizer is not first and g.built_at == 400 << 20 and g.encoded == len(again)
    assert np.array_equal(again, ids)


def test_release_freed_memory_hands_the_c_heaps_free_pages_back_to_the_system():
    """What GigaToken's dropped caches free stays in glibc's arenas (RSS crept with the corpus) until
    `release_freed_memory`; `Giga.encode` calls it between dropping a tokenizer and building the next."""
    from openseek_cpt.data import giga

    if giga._malloc_trim() is None:
        pytest.skip("not glibc: no malloc_trim")
    script = """
from openseek_cpt.data.giga import anonymous_memory, release_freed_memory
chunks = [bytes(4000) for _ in range(50_000)]  # ~200 MB of malloc'd chunks under mmap's threshold
kept = chunks[::100]  # a few survive, so the heap's top cannot shrink by itself
del chunks
before = anonymous_memory(); release_freed_memory(); print(before, anonymous_memory())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    before, after = map(int, r.stdout.split())
    assert before - after > 100 << 20, (before, after)


def test_tiktoken_path_is_chosen_without_gigatoken_and_gives_the_tokenizers_own_ids(
    tokenizer_dir, monkeypatch
):
    from openseek_cpt.data import giga

    monkeypatch.setattr(giga, "load", lambda tokenizer, encoding: (None, "left out by this test"))
    tok = _tokenizer(tokenizer_dir)
    texts = _texts()
    encoder = Encoder(tok)
    reference = encoder.choose_path(texts)
    assert encoder.path == "tiktoken" and "same ids" in encoder.path_note
    assert "gigatoken path not available: left out by this test" in encoder.path_note
    assert reference == tok(texts)["input_ids"]  # no special strings in these texts
    assert encoder.encode(texts) == [ids + [tok.eos_token_id] for ids in reference]
    assert encoder.nfc  # the tokenizer NFC-normalizes; the fast path does too (decomposed text above)
    encoder.threads = 2  # the data stage's in-process path: encode_ordinary_batch on threads
    assert encoder.encode(texts) == [ids + [tok.eos_token_id] for ids in reference]


def test_special_token_strings_in_text_are_encoded_as_text_on_every_path(tokenizer_dir):
    tok = _tokenizer(tokenizer_dir)
    for path in ("gigatoken", "tiktoken", "tokenizer"):
        encoder = Encoder(tok)
        encoder.choose_path(["plain text"])
        encoder.path = path
        (ids,) = encoder.encode([SPECIAL_DOC])
        assert ids[-1] == tok.eos_token_id
        assert max(ids[:-1]) < FIRST_SPECIAL_ID, path  # no control token inside the document
        assert tok.decode(ids[:-1]) == SPECIAL_DOC, path
        table = encoder.from_texts([SPECIAL_DOC, "plain text"])
        assert table.column("special_text").to_pylist() == [1, 0]


def test_a_tiktoken_path_that_disagrees_is_not_used_and_ids_stay_correct(tokenizer_dir):
    """The fast path is checked, not trusted: one that disagrees with the tokenizer is not used."""
    tok = _tokenizer(tokenizer_dir)
    texts = _texts()
    right = Encoder(tok).encode(texts)

    class OffByOne:  # an encoding that differs from the tokenizer's (as a stale vocabulary would)
        def __init__(self, enc):
            self.enc = enc
            self.special_tokens_set = enc.special_tokens_set

        def encode_to_numpy(self, text, **kwargs):
            return self.enc.encode_to_numpy(text, **kwargs)[:-1]

    encoder = Encoder(tok)
    encoder.encoding = OffByOne(encoder.encoding)
    encoder.choose_path(texts)
    assert encoder.path == "tokenizer" and "tiktoken path disagrees" in encoder.path_note
    assert encoder.encode(texts) == right


def test_a_gigatoken_path_that_splits_text_differently_is_not_used(tokenizer_dir, monkeypatch):
    """A GigaToken twin with another pretokenizer scheme (gpt2's split) is caught on the sample."""
    import gigatoken

    from openseek_cpt.data import giga

    tok = _tokenizer(tokenizer_dir)
    other = gigatoken.Tokenizer.from_tiktoken(tok.vocab_file, pretokenizer="gpt2", special_tokens={})
    monkeypatch.setattr(
        giga, "load", lambda tokenizer, encoding: (giga.Giga(lambda: other, [], [], "gpt2"), "")
    )
    encoder = Encoder(tok)
    encoder.choose_path(_texts())
    assert encoder.path == "tiktoken" and "gigatoken path disagrees" in encoder.path_note


def _recipe(work: Path, tokenizer_dir: Path, sources: list[dict], **data_keys):
    raw = {
        "assets": {"model_dir": str(work / "no-model"), "tokenizer_trust_remote_code": True},
        "data": {
            "output_dir": str(work / "out"),
            "tokenizer_dir": str(tokenizer_dir),
            "max_length": 256,
            "total_sample_size": 24,
            "eval_size": 4,
            "num_proc": 2,
            "sources": sources,
            **data_keys,
        },
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def test_data_stage_with_the_tiktoken_tokenizer_reports_its_path_and_special_text(tokenizer_dir, tmp_path):
    """The ids are the tokenizer's, the manifest names the path that ran, quoted specials stay text."""
    texts = _texts()
    with open(tmp_path / "web.jsonl", "w") as f:
        for t in [*texts[:150], SPECIAL_DOC, *texts[150:]]:
            f.write(json.dumps({"text": t}) + "\n")
    sources = [{"path": str(tmp_path / "web.jsonl"), "ratio": 1.0}]
    out = data.run(**_recipe(tmp_path, tokenizer_dir, sources, read_margin=10.0).stage_args("data"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_path"] == "gigatoken" and manifest["vocab_size"] == REAL_VOCAB
    (src,) = manifest["sources"]
    assert src["documents_read"] == src["documents_in_source"]  # the share needs every document here
    assert src["documents_with_special_text"] == manifest["totals"]["documents_with_special_text"] == 1
    from datasets import load_from_disk

    rows = load_from_disk(str(out))
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for s in rows.values() for r in s["input_ids"]])
    controls = ids[ids >= FIRST_SPECIAL_ID]
    assert set(controls.tolist()) == {151850}  # the only control token is the eos that ends each document
    # the stage's ids are the tokenizer's own: short documents appear as whole segments of the rows
    tok = _tokenizer(tokenizer_dir)
    expected = {tuple(tok(t)["input_ids"] + [151850]) for t in texts}
    segments = set()
    for split in rows.values():
        for row, lengths in zip(split["input_ids"], split["seq_lengths"], strict=True):
            starts = np.cumsum([0, *lengths[:-1]])
            segments |= {tuple(row[i : i + n]) for i, n in zip(starts, lengths, strict=True)}
    assert len(segments & expected) > 20


def test_megatron_source_with_ids_beyond_the_vocab_is_refused(tokenizer_dir, tmp_path):
    """An int32 shard tokenized with a bigger vocabulary is refused in one line naming both sizes."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 150000, size=50) for _ in range(200)]
    docs[137][7] = REAL_VOCAB + 48  # one bad id in one document
    megatron_files.write_documents(tmp_path / "shard_text_document", docs, vocab_size=200000)
    recipe = _recipe(tmp_path, tokenizer_dir, [{"path": str(tmp_path / "shard_text_document"), "ratio": 1.0}])
    with pytest.raises(UserError) as info:
        data.run(**recipe.stage_args("data"))
    message = str(info.value)
    assert (
        "\n" not in message and f"token id {REAL_VOCAB + 48}" in message and f"[0, {REAL_VOCAB})" in message
    )
    assert not (tmp_path / "out").exists()


def test_with_one_eos_on_arrays_gives_what_end_with_eos_gives_on_lists():
    """The tiktoken path's numpy eos handling == the list one, trailing eos runs and empty docs included."""
    rng = np.random.default_rng(0)
    eos = 7
    docs = [list(rng.integers(0, 9, size=int(n))) for n in rng.integers(0, 6, size=300)] + [[], [eos, eos]]
    values = np.array([x for d in docs for x in d], dtype=np.int32)
    got, lengths = with_one_eos(values, np.array([len(d) for d in docs]), eos)
    encoder = Encoder.__new__(Encoder)  # end_with_eos needs only the eos id
    encoder.eos = eos
    want = encoder.end_with_eos([list(map(int, d)) for d in docs])
    assert [part.tolist() for part in np.split(got, np.cumsum(lengths)[:-1])] == want


def test_the_data_stage_writes_nothing_under_home(tokenizer_dir, tmp_path):
    """A remote-code tokenizer and a jsonl source, HOME empty and no HF_HOME: the jsonl is read in place
    (no datasets cache) and the remote code goes to the stage's own temp dir, so HOME stays empty."""
    import os

    from conftest import run_cli

    home = tmp_path / "home"
    home.mkdir()
    with open(tmp_path / "web.jsonl", "w") as f:
        for t in _texts() * 20:
            f.write(json.dumps({"text": t}) + "\n")
    _recipe(tmp_path, tokenizer_dir, [{"path": str(tmp_path / "web.jsonl"), "ratio": 1.0}], read_margin=10.0)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_HOME", "HF_DATASETS_CACHE", "HF_MODULES"))
    }
    r = run_cli(
        "data", "--recipe", str(tmp_path / "recipe.yaml"), cwd=tmp_path, env={**env, "HOME": str(home)}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [p for p in home.rglob("*")], sorted(str(p) for p in home.rglob("*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dir left beside it
