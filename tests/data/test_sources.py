"""Source kinds (data/readers.py): each is read in place, only as far as its share needs, and fingerprinted.

A new source kind gets its `Reader` entry in readers.py and its tests here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openseek_cpt.data import rows as source_rows
from openseek_cpt.data import stage as data
from openseek_cpt.data.config import SOURCE_TYPES
from openseek_cpt.data.readers import READERS
from openseek_cpt.errors import UserError
from tests.data.test_data import _recipe


def test_the_recipe_accepts_every_selectable_source_kind_of_the_table_and_no_other():
    from openseek_cpt.config import load_recipe

    assert ("auto", *(name for name, r in READERS.items() if r.selectable)) == SOURCE_TYPES
    for kind in SOURCE_TYPES:
        assert (
            load_recipe(None, [f"data.sources=[{{path: x, ratio: 1.0, type: {kind}}}]"]).data.sources[0].type
            == kind
        )
    with pytest.raises(UserError, match="is not one of auto"):
        load_recipe(None, ["data.sources=[{path: x, ratio: 1.0, type: folder}]"])


def test_megatron_prefix_is_a_source_and_an_export(tiny_workdir, monkeypatch):
    from datasets import load_from_disk

    from openseek_cpt.testing import megatron_files

    monkeypatch.chdir(tiny_workdir)
    code = load_from_disk("models/tiny/sources/code")
    megatron_files.write_documents("meg/code", (np.asarray(x) for x in code["input_ids"]), 1024)
    recipe = _recipe(tiny_workdir, "data.sources.1.path=meg/code", "data.megatron_prefix=meg/out")
    manifest = json.loads((data.run(**recipe.stage_args("data")) / "manifest.json").read_text())
    assert manifest["sources"][1]["kind"] == "megatron"
    back = megatron_files.read_documents("meg/out")
    train = load_from_disk("datasets/tiny-mix")["train"]
    assert sum(len(x) for x in back["input_ids"]) == sum(len(x) for x in train["input_ids"])


def test_megatron_source_is_read_in_place_and_the_same_recipe_is_byte_identical(tiny_workdir, monkeypatch):
    """A Megatron shard is read in place (no copy in the datasets cache); two runs give the same bytes."""
    import datasets
    from datasets import load_from_disk

    from openseek_cpt.artifacts import megatron_format
    from openseek_cpt.testing import megatron_files

    monkeypatch.chdir(tiny_workdir)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tiny_workdir / "hf-cache")
    code = load_from_disk("models/tiny/sources/code")
    megatron_files.write_documents("meg/code", (np.asarray(x) for x in code["input_ids"]), 1024)
    outs = [
        data.run(
            **_recipe(
                tiny_workdir, "data.sources.1.path=meg/code", f"data.output_dir=datasets/{name}"
            ).stage_args("data")
        )
        for name in ("a", "b")
    ]
    files = sorted(
        p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "provenance.json"
    )
    assert any(f.suffix == ".arrow" for f in files)
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    meg = manifest["sources"][1]
    assert meg["kind"] == "megatron" and meg["documents_read"] < meg["documents_in_source"]
    cached = [p.relative_to(tiny_workdir / "hf-cache") for p in (tiny_workdir / "hf-cache").rglob("*.arrow")]
    assert all(p.parts[0] == "json" for p in cached), cached  # only the jsonl source's builder cache
    prov = json.loads((outs[0] / "provenance.json").read_text())
    assert prov["inputs"]["source.code.fingerprint"] == f"megatron:{megatron_format.fingerprint('meg/code')}"


def test_parquet_rows_read_only_the_row_groups_they_need_in_the_asked_order(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openseek_cpt.data.rows import ParquetRows

    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(100)], "n": list(range(100))}),
        tmp_path / "a.parquet",
        row_group_size=10,
    )
    pq.write_table(pa.table({"text": ["last"], "n": [100]}), tmp_path / "b.parquet")
    rows = ParquetRows([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert len(rows) == 101 and rows.column_names == ["text", "n"]
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or original(self, i, **kw)
    )
    table = rows.take([100, 95, 3, 3], ["text"])
    assert table.column_names == ["text"]
    assert table.column("text").to_pylist() == ["last", "row 95", "row 3", "row 3"]
    assert sorted(read) == [0, 0, 9]  # row groups 0 and 9 of a.parquet, 0 of b.parquet; not the other 8


def _write_jsonl_folder(folder: Path, files: int, docs_per_file: int) -> None:
    """A folder of jsonl files (what a hub dataset repo looks like to `load_dataset`)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    folder.mkdir()
    for f in range(files):
        lines = [
            json.dumps(
                {"text": f"doc {f}-{i}: " + " ".join(words[(i * 7 + k) % 10] for k in range(40 + i % 30))}
            )
            for i in range(docs_per_file)
        ]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")


