"""The data stage: mixing, packing, sampling, determinism and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.config import load_recipe
from openseek_cpt.data import stage as data
from openseek_cpt.data.encoder import Encoder
from openseek_cpt.data.prepare import Part, tokenize_and_pack
from openseek_cpt.data.sample import rows_table
from openseek_cpt.data.sources import open_sources
from openseek_cpt.data.tokenizer import load_tokenizer
from openseek_cpt.errors import UserError
from openseek_cpt.testing.fixtures import format_title_body

TOKENIZER = "models/tiny-openseek"


def _rows(parts: list[Part]) -> list[dict]:
    """Parts' packed rows as dicts (input_ids, seq_lengths, n_docs), assembled as the output is."""
    rows = []
    for part in parts:
        rows += rows_table(part, np.arange(len(part.plan))).to_pylist()
        for row, n in zip(rows[-len(part.plan) :], part.plan.row_documents().tolist(), strict=True):
            row["n_docs"] = n
    return rows


def _tokenizer(workdir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(workdir / TOKENIZER))


def _documents(workdir: Path) -> dict[str, list[tuple[int, ...]]]:
    """Every document of the tiny sources, tokenized independently of data.py, ending with eos."""
    from datasets import load_from_disk

    tok = _tokenizer(workdir)
    eos = tok.eos_token_id
    rows = [
        json.loads(line) for line in (workdir / "models/tiny/sources/docs.jsonl").read_text().splitlines()
    ]
    docs = [tuple(tok(format_title_body(r))["input_ids"] + [eos]) for r in rows]
    code = [tuple(x) for x in load_from_disk(str(workdir / "models/tiny/sources/code"))["input_ids"]]
    return {"docs": docs, "code": code}


def _pieces(docs: list[tuple[int, ...]], max_length: int) -> Counter:
    """bfd_split's segments of each document: consecutive max_length pieces, the last one shorter."""
    return Counter(d[k : k + max_length] for d in docs for k in range(0, len(d), max_length))


def _segments(rows: list[dict]) -> list[tuple[int, ...]]:
    out = []
    for row in rows:
        ids, start = row["input_ids"], 0
        assert sum(row["seq_lengths"]) == len(ids)
        for n in row["seq_lengths"]:
            out.append(tuple(ids[start : start + n]))
            start += n
    return out


def _add_text_sources(workdir: Path) -> None:
    """A save_to_disk text source at the org/name-like relative path `acme/notes`, and a parquet file."""
    from datasets import Dataset

    tok = _tokenizer(workdir)
    texts = [f"note {i}: " + " ".join(["alpha beta gamma delta"] * (1 + i % 7)) for i in range(300)]
    Dataset.from_dict({"text": texts, "n": list(range(300))}).save_to_disk(str(workdir / "acme/notes"))
    Dataset.from_dict({"body": texts[::-1]}).to_parquet(str(workdir / "notes.parquet"))
    assert tok.eos_token_id is not None


