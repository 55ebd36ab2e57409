"""The real pipeline: `data` -> Megatron files -> a Megatron source in a recipe -> the same documents."""

from __future__ import annotations

import collections
from pathlib import Path

import datasets
import yaml
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.artifacts import megatron_format
from tests.artifacts.test_megatron_format import segments_of


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
    exported = megatron_format.read_documents(prefix)["input_ids"][:]
    assert exported == expected

    recipe = _recipe_reading(tiny_workdir, str(prefix), "datasets/roundtrip", len(expected))
    r = run_cli("data", "--recipe", str(recipe), cwd=tiny_workdir)
    assert r.returncode == 0, r.stderr
    again = datasets.load_from_disk(str(tiny_workdir / "datasets" / "roundtrip"))["train"]
    rows = [tuple(x) for x in again["input_ids"]]
    assert collections.Counter(rows) == collections.Counter(tuple(d) for d in expected)


def test_data_stage_rejects_a_truncated_megatron_source_in_one_line(tiny_workdir):
    prefix = tiny_workdir / "corpus_text_document"
    megatron_format.write_documents(prefix, [list(range(1, 20)), list(range(3, 9))], vocab_size=512)
    bin_path = Path(f"{prefix}.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    recipe = _recipe_reading(tiny_workdir, str(prefix), "datasets/broken", 2)
    r = run_cli("data", "--recipe", str(recipe), cwd=tiny_workdir)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "sequence 1 ends at byte 50" in lines[0] and "truncated .bin" in lines[0]
    assert not (tiny_workdir / "datasets" / "broken").exists()
