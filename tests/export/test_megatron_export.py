"""export-megatron (export/megatron.py): each document segment becomes one Megatron document, through the
API and the CLI, and the real pipeline `data` -> Megatron files -> a Megatron source gives the same documents."""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import yaml
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.artifacts import megatron_format
from openseek_cpt.export.megatron import export_megatron
from openseek_cpt.testing import megatron_files

ROWS = [[5, 6, 7, 1, 8, 9, 1], [10, 11, 12, 13, 1], [2, 1, 3, 3, 1, 4, 1, 0]]
SEGMENTS = [[4, 3], [5], [2, 3, 2, 1]]


def segments_of(rows, seq_lengths):
    """The documents a packed split holds, in order: each row cut at its seq_lengths."""
    out = []
    for row, lengths in zip(rows, seq_lengths, strict=True):
        start = 0
        for n in lengths:
            out.append(list(row[start : start + n]))
            start += n
    return out


def make_prepared(root: Path, rows=ROWS, segments=SEGMENTS, manifest=None) -> Path:
    """A prepared dataset as the data stage writes it: DatasetDict train/eval + manifest.json."""
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": rows, "seq_lengths": segments}),
            "eval": datasets.Dataset.from_dict({"input_ids": rows[:1], "seq_lengths": segments[:1]}),
        }
    )
    out = root / "prepared"
    dd.save_to_disk(str(out))
    manifest = {"max_length": 8, "vocab_size": 64, "pad_token_id": 0} if manifest is None else manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_export_then_read_gives_each_document_segment_with_its_tokens(tmp_path):
    prepared = make_prepared(tmp_path)
    prefix = export_megatron(prepared, tmp_path / "out" / "mix_text_document")
    docs = megatron_files.read_documents(prefix)
    assert docs["input_ids"][:] == segments_of(ROWS, SEGMENTS)
    assert docs.features["input_ids"].feature.dtype == "int32"
    index = megatron_format.read_index(prefix)
    assert index.dtype is np.uint16  # vocab 64 < 65500, as Megatron chooses
    assert list(index.document_indices) == list(range(len(docs) + 1))  # one document per segment
    sidecar = json.loads(Path(f"{prefix}.provenance.json").read_text())
    assert (sidecar["stage"], sidecar["format"], sidecar["vocab_size"], sidecar["dtype"]) == (
        "export", "megatron", 64, "uint16",
    )  # fmt: skip
    assert sidecar["inputs"]["dataset_dir"] == str(prepared) and sidecar["inputs"]["split"] == "train"


def test_export_of_the_eval_split_and_of_a_large_vocab_uses_int32(tmp_path):
    prepared = make_prepared(tmp_path, manifest={"vocab_size": 151851})
    prefix = export_megatron(prepared, tmp_path / "ev", split="eval")
    assert megatron_format.read_index(prefix).dtype is np.int32
    assert Path(f"{prefix}.bin").stat().st_size == 4 * len(ROWS[0])
    docs = megatron_files.read_documents(prefix)
    assert docs["input_ids"][:] == segments_of(ROWS[:1], SEGMENTS[:1])


def test_vocab_size_falls_back_to_max_token_id_plus_one(tmp_path, caplog, monkeypatch):
    # logs.setup() (run by an in-process CLI test) stops propagation to the root logger caplog hooks.
    monkeypatch.setattr(logging.getLogger("openseek_cpt"), "propagate", True)
    prepared = make_prepared(tmp_path, manifest={})
    prefix = export_megatron(prepared, tmp_path / "p")
    assert json.loads(Path(f"{prefix}.provenance.json").read_text())["vocab_size"] == 14
    assert "max token id + 1" in caplog.text


# --- through the CLI ---------------------------------------------------------------------------


def test_cli_export_megatron_writes_files_and_bad_input_exits_2(tmp_path):
    prepared = make_prepared(tmp_path)
    r = run_cli("export-megatron", str(prepared), "out/mix", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    docs = megatron_files.read_documents(tmp_path / "out" / "mix")
    assert docs["input_ids"][:] == segments_of(ROWS, SEGMENTS)

    r = run_cli(
        "export-megatron", str(prepared), "out/mix", "--split", "validation", cwd=tmp_path, timeout=300
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "openseek-cpt export-megatron: error: DATASET_DIR: "
        f"{prepared} has no split 'validation' (has ['eval', 'train'])"
    ]
    r = run_cli("export-megatron", str(tmp_path / "out"), "x", cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is not a prepared dataset" in r.stderr


# --- the pipeline ------------------------------------------------------------------------------


def _recipe_reading(workdir: Path, prefix: str, output_dir: str, documents: int) -> Path:
    """The tiny recipe with one Megatron source, one row per document (no packing, no sampling)."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["data"].update(
        output_dir=output_dir,
        packing="truncate",
        total_sample_size=documents,
        eval_size=0,
        num_proc=1,
        sources=[{"path": prefix, "ratio": 1.0}],  # type auto: PREFIX.bin + PREFIX.idx -> megatron
    )
    path = workdir / f"{Path(output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_prepared_mix_round_trips_through_megatron_files(tiny_workdir):
    r = run_cli(
        "data", "--recipe", str(TINY_RECIPE), "--set", "data.megatron_prefix=datasets/tiny-mix-megatron",
        cwd=tiny_workdir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("export-megatron", "datasets/tiny-mix", "export/mix_text_document", cwd=tiny_workdir)
    assert r.returncode == 0, r.stderr
    prefix = tiny_workdir / "export" / "mix_text_document"
    for ext in ("bin", "idx"):  # the data stage's `megatron_prefix` and the command write the same files
        assert (
            Path(f"{prefix}.{ext}").read_bytes()
            == (tiny_workdir / f"datasets/tiny-mix-megatron.{ext}").read_bytes()
        )

    train = datasets.load_from_disk(str(tiny_workdir / "datasets" / "tiny-mix"))["train"]
    expected = segments_of(train["input_ids"], train["seq_lengths"])
    exported = megatron_files.read_documents(prefix)["input_ids"][:]
    assert exported == expected

    recipe = _recipe_reading(tiny_workdir, str(prefix), "datasets/roundtrip", len(expected))
    r = run_cli("data", "--recipe", str(recipe), cwd=tiny_workdir)
    assert r.returncode == 0, r.stderr
    again = datasets.load_from_disk(str(tiny_workdir / "datasets" / "roundtrip"))["train"]
    rows = [tuple(x) for x in again["input_ids"]]
    assert collections.Counter(rows) == collections.Counter(tuple(d) for d in expected)


def test_data_stage_rejects_a_truncated_megatron_source_in_one_line(tiny_workdir):
    prefix = tiny_workdir / "corpus_text_document"
    megatron_files.write_documents(prefix, [list(range(1, 20)), list(range(3, 9))], vocab_size=512)
    bin_path = Path(f"{prefix}.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    recipe = _recipe_reading(tiny_workdir, str(prefix), "datasets/broken", 2)
    r = run_cli("data", "--recipe", str(recipe), cwd=tiny_workdir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "sequence 1 ends at byte 50" in lines[0] and "truncated .bin" in lines[0]
    assert not (tiny_workdir / "datasets" / "broken").exists()