def _recipe(workdir: Path, *overrides: str, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.chdir(workdir)
    return load_recipe(TINY_RECIPE, list(overrides))


def test_mix_of_source_kinds_realizes_ratios_and_reports_them(tiny_workdir):
    """A mix of json+formatting, pre-tokenized disk, org/name-like local disk and parquet meets its ratios."""
    _add_text_sources(tiny_workdir)
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["data"]["sources"][0]["ratio"], raw["data"]["sources"][1]["ratio"] = 0.4, 0.3
    raw["data"]["sources"] += [
        {"path": "acme/notes", "ratio": 0.2},  # looks like a hub id, exists locally: local
        {"path": "notes.parquet", "text_field": "body", "ratio": 0.1, "label": "pq"},
    ]
    recipe_path = tiny_workdir / "mix.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    r = run_cli("data", "--recipe", str(recipe_path), cwd=tiny_workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tiny_workdir / "datasets/tiny-mix"
    manifest = json.loads((out / "manifest.json").read_text())
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    assert set(ds) == {"train", "eval"}
    assert len(ds["train"]) == 192 and len(ds["eval"]) == 16
    assert ds["train"].features["input_ids"].feature.dtype == "int32"
    n = 192
    by_label = {s["label"]: s for s in manifest["sources"]}
    assert set(by_label) == {"docs", "code", "notes", "pq"}
    assert by_label["notes"]["kind"] == "disk" and by_label["notes"]["content"] == "text"
    assert by_label["pq"]["kind"] == "parquet" and by_label["docs"]["content"] == "formatting"
    assert by_label["code"]["content"] == "tokens"
    for s in manifest["sources"]:
        assert abs(s["realized_ratio"] - s["requested_ratio"]) <= 1 / n + 0.01
        assert s["realized_ratio"] == s["train_rows"] / n
        # progress: one summary line per source with requested -> realized ratio
        assert (
            f"[data] {s['label']}: ratio {s['requested_ratio']:.4f} -> {s['realized_ratio']:.4f}" in r.stdout
        )
    assert sum(s["train_rows"] for s in manifest["sources"]) == n
    assert manifest["vocab_size"] == len(_tokenizer(tiny_workdir))
    assert manifest["eos_token_id"] == manifest["pad_token_id"] == _tokenizer(tiny_workdir).eos_token_id
    assert "using eos" in r.stdout  # the pad fallback is said
    # work scales with the share: the docs source (2904 documents) is read only in part
    assert by_label["docs"]["documents_read"] < by_label["docs"]["documents_in_source"] / 5
    # rows hold the tokens the manifest reports; bfd_split segments are pieces of single documents
    rows = list(ds["train"]) + list(ds["eval"])
    assert sum(len(r["input_ids"]) for r in rows) == manifest["totals"]["tokens_used"]
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    docs = _documents(tiny_workdir)
    valid = _pieces(docs["docs"] + docs["code"], 128)
    known = [seg for seg in _segments(rows) if seg in valid]
    assert len(known) > 0.6 * len(_segments(rows))  # the rest are the two notes sources
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "data" and "source.docs.fingerprint" in prov["inputs"]


def test_bfd_split_loses_no_token_and_no_segment_spans_two_documents(tiny_workdir, monkeypatch):
    """bfd_split loses no token and splits no segment across documents (both tiny sources, two processes)."""
    recipe = _recipe(tiny_workdir, "data.max_length=64", "data.num_proc=2", monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    encoder = Encoder(tok)
    docs = _documents(tiny_workdir)
    work = tiny_workdir / "work"
    work.mkdir()
    for src in open_sources(recipe.data.sources):
        everything = np.arange(len(src.rows))
        part, lengths, _ = tokenize_and_pack(src, encoder, everything, recipe.data, work, f"t{src.index}")
        rows = _rows(part)
        expected = docs[src.label]
        # multiset of tokens: packed output == documents + eos
        assert Counter(t for r in rows for t in r["input_ids"]) == Counter(t for d in expected for t in d)
        assert sorted(lengths.tolist()) == sorted(len(d) for d in expected)
        # every segment is a piece of exactly one document, and all pieces are there
        assert Counter(_segments(rows)) == _pieces(expected, 64)
        assert sum(r["n_docs"] for r in rows) == len(expected)


def test_wrapped_and_truncate_report_honest_segments(tiny_workdir, monkeypatch):
    """wrapped rows cut documents anywhere: segments restart at each document and row start."""
    recipe = _recipe(tiny_workdir, "data.max_length=64", "data.packing=wrapped", monkeypatch=monkeypatch)
    encoder = Encoder(load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code))
    src = open_sources(recipe.data.sources)[1]  # code: documents up to 4496 tokens
    docs = _documents(tiny_workdir)["code"][:300]
    (tiny_workdir / "w").mkdir()
    part, _, _ = tokenize_and_pack(src, encoder, np.arange(300), recipe.data, tiny_workdir / "w", "w")
    rows = _rows(part)
    stream = [t for d in docs for t in d]
    assert [t for r in rows for t in r["input_ids"]] == stream
    doc_bounds = set(np.cumsum([0] + [len(d) for d in docs]).tolist())
    row_bounds = set(np.cumsum([0] + [len(r["input_ids"]) for r in rows]).tolist())
    seg_bounds = set(np.cumsum([0] + [n for r in rows for n in r["seq_lengths"]]).tolist())
    assert seg_bounds == doc_bounds | row_bounds

    recipe = _recipe(tiny_workdir, "data.max_length=64", "data.packing=truncate")
    part, lengths, _ = tokenize_and_pack(src, encoder, np.arange(300), recipe.data, tiny_workdir / "w", "t")
    rows = _rows(part)
    assert len(rows) == 300
    assert all(
        r["seq_lengths"] == [len(r["input_ids"])] and r["input_ids"] == list(d[:64])
        for r, d in zip(rows, docs, strict=True)
    )
    assert int(np.maximum(lengths - 64, 0).sum()) > 0


def test_every_document_ends_with_exactly_one_eos(tiny_workdir, monkeypatch):
    import pyarrow as pa
    from tokenizers.processors import TemplateProcessing

    recipe = _recipe(tiny_workdir, monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    eos, eos_text = tok.eos_token_id, tok.eos_token
    plain = Encoder(tok).encode(["hello world", f"ends with eos{eos_text}", ""])
    assert [d.count(eos) for d in plain] == [1, 1, 1] and all(d[-1] == eos for d in plain)
    # the eos string in the text is text: its characters are encoded, then the one real eos follows
    assert tok.decode(plain[1][:-1]) == f"ends with eos{eos_text}"
    # a tokenizer that appends eos itself: still exactly one
    tok2 = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    tok2.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos_text}", special_tokens=[(eos_text, eos)]
    )
    assert tok2("hello world")["input_ids"][-1] == eos
    assert Encoder(tok2).encode(["hello world"]) == [plain[0]]
    both = Encoder(tok2).encode([f"ends with eos{eos_text}"])  # text eos + tokenizer eos
    assert both == [plain[1]] and both[0].count(eos) == 1
    # pre-tokenized: eos appended only where missing
    table = Encoder(tok).from_ids(pa.chunked_array([pa.array([[5, 6, eos], [7, 8], []])]))
    assert table.column("input_ids").to_pylist() == [[5, 6, eos], [7, 8, eos], [eos]]
    assert table.column("special_text").to_pylist() == [0, 0, 0]
    assert table.column("doc_start").to_pylist() == [[1, 0, 0], [1, 0, 0], [1]]


