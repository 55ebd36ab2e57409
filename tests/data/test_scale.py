"""The data stage at the real job's scale, without materialising it: offsets past 2**31, a 1 G-token
document, 30.7 B tokens in 7.5 M rows, and the bound on one document's size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.data import output, packing, prepare
from openseek_cpt.data.token_store import TokenStore

BIG = 3 * 2**30  # tokens: past int32 offsets (and past 2**32 bytes)


def test_token_offsets_past_2_31_do_not_wrap(tmp_path):
    """A token file of 3 Gi tokens (sparse: nothing written but the last document) gathers its last
    document from the right place."""
    store = TokenStore(tmp_path / "tokens.bin")
    store._file.truncate(4 * (BIG - 3))  # the first document's tokens, as a hole
    store._file.seek(4 * (BIG - 3))
    store.append(np.array([7, 8, 9], np.int32), np.array([BIG - 3, 3]))
    store._lengths = [np.array([BIG - 3, 3], np.int64)]
    assert store.close().sum() == BIG
    assert store.gather(np.array([1]), np.array([0]), np.array([3])).tolist() == [7, 8, 9]
    assert store.gather(np.array([0]), np.array([BIG - 4]), np.array([1])).tolist() == [0]


def test_a_one_g_token_document_packs_into_whole_rows_without_its_tokens():
    lengths = np.array([10**9, 5, 4096], np.int64)
    plan = packing.plan("bfd_split", lengths, 4096)
    assert plan.row_tokens().sum() == lengths.sum() and plan.row_tokens().max() == 4096
    assert plan.seg_start.max() == (10**9 // 4096) * 4096 and plan.seg_start.dtype == np.int64
    assert plan.row_documents().sum() == 3


def test_the_real_jobs_output_is_sharded_as_save_to_disk_would(tmp_path):
    rows, tokens = 7_500_000, 7_500_000 * 4096
    nbytes = output.split_nbytes(rows, tokens, 3 * rows)
    assert nbytes > 2**34  # ~123 GB: no int32 anywhere in the arithmetic
    writer = output.SplitWriter(tmp_path / "train", rows, nbytes, "fp")
    assert len(writer.sizes) == int(nbytes / 500_000_000) + 1 and sum(writer.sizes) == rows
    assert max(writer.sizes) - min(writer.sizes) <= 1


def test_megatron_rows_use_64_bit_offsets(tmp_path):
    from openseek_cpt.artifacts import megatron_format
    from openseek_cpt.testing import megatron_files

    prefix = tmp_path / "m"
    megatron_files.write_documents(str(prefix), [[1, 2, 3], [4]], vocab_size=100)
    index = megatron_format.read_index(str(prefix))
    table = megatron_format.read_rows(index, f"{prefix}.bin", np.array([1, 0]))
    assert str(table.schema.field("input_ids").type).startswith("large_list")
    assert table.column("input_ids").to_pylist() == [[4], [1, 2, 3]]


@pytest.mark.e2e
@pytest.mark.parametrize("megabytes, refused", [(50, False), (500, True)])
def test_a_50_mb_document_is_encoded_and_a_500_mb_one_refused_by_row(tiny_workdir, megabytes, refused):
    """One huge single-line document: 50 MB is encoded (rows of whole max_length pieces); 500 MB is over
    prepare.MAX_DOCUMENT_BYTES and refused naming its row, before its text is encoded."""
    import yaml

    word = "lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    text = word * (megabytes * 10**6 // len(word))
    with open(tiny_workdir / "huge.jsonl", "w") as f:
        f.write(json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": text}) + "\n")
    del text
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["data"]["sources"] = [{"path": "huge.jsonl", "ratio": 1.0}]
    raw["data"].update(total_sample_size=64, eval_size=0, output_dir="datasets/huge")
    (tiny_workdir / "huge.yaml").write_text(yaml.safe_dump(raw))
    r = run_cli("data", "--recipe", "huge.yaml", cwd=tiny_workdir)
    if refused:
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert "data.sources.0.path='huge.jsonl': the document at row 1 holds" in last
        assert f"{prepare.MAX_DOCUMENT_BYTES:,}" in last and "Traceback" not in r.stderr
        assert not (tiny_workdir / "datasets/huge").exists()
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        manifest = json.loads((tiny_workdir / "datasets/huge/manifest.json").read_text())
        assert manifest["totals"]["tokens_read"] > 5_000_000 and manifest["totals"]["tokens_dropped"] == 0


def test_small_token_files_give_the_same_dataset_and_are_deleted_as_written(tiny_workdir, monkeypatch):
    """Parts close at whole packing batches: many small token files pack and write exactly the rows one
    file gives, and the writer deletes each once its rows are out (none is left in the work dir)."""
    from openseek_cpt.data import stage
    from openseek_cpt.data.token_store import TokenStore
    from tests.data.test_data import _recipe

    monkeypatch.chdir(tiny_workdir)
    monkeypatch.setattr(packing, "PACK_BATCH", 16)  # parts close at multiples of it: many in a tiny mix
    deleted = []
    original = TokenStore.delete
    monkeypatch.setattr(TokenStore, "delete", lambda self: (deleted.append(self.path.name), original(self)))
    one = stage.run(**_recipe(tiny_workdir, "data.output_dir=datasets/one").stage_args("data"))
    files_one = len(deleted)
    monkeypatch.setattr(prepare, "PART_TOKENS", 2_000)
    many = stage.run(**_recipe(tiny_workdir, "data.output_dir=datasets/many").stage_args("data"))
    assert len(deleted) - files_one > 2 * files_one  # several token files per read round
    for f in sorted(p.relative_to(one) for p in one.rglob("*.arrow")):
        assert (one / f).read_bytes() == (many / f).read_bytes(), f
    assert not list(tiny_workdir.glob("datasets/*work*"))