def test_a_streamed_source_reads_only_what_its_share_needs_and_is_byte_identical(tiny_workdir, monkeypatch):
    """A source far larger than its share, streamed, is neither downloaded nor converted whole."""
    import datasets

    monkeypatch.chdir(tiny_workdir)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tiny_workdir / "hf-cache")

    # Small batches and buffer, so the stream is read in several rounds, as a real share's would be.
    monkeypatch.setattr(source_rows, "STREAM_BATCH", 64)
    monkeypatch.setattr(source_rows, "STREAM_BUFFER", 200)
    _write_jsonl_folder(tiny_workdir / "big", files=4, docs_per_file=1500)
    stream = "data.sources.1={path: big, ratio: 0.3, streaming: true}"
    outs = [
        data.run(**_recipe(tiny_workdir, stream, f"data.output_dir=datasets/{n}").stage_args("data"))
        for n in ("a", "b")
    ]
    files = sorted(
        p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.name != "provenance.json"
    )
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    src = manifest["sources"][1]
    assert src["kind"] == "json" and src["documents_in_source"] is None  # never read to its end
    assert src["train_rows"] == 58 and not src["upsampled"]
    assert 0 < src["documents_read"] < 6000 // 4, src["documents_read"]
    # The datasets cache holds nothing: the other jsonl source is read in place, `big` as a stream.
    assert not list((tiny_workdir / "hf-cache").rglob("*.arrow"))
    other = data.run(
        **_recipe(tiny_workdir, stream, "data.output_dir=datasets/c", "seed=7").stage_args("data")
    )
    arrow = Path("train/data-00000-of-00001.arrow")
    assert (outs[0] / arrow).read_bytes() != (other / arrow).read_bytes()


def test_a_streamed_source_shorter_than_its_share_is_read_to_its_end_and_upsampled(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    _write_jsonl_folder(tiny_workdir / "small", files=2, docs_per_file=6)
    recipe = _recipe(
        tiny_workdir,
        "data.sources.1={path: small, ratio: 0.3, streaming: true}",
        "data.eval_size=0",
        "data.max_repetition=60",
    )
    src = json.loads((data.run(**recipe.stage_args("data")) / "manifest.json").read_text())["sources"][1]
    assert src["documents_in_source"] == src["documents_read"] == 12
    assert src["upsampled"] and src["train_rows"] == 58


def test_a_stream_that_fails_midway_is_a_one_line_error_naming_the_source(tiny_workdir, monkeypatch):
    """A malformed line far into a streamed file is met only when the stream gets there: still one line."""
    monkeypatch.chdir(tiny_workdir)
    monkeypatch.setattr(source_rows, "STREAM_BATCH", 16)
    monkeypatch.setattr(source_rows, "STREAM_BUFFER", 32)
    _write_jsonl_folder(tiny_workdir / "bad", files=2, docs_per_file=300)
    good, bad = sorted((tiny_workdir / "bad").glob("*.jsonl"))  # the first row is peeked from `good`
    good.write_text("\n".join(good.read_text().splitlines()[:20]) + "\n")  # too few for the share
    lines = bad.read_text().splitlines()
    lines[100] = "{this is not json"
    bad.write_text("\n".join(lines) + "\n")
    recipe = _recipe(
        tiny_workdir, "data.sources.1={path: bad, ratio: 0.3, streaming: true}", "data.eval_size=0"
    )
    with pytest.raises(UserError) as info:
        data.run(**recipe.stage_args("data"))
    message = str(info.value)
    assert (
        "\n" not in message
        and "data.sources.1.path='bad'" in message
        and "the stream failed after" in message
        and f"{bad.name}:101: not valid JSON" in message
    )
    assert not (tiny_workdir / "datasets").exists() or not any((tiny_workdir / "datasets").iterdir())


def test_streaming_a_source_that_is_read_in_place_is_a_one_line_error(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    with pytest.raises(UserError) as info:
        data.run(**_recipe(tiny_workdir, "data.sources.1.streaming=true").stage_args("data"))
    message = str(info.value)
    assert "\n" not in message and "data.sources.1.streaming=true" in message and "disk source" in message


def _one_source(workdir: Path, path: str, **keys):
    return _recipe(
        workdir,
        f"data.sources=[{{path: {path}, ratio: 1.0{''.join(f', {k}: {v}' for k, v in keys.items())}}}]",
    )


def test_a_directory_of_several_kinds_of_data_files_is_refused_naming_them(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    folder = tiny_workdir / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "one document"}) + "\n")
    (folder / "b.txt").write_text("a line of text\n")
    (folder / "README.md").write_text("# notes\n")
    with pytest.raises(UserError) as err:
        data.run(**_one_source(tiny_workdir, "mixed").stage_args("data"))
    assert (
        "data.sources.0.path='mixed' holds data files of several kinds (json: a.jsonl; text: b.txt)"
        in str(err.value)
    )