def test_gigatoken_path_serves_a_tokenizer_json_with_its_post_processor(tiny_workdir, monkeypatch):
    """An HF tokenizer.json (byte-level BPE) goes through GigaToken once its ids matched
    `tokenizer(texts, split_special_tokens=True)`: special strings in text stay text, and what the
    post-processor adds around a text (here an eos) is added too."""
    from tokenizers.processors import TemplateProcessing

    recipe = _recipe(tiny_workdir, monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    eos_text = tok.eos_token
    texts = ["hello world", f"a{eos_text}b ends{eos_text}", "", None, "ünïcode  spaces\n\ttabs" * 50]
    slow = Encoder(tok).encode(texts)
    encoder = Encoder(tok)
    assert encoder.choose_path(texts) == tok([t or "" for t in texts], split_special_tokens=True)["input_ids"]
    assert encoder.path == "gigatoken" and "tokenizer.json" in encoder.giga.about
    assert encoder.encode(texts) == slow
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos_text}", special_tokens=[(eos_text, tok.eos_token_id)]
    )
    encoder = Encoder(tok)
    expected = encoder.end_with_eos(encoder.choose_path(texts))
    assert encoder.path == "gigatoken" and encoder.giga.suffix == [tok.eos_token_id]
    assert encoder.encode(texts) == expected == slow


