"""Text sources: every document is text, or the source is refused naming the row; empty texts are
skipped and counted; a malformed line names its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RECIPE, run_cli


def _docs(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [
        {"text": f"doc {i}:\n" + " ".join(words[(i + k) % 10] for k in range(30 + i % 20))} for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(workdir: Path, source: str, *sets: str):
    args = ["--set", f"data.sources.1={source}", *(a for s in sets for a in ("--set", s))]
    return run_cli("data", "--recipe", str(TINY_RECIPE), *args, cwd=workdir)


def _one_line_error(r, *expect: str) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("openseek-cpt data: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for e in expect:
        assert e in errors[0], errors[0]
    return errors[0]


def _nothing_written(workdir: Path) -> None:
    assert not (workdir / "datasets/tiny-mix").exists()
    if (workdir / "datasets").exists():
        assert not list((workdir / "datasets").glob(".*"))


@pytest.mark.parametrize("value, found", [(5, "int"), (["a", "b"], "list")])
def test_a_json_row_whose_text_is_not_a_string_refuses_the_source(tiny_workdir, value, found):
    """One int or list text in 97 rows would make datasets store the column as JSON text: refused."""
    rows = _docs(97)
    rows[60]["text"] = value
    _write_jsonl(tiny_workdir / "mixed.jsonl", rows)
    _one_line_error(
        _data(tiny_workdir, "{path: mixed.jsonl, ratio: 0.3}"),
        "data.sources.1",
        "mixed.jsonl:61",
        f"holds {found}",
        "string",
    )
    _nothing_written(tiny_workdir)


def test_a_disk_source_whose_text_column_is_not_text_refuses_the_source(tiny_workdir):
    from datasets import Dataset

    Dataset.from_dict({"text": [None, None, 7, 8]}).save_to_disk(str(tiny_workdir / "ints"))
    _one_line_error(_data(tiny_workdir, "{path: ints, ratio: 0.3}"), "data.sources.1", "row 2", "int64")
    _nothing_written(tiny_workdir)


def test_empty_and_whitespace_texts_are_skipped_and_counted(tiny_workdir):
    """A null, empty or whitespace-only text is no document (never a lone eos): skipped, counted."""
    from datasets import load_from_disk

    rows = [
        {"text": f"short doc {i}"} for i in range(200)
    ]  # packs into fewer rows than its share: read whole
    for i in range(0, 200, 10):
        rows[i]["text"] = [None, "", "  \n\t "][i % 3]
    _write_jsonl(tiny_workdir / "holes.jsonl", rows)
    r = _data(tiny_workdir, "{path: holes.jsonl, ratio: 0.3}", "data.max_repetition=60")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tiny_workdir / "datasets/tiny-mix"
    manifest = json.loads((out / "manifest.json").read_text())
    holes = manifest["sources"][1]
    assert holes["documents_read"] == 200 and holes["documents_empty"] == 20
    assert manifest["sources"][0]["documents_empty"] == 0
    assert manifest["totals"]["documents_empty"] == 20
    ds = load_from_disk(str(out))
    eos = manifest["eos_token_id"]
    for split in ds.values():
        for row in split:
            start = 0
            for n in row["seq_lengths"]:
                assert row["input_ids"][start : start + n] != [eos]  # no eos-only document
                start += n


def test_a_malformed_jsonl_line_names_file_and_line(tiny_workdir):
    rows = [json.dumps(r) for r in _docs(50)]
    rows[36] = '{"text": "unterminated'
    (tiny_workdir / "broken.jsonl").write_text("\n".join(rows) + "\n")
    _one_line_error(_data(tiny_workdir, "{path: broken.jsonl, ratio: 0.3}"), "broken.jsonl:37", "JSON")
    _nothing_written(tiny_workdir)


def test_invalid_utf8_in_a_text_file_names_file_and_line(tiny_workdir):
    lines = [f"line {i} alpha beta gamma".encode() for i in range(50)]
    lines[11] = b"bad \xff\xfe bytes"
    (tiny_workdir / "bytes.txt").write_bytes(b"\n".join(lines) + b"\n")
    _one_line_error(_data(tiny_workdir, "{path: bytes.txt, ratio: 0.3}"), "bytes.txt:12", "UTF-8")
    _nothing_written(tiny_workdir)


def test_the_sample_check_tokenizes_a_bounded_prefix_of_long_documents(tiny_workdir, monkeypatch):
    """The estimate and fast-path check run in the main process on each sample document's prefix
    only (a 50 MB one-line document took ~12 GB there); the estimate still follows the whole length."""
    from datasets import Dataset

    from openseek_cpt.data import prepare
    from openseek_cpt.data.encoder import Encoder
    from openseek_cpt.data.packing import get
    from openseek_cpt.data.sources import open_sources
    from openseek_cpt.data.tokenizer import load_tokenizer
    from tests.data.test_data import _recipe

    monkeypatch.chdir(tiny_workdir)
    texts = [" ".join(f"word{i % 97} alpha beta" for i in range(n)) for n in (30_000, 60_000, 50)]
    Dataset.from_dict({"text": texts}).save_to_disk("long")
    recipe = _recipe(tiny_workdir, "data.sources.1={path: long, ratio: 0.3}")
    src = open_sources(recipe.data.sources)[1]
    encoder = Encoder(load_tokenizer(recipe.tokenizer_dir, recipe.assets.tokenizer_trust_remote_code))
    seen: list[int] = []
    original = encoder.choose_path
    monkeypatch.setattr(encoder, "choose_path", lambda t: seen.extend(map(len, t)) or original(t))
    estimate = prepare.estimate_tokens_per_doc(src, encoder, np.arange(3), 10**9, get("bfd_split"))
    assert max(len(t) for t in texts) > 1_000_000 and max(seen) <= 100_000, seen
    exact = np.mean([len(x) + 1 for x in encoder.reference_ids(texts)])
    assert abs(estimate - exact) < 0.02 * exact, (estimate, exact)


def test_a_streamed_json_row_whose_text_is_not_a_string_refuses_the_source(tiny_workdir):
    rows = _docs(97)
    rows[60]["text"] = 5
    (tiny_workdir / "streamed").mkdir()
    _write_jsonl(tiny_workdir / "streamed/part-0.jsonl", rows)
    _one_line_error(
        _data(tiny_workdir, "{path: streamed, ratio: 0.3, streaming: true}"),
        "data.sources.1",
        "part-0.jsonl:61",
        "holds int",
    )
    _nothing_written(tiny_workdir)


def test_a_malformed_line_in_a_folder_source_names_file_and_line(tiny_workdir):
    rows = [json.dumps(r) for r in _docs(40)]
    rows[4] = "{not json"
    (tiny_workdir / "parts").mkdir()
    (tiny_workdir / "parts/part-0.jsonl").write_text("\n".join(rows) + "\n")
    _one_line_error(_data(tiny_workdir, "{path: parts, ratio: 0.3}"), "part-0.jsonl:5", "JSON")
    _nothing_written(tiny_workdir)