def test_a_directory_read_as_one_kind_names_the_files_it_leaves_out(tiny_workdir, monkeypatch, caplog):
    """One kind of data file (jsonl) beside a README.md: the jsonl files are read in place, and the
    README is named as left out; `type: json` on a mixed directory reads its json and names the rest."""
    import logging

    monkeypatch.chdir(tiny_workdir)
    folder = tiny_workdir / "docs"
    (folder / "more").mkdir(parents=True)
    docs = (tiny_workdir / "models/tiny/sources/docs.jsonl").read_text().splitlines()
    (folder / "a.jsonl").write_text("\n".join(docs[:150]) + "\n")
    (folder / "more/b.jsonl").write_text("\n".join(docs[150:]) + "\n")
    (folder / "README.md").write_text("# notes\n")
    (folder / "c.txt").write_text("not read\n")
    caplog.set_level(logging.INFO)
    out = data.run(**_one_source(tiny_workdir, "docs", type="json", text_field="body").stage_args("data"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["kind"] == "json"
    assert manifest["sources"][0]["documents_in_source"] == len(docs)
    assert "reading the json files of docs; left out: README.md, c.txt" in caplog.text


def test_a_source_whose_every_document_is_empty_is_named(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    (tiny_workdir / "blank.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", "\n\t", None])
    )
    with pytest.raises(UserError) as err:
        data.run(**_one_source(tiny_workdir, "blank.jsonl").stage_args("data"))
    assert "data.sources.0.path='blank.jsonl': every document read (4) is empty or whitespace only" in str(
        err.value
    )


def test_json_lines_longer_than_arrows_block_are_read(tmp_path):
    """Arrow's JSON reader parses 1 MiB blocks and refuses a line that straddles two: a 3 MB document
    is read whole, beside short ones, in the order asked."""
    docs = ["short", "x" * 3_000_000, "another"]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rows = source_rows.JsonLinesRows([tmp_path / "long.jsonl"], "data.sources.0", "long.jsonl")
    assert rows.take([2, 1, 0], ["text"]).column("text").to_pylist() == docs[::-1]


def _text_source(path: Path):
    from types import SimpleNamespace

    src = SimpleNamespace(path=str(path), streaming=False)
    return READERS["text"].load(src, "data.sources.0", str(path), "text")[0]


def test_text_files_are_read_in_place_with_the_rows_datasets_text_builder_makes(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_bytes(
        "\ufefffirst line\nsecond\r\nthird\rfourth\n\n\nlast, no line end: café 中文".encode()
    )
    (tmp_path / "docs/b.txt").write_bytes(b"\r\n\rx\r\n")
    rows = _text_source(tmp_path / "docs")
    assert isinstance(rows, source_rows.TextLinesRows) and not (tmp_path / "cache").exists()
    files = [str(tmp_path / "docs/a.txt"), str(tmp_path / "docs/b.txt")]
    expected = datasets.load_dataset("text", data_files=files, split="train", cache_dir=str(tmp_path / "ds"))
    assert len(rows) == len(expected) == 10
    order = [9, 0, 3, 3, 6, 7, 8, 1]
    assert rows.take(order, ["text"]).column("text").to_pylist() == [expected[i]["text"] for i in order]


def test_a_text_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    rows = _text_source(tmp_path / "a.txt")
    assert rows.take([1, 0], ["text"]).column("text").to_pylist() == ["also fine", "fine"]
    with pytest.raises(UserError, match=r"a\.txt:3 is not UTF-8; fix or drop that line"):
        rows.take([0, 2])


def test_a_json_document_is_read_without_the_datasets_cache_and_a_bad_one_is_named(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs.json").write_text(
        json.dumps([{"text": f"doc {i}", "n": i} for i in range(5)], indent=1)
    )
    src = SimpleNamespace(path=str(tmp_path / "docs.json"), streaming=False)
    rows = READERS["json"].load(src, "data.sources.0", src.path, "json")[0]
    assert rows.take([4, 1], ["text"]).column("text").to_pylist() == ["doc 4", "doc 1"]
    assert not (tmp_path / "cache").exists()
    (tmp_path / "docs.json").write_text(json.dumps({"text": "one object"}, indent=1))
    with pytest.raises(UserError, match=r"holds one JSON dict, not a list of objects"):
        READERS["json"].load(src, "data.sources.0", src.path, "json")