def test_gigatoken_reads_a_tokenizer_json_with_its_model_carried_as_text(tiny_workdir, monkeypatch):
    """The tokenizer.json handed to GigaToken: its top-level entries parsed and edited, its model (vocab
    and merges) carried as text, equal to a whole parse; a text where "model" is not the last key, or is
    pretty-printed, gives the same entries."""
    from openseek_cpt.data.giga import _split_model

    recipe = _recipe(tiny_workdir, monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    text = tok.backend_tokenizer.to_str()
    whole = json.loads(text)
    for variant in (
        text,
        json.dumps(whole, indent=2),
        json.dumps({"model": whole["model"], **{k: v for k, v in whole.items() if k != "model"}}),
    ):
        head, model = _split_model(variant)
        assert {**head, "model": json.loads(model)} == whole
        assert json.loads(json.dumps(head)[:-1] + ',"model":' + model + "}") == whole


def test_fast_backend_path_gives_the_tokenizers_own_ids(tiny_workdir, monkeypatch):
    """The Rust `encode_batch_fast` path is taken only after it matched `tokenizer(texts)`, and matches it."""
    from tokenizers.processors import TemplateProcessing

    from openseek_cpt.data import giga

    monkeypatch.setattr(giga, "load", lambda tokenizer, encoding: (None, "left out by this test"))
    recipe = _recipe(tiny_workdir, monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    eos_text = tok.eos_token
    texts = ["hello world", f"a{eos_text}b ends{eos_text}", "", None, "ünïcode  spaces\n\ttabs" * 50]
    encoder = Encoder(tok)
    slow = encoder.encode(texts)
    assert encoder.path == "tokenizer"
    reference = tok([t or "" for t in texts], split_special_tokens=True)["input_ids"]
    assert encoder.choose_path(texts) == reference
    assert encoder.path == "rust" and encoder.encode(texts) == slow
    # the tokenizer's own settings reach the fast path: an eos post-processor
    tok2 = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    tok2.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos_text}", special_tokens=[(eos_text, tok2.eos_token_id)]
    )
    encoder2 = Encoder(tok2)
    expected = encoder2.end_with_eos(encoder2.choose_path(texts))
    assert encoder2.path == "rust" and encoder2.encode(texts) == expected == slow


def test_a_fast_path_that_disagrees_is_not_used_and_the_ids_stay_correct(tiny_workdir, monkeypatch):
    """A backend whose ids differ from tokenizer(texts) is not used: the fallback is said and correct."""
    from openseek_cpt.data import giga

    monkeypatch.setattr(giga, "load", lambda tokenizer, encoding: (None, "left out by this test"))
    recipe = _recipe(tiny_workdir, monkeypatch=monkeypatch)
    tok = load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code)
    texts = ["Hello World", "MiXeD case text", "lower"]
    right = Encoder(tok).encode(texts)
    encoder = Encoder(tok)
    # A backend that lowercases where tokenizer(texts) does not (as a stale converted vocabulary would).
    original = tok._tokenizer.encode_batch_fast

    def lowered(batch, add_special_tokens=True):
        return original([t.lower() for t in batch], add_special_tokens=add_special_tokens)

    monkeypatch.setattr(
        type(tok._tokenizer), "encode_batch_fast", lambda self, b, **kw: lowered(b, **kw), raising=False
    )
    encoder.choose_path(texts)
    assert encoder.path == "tokenizer" and "rust path disagrees" in encoder.path_note
    assert encoder.encode(texts) == right


def test_same_recipe_is_byte_identical_and_seed_changes_order(tiny_workdir, monkeypatch):
    """The same recipe gives identical data files (arrow, state, info, manifest); another seed reorders."""
    monkeypatch.chdir(tiny_workdir)
    first = data.run(**_recipe(tiny_workdir, "data.output_dir=datasets/a").stage_args("data"))
    second = data.run(**_recipe(tiny_workdir, "data.output_dir=datasets/b").stage_args("data"))
    other = data.run(**_recipe(tiny_workdir, "data.output_dir=datasets/c", "seed=7").stage_args("data"))
    files = sorted(
        p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "provenance.json"
    )
    assert any(f.suffix == ".arrow" for f in files)
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    prov = [json.loads((d / "provenance.json").read_text()) for d in (first, second)]
    assert prov[0]["fingerprint"] == prov[1]["fingerprint"]
    arrow = Path("train/data-00000-of-00001.arrow")
    assert (first / arrow).read_bytes() != (other / arrow).read_bytes()


def test_short_source_is_upsampled_with_whole_repeats_and_reported(tiny_workdir, monkeypatch):
    from datasets import Dataset, load_from_disk

    monkeypatch.chdir(tiny_workdir)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    texts = [f"doc {i}: " + " ".join(words[(i + k) % 10] for k in range(60)) + f" doc {i}" for i in range(12)]
    Dataset.from_dict({"text": texts}).save_to_disk("few")
    recipe = _recipe(tiny_workdir, "data.sources.1={path: few, ratio: 0.3}", "data.eval_size=0")
    manifest = json.loads((data.run(**recipe.stage_args("data")) / "manifest.json").read_text())
    few = manifest["sources"][1]
    available = few["rows_available"]
    assert few["upsampled"] and few["train_rows"] == 58 and 58 / 4 <= available < 58
    assert few["times_repeated"] == round(58 / available, 4) and few["realized_ratio"] == 58 / 192
    train = load_from_disk("datasets/tiny-mix")["train"]
    counts = Counter(tuple(r) for r in train["input_ids"])
    # whole repeats first, then a random rest without replacement: each row 58 // available or one more
    assert {n for row, n in counts.items() if n > 1} <= {58 // available, 58 // available + 1}
    # tokens trained more than once: the split's tokens minus those of its distinct rows (only `few` repeats)
    repeated = sum(len(r) * n for r, n in counts.items()) - sum(len(r) for r in counts)
    assert few["tokens_repeated"] == manifest["totals"]["tokens_repeated"] == repeated > 0


def test_a_source_repeated_more_than_max_repetition_is_a_one_line_error(tiny_workdir, monkeypatch):
    """5 tiny documents cannot fill 58 rows without repeating one row 58 times: a one-line error."""
    from datasets import Dataset

    monkeypatch.chdir(tiny_workdir)
    Dataset.from_dict({"text": [f"tiny doc {i}" for i in range(5)]}).save_to_disk("few")
    with pytest.raises(UserError) as info:
        data.run(
            **_recipe(tiny_workdir, "data.sources.1={path: few, ratio: 0.3}", "data.eval_size=0").stage_args(
                "data"
            )
        )
    message = str(info.value)
    assert "\n" not in message and "data.sources.1 (few, few)" in message
    assert (
        "58 train rows" in message
        and "packs into 1" in message
        and "58.0x > data.max_repetition=4" in message
    )
    assert not Path("datasets/tiny-mix").exists()
    # raising the limit is the user's explicit choice
    recipe = _recipe(
        tiny_workdir, "data.sources.1={path: few, ratio: 0.3}", "data.eval_size=0", "data.max_repetition=60"
    )
    assert (
        json.loads((data.run(**recipe.stage_args("data")) / "manifest.json").read_text())["sources"][1][
            "times_repeated"
        ]
        == 58
    )


def _bad(workdir: Path, *args: str):
    r = run_cli("data", "--recipe", str(TINY_RECIPE), *args, cwd=workdir)
    return r


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["data.sources.0.ratio=0.7046"], "sum to 1.0046"),
        (["data.sources.1.ratio=0"], "data.sources.1.ratio=0"),
        (["data.sources.1.ratio=-0.3"], "must be > 0"),
        (["data.sources.0.path=data/missing.jsonl"], "does not exist"),
        (["data.sources.0.path=nosuchorg/nosuchset"], "no such local path either"),
        (["data.sources.0.formatting=null", "data.sources.0.text_field=content"], "columns: id, title, body"),
        (["data.sources.0.path=empty.jsonl"], "empty source"),
        (["data.max_length=0"], "data.max_length=0"),
        (["data.max_length=512"], "max_position_embeddings=256"),
        (["data.tokenizer_dir=no_eos_tokenizer"], "neither an eos nor a pad"),
        (["data.sources.0.formatting=no_such_module:fmt"], "does not import"),
        (["data.sources.0.formatting=openseek_cpt.testing.fixtures:nope"], "has no function 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_no_output(tiny_workdir, overrides, expect):
    """Bad input is one line on stderr, exit 2, and no output left behind."""
    (tiny_workdir / "empty.jsonl").write_text("")
    if "no_eos_tokenizer" in overrides[0]:
        tok = _tokenizer(tiny_workdir)
        tok.eos_token = None
        tok.pad_token = None
        tok.save_pretrained(str(tiny_workdir / "no_eos_tokenizer"))
    args = [a for o in overrides for a in ("--set", o)]
    r = _bad(tiny_workdir, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("openseek-cpt data: error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tiny_workdir / "datasets/tiny-mix").exists()
    assert not list((tiny_workdir / "datasets").glob(".*")) if (tiny_workdir / "datasets").exists() else True


def test_source_tokenized_with_another_vocab_is_refused(tiny_workdir, monkeypatch):
    from datasets import Dataset

    monkeypatch.chdir(tiny_workdir)
    Dataset.from_dict({"input_ids": [[1, 2, 10**6]]}).save_to_disk("alien")
    with pytest.raises(UserError, match="another tokenizer"):
        data.run(**_recipe(tiny_workdir, "data.sources.1={path: alien, ratio: 0.3}").stage_args("data"))
    assert not Path("datasets/tiny-mix").exists()
