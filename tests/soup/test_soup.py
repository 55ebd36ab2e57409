"""The soup: exact mean, layout independence, loud refusal of bad inputs, evaluation option."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.soup import methods, numerics, pipeline
from openseek_cpt.soup import stage as soup
from openseek_cpt.soup.inputs import open_input
from openseek_cpt.soup.plan import account_keys, plan_keys

STEPS = (6, 12, 18)
BASE = "models/tiny-openseek"


@pytest.fixture(scope="module")
def soup_work(tiny_assets_dir, tmp_path_factory) -> Path:
    """A workdir with three perturbed checkpoints of the tiny base, single-file and sharded copies.

    runs/tiny/checkpoint-N: single model.safetensors; runs/sharded/checkpoint-N and
    models/tiny-openseek-sharded: the same weights saved with a small max_shard_size; and a tiny
    prepared dataset (datasets/tiny-mix, train/eval) for the evaluate option.
    """
    work = tmp_path_factory.mktemp("soup") / "work"
    shutil.copytree(tiny_assets_dir, work, symlinks=True)
    base = AutoModelForCausalLM.from_pretrained(work / BASE)
    base.save_pretrained(work / "models/tiny-openseek-sharded", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(work / BASE / name, work / "models/tiny-openseek-sharded" / name)
    for step in STEPS:
        model = AutoModelForCausalLM.from_pretrained(work / BASE)
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        model.save_pretrained(work / f"runs/tiny/checkpoint-{step}")
        model.save_pretrained(work / f"runs/sharded/checkpoint-{step}", max_shard_size="100KB")
    _tiny_eval_dataset(work / "datasets/tiny-mix")
    return work


def _tiny_eval_dataset(path: Path) -> None:
    from datasets import Dataset, DatasetDict

    gen = torch.Generator().manual_seed(0)
    rows = {"input_ids": [], "seq_lengths": []}
    for _ in range(6):
        rows["input_ids"].append(torch.randint(1, 1024, (48,), generator=gen).tolist())
        rows["seq_lengths"].append([20, 28])
    DatasetDict({"train": Dataset.from_dict(rows), "eval": Dataset.from_dict(rows)}).save_to_disk(str(path))


def _run_soup(work: Path, monkeypatch, *overrides: str) -> Path:
    monkeypatch.chdir(work)
    return work / soup.run(**load_recipe(TINY_RECIPE, ["soup.evaluate=false", *overrides]).stage_args("soup"))


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        out.update(load_file(model_dir / name))
    return out


def _reference_mean(dirs: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 sum over the inputs as stored, in input order, divided by n, rounded once to bf16.

    Keys the model class keeps in fp32 (the router's e_score_correction_bias) stay fp32.
    """
    per_input = [_tensors(d) for d in dirs]
    ref = {}
    for key in per_input[0]:
        acc = torch.zeros(per_input[0][key].shape, dtype=torch.float32)
        for tensors in per_input:
            acc += tensors[key].float()
        keep_fp32 = any(p in key.split(".") for p in DeepseekV3ForCausalLM._keep_in_fp32_modules_strict)
        ref[key] = acc / len(dirs) if keep_fp32 else (acc / len(dirs)).to(torch.bfloat16)
    return ref


def test_soup_equals_the_fp32_mean_rounded_to_bf16_and_loads_strictly(soup_work, monkeypatch, tmp_path):
    out = _run_soup(soup_work, monkeypatch)
    inputs = [soup_work / BASE, *(soup_work / f"runs/tiny/checkpoint-{s}" for s in STEPS)]
    ref = _reference_mean(inputs)
    got = _tensors(out)
    assert sorted(got) == sorted(ref) and "lm_head.weight" not in got  # tied: not stored
    for key in ref:
        assert got[key].dtype == (torch.float32 if "e_score_correction_bias" in key else torch.bfloat16)
        assert torch.equal(got[key], ref[key]), key
    # Not a trivial mean: the soup differs from the base and from each checkpoint.
    base = _tensors(inputs[0])["model.norm.weight"].to(torch.bfloat16)
    assert not torch.equal(got["model.norm.weight"], base)

    # It loads strictly, and the live (converted: fused MoE experts) weights equal those of the
    # reference mean saved and loaded through the same path.
    soup_model, info = AutoModelForCausalLM.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copy(out / "config.json", ref_dir / "config.json")
    save_file(ref, ref_dir / "model.safetensors", metadata={"format": "pt"})
    ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype="auto")
    live, want = soup_model.state_dict(), ref_model.state_dict()
    assert any("gate_up_proj" in k for k in live)  # the live layout differs from the files
    assert sorted(live) == sorted(want)
    for key in want:
        assert live[key].dtype == want[key].dtype and torch.equal(live[key], want[key]), key
    assert soup_model.lm_head.weight.data_ptr() == soup_model.model.embed_tokens.weight.data_ptr()

    info = json.loads((out / "merge_info.json").read_text())
    assert [i["step"] for i in info["inputs"]] == [None, *STEPS]
    assert info["inputs"][1]["files"]["model.safetensors"] == _sha256(inputs[1] / "model.safetensors")
    assert set(info["key_counts"].values()) == {4}
    assert info["dtype"] == "bfloat16" and info["skipped_keys"] == [] and info["non_float_keys"] == []
    assert info["fp32_keys"] == [k for k in sorted(ref) if "e_score_correction_bias" in k]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "provenance.json").is_file()


def _sha256(path: Path) -> str:
    from openseek_cpt.artifacts.provenance import sha256_file

    return sha256_file(path)


def test_sharded_and_single_file_inputs_give_the_same_soup(soup_work, monkeypatch):
    single = _run_soup(soup_work, monkeypatch, "soup.output_dir=models/soup-single")
    monkeypatch.setattr(pipeline, "CHUNK_ELEMS", 1000)  # keys streamed in chunks that split rows
    sharded = _run_soup(
        soup_work,
        monkeypatch,
        "soup.output_dir=models/soup-sharded",
        "soup.base_dir=models/tiny-openseek-sharded",
        "soup.checkpoints=[runs/sharded/checkpoint-*]",
    )
    assert len(list((soup_work / "runs/sharded/checkpoint-6").glob("*.safetensors"))) > 3
    assert (single / "model.safetensors").read_bytes() == (sharded / "model.safetensors").read_bytes()

    # A sharded output holds the same tensors, with an index.
    out = _run_soup(
        soup_work, monkeypatch, "soup.output_dir=models/soup-out-sharded", "soup.max_shard_size='50KB'"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a, b = _tensors(single), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(out / sorted(set(index["weight_map"].values()))[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_weights_give_the_weighted_mean(soup_work, monkeypatch):
    out = _run_soup(
        soup_work,
        monkeypatch,
        "soup.output_dir=models/soup-weighted",
        "soup.weights=[0, 0, 1, 3]",
        "soup.dtype=float32",
    )
    c12 = _tensors(soup_work / "runs/tiny/checkpoint-12")
    c18 = _tensors(soup_work / "runs/tiny/checkpoint-18")
    got = _tensors(out)
    for key in got:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], (c12[key] + 3 * c18[key]) / 4, rtol=1e-6, atol=1e-7)


def _broken_copy(work: Path, name: str, edit) -> str:
    """A copy of checkpoint-12 whose model.safetensors went through `edit(dict) -> dict`."""
    src = work / "runs/tiny/checkpoint-12"
    dst = work / "runs/broken" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    save_file(
        edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"}
    )
    return str(dst.relative_to(work))


def test_allow_partial_averages_each_key_over_the_inputs_that_have_it(soup_work, monkeypatch):
    key = "model.layers.0.mlp.up_proj.weight"
    partial = _broken_copy(soup_work, "missing-up", lambda t: {k: v for k, v in t.items() if k != key})
    ckpts = f"soup.checkpoints=[runs/tiny/checkpoint-6, {partial}]"
    out = _run_soup(
        soup_work, monkeypatch, "soup.output_dir=models/soup-partial", ckpts, "soup.allow_partial=true"
    )
    info = json.loads((out / "merge_info.json").read_text())
    assert info["skipped_keys"] == [{"key": key, "input": partial, "reason": "missing"}]
    assert info["key_counts"][key] == 2 and info["key_counts"]["model.norm.weight"] == 3
    base, c6 = _tensors(soup_work / BASE), _tensors(soup_work / "runs/tiny/checkpoint-6")
    want = ((base[key].float() + c6[key].float()) / 2).to(torch.bfloat16)
    assert torch.equal(_tensors(out)[key], want)


BAD_INPUTS = {
    # name: (overrides, builder of extra files or None, words the one-line error must contain)
    "shape_mismatch": "shape [1024, 32] != base [1024, 64]",
    "missing_key": "model.norm.weight missing",
    "listed_twice": "listed twice",
    "empty_glob": "matches no directory",
    "weights_count": "has 2 values but there are 4 inputs",
    "negative_weight": ">= 0",
    "not_safetensors": "save_pretrained",
    "incomplete_checkpoint": "is incomplete",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(soup_work, case):
    ckpts = "soup.checkpoints=[runs/tiny/checkpoint-*]"
    extra: list[str] = []
    if case == "shape_mismatch":
        bad = _broken_copy(
            soup_work, "checkpoint-30", lambda t: {**t, "model.embed_tokens.weight": torch.zeros(1024, 32)}
        )
        ckpts = f"soup.checkpoints=[runs/tiny/checkpoint-6, {bad}]"
    elif case == "missing_key":
        bad = _broken_copy(
            soup_work, "checkpoint-31", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}
        )
        ckpts = f"soup.checkpoints=[runs/tiny/checkpoint-6, {bad}]"
    elif case == "listed_twice":
        ckpts = "soup.checkpoints=[runs/tiny/checkpoint-*, runs/tiny/../tiny/checkpoint-12]"
    elif case == "empty_glob":
        ckpts = "soup.checkpoints=[runs/nothing-here/checkpoint-*]"
    elif case == "weights_count":
        extra = ["--set", "soup.weights=[1, 1]"]
    elif case == "negative_weight":
        extra = ["--set", "soup.weights=[1, -1, 1, 1]"]
    elif case == "not_safetensors":
        bin_dir = soup_work / "runs/bin/checkpoint-40"
        bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(soup_work / "runs/tiny/checkpoint-6/config.json", bin_dir)
        torch.save(
            load_file(soup_work / "runs/tiny/checkpoint-6/model.safetensors"), bin_dir / "pytorch_model.bin"
        )
        ckpts = "soup.checkpoints=[runs/tiny/checkpoint-6, runs/bin/checkpoint-40]"
    elif case == "incomplete_checkpoint":  # the train stage writes its marker last
        run = soup_work / "runs/cut"
        for step in (6, 12):
            shutil.rmtree(run / f"checkpoint-{step}", ignore_errors=True)
            shutil.copytree(soup_work / f"runs/tiny/checkpoint-{step}", run / f"checkpoint-{step}")
        sizes = {p.name: p.stat().st_size for p in (run / "checkpoint-6").iterdir()}
        (run / "checkpoint-6/openseek_checkpoint.json").write_text(json.dumps({"step": 6, "files": sizes}))
        ckpts = "soup.checkpoints=[runs/cut/checkpoint-*]"
    out_name = f"soup-bad-{case}"
    r = run_cli(
        "soup",
        "--recipe",
        str(TINY_RECIPE),
        "--set",
        ckpts,
        "--set",
        f"soup.output_dir=models/{out_name}",
        *extra,
        cwd=soup_work,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert BAD_INPUTS[case] in lines[0], lines[0]
    assert not [p for p in (soup_work / "models").iterdir() if out_name in p.name]


def test_evaluate_records_and_prints_loss_of_base_checkpoints_and_soup(soup_work, monkeypatch):
    monkeypatch.chdir(soup_work)
    recipe = load_recipe(TINY_RECIPE, ["soup.output_dir=models/soup-eval", "soup.eval_max_sequences=4"])
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = get_logger("soup")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        out = soup.run(**recipe.stage_args("soup"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    info = json.loads((soup_work / out / "merge_info.json").read_text())
    names = [row["name"] for row in info["evaluation"]]
    assert names == ["base", "checkpoint-6", "checkpoint-12", "checkpoint-18", "soup"]
    for row in info["evaluation"]:
        assert 0 < row["loss"] < 20 and row["sequences"] == 4 and row["tokens"] == 4 * 46
    printed = "\n".join(lines)
    assert "perplexity" in printed and "checkpoint-18" in printed and "lowest: " in printed


def test_non_float_tensors_are_copied_from_the_base_and_listed(tmp_path, monkeypatch):
    steps = {"base": 0, "checkpoint-1": 1, "checkpoint-2": 2}
    for name, step in steps.items():
        (tmp_path / name).mkdir()
        tensors = {
            "w": torch.full((3, 5), float(step)),
            "counter": torch.tensor([step, 7], dtype=torch.int64),
        }
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        None,
        [
            "soup.base_dir=base",
            "soup.checkpoints=[checkpoint-*]",
            "soup.output_dir=out",
            "soup.dtype=float32",
        ],
    )
    out = tmp_path / soup.run(**recipe.stage_args("soup"))
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["counter"], torch.tensor([0, 7])) and torch.equal(
        got["w"], torch.full((3, 5), 1.0)
    )
    info = json.loads((out / "merge_info.json").read_text())
    assert info["non_float_keys"] == ["counter"] and info["key_counts"] == {"counter": 1, "w": 3}


def _header_keys(model_dir: Path) -> set[str]:
    """Every key stored in a model directory, read with safetensors itself (not the soup's parser)."""
    keys: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys |= set(st.keys())
    return keys


def test_every_key_of_every_input_is_accounted_for_and_no_routed_expert_is_dropped(soup_work, monkeypatch):
    """The drop mergekit 0.1.5 makes on deepseek_v3 (every routed expert, exit 0) must fail here."""
    extra = _broken_copy(soup_work, "extra-key", lambda t: {**t, "model.extra_buffer": torch.ones(3)})
    out = _run_soup(
        soup_work,
        monkeypatch,
        "soup.output_dir=models/soup-accounted",
        f"soup.checkpoints=[runs/tiny/checkpoint-6, {extra}]",
        "soup.allow_partial=true",
    )
    info = json.loads((out / "merge_info.json").read_text())
    inputs = [soup_work / BASE, soup_work / "runs/tiny/checkpoint-6", soup_work / extra]
    base_keys = _header_keys(inputs[0])
    experts = {k for k in base_keys if ".mlp.experts." in k}
    assert experts and experts <= _header_keys(out)  # every routed expert is in the soup
    assert _header_keys(out) == base_keys
    for row, path in zip(info["accounting"], inputs, strict=True):
        stored = _header_keys(path)
        buckets = (
            "averaged",
            "weight_zero",
            "copied_from_base",
            "non_float_not_used",
            "skipped",
            "ignored_tied",
        )
        assert row["keys"] == len(stored) == sum(row[b] for b in buckets), row
        assert row["averaged"] == len(base_keys)  # each averaged, none left at base weights
    assert info["accounting"][2]["left_out"] == ["model.extra_buffer"]
    assert info["accounting"][2]["skipped"] == 1
    assert {"key": "model.extra_buffer", "input": extra, "reason": "not in the base"} in info["skipped_keys"]


def test_a_plan_that_drops_a_key_is_refused(soup_work):
    """The accounting check itself can fail: a plan that forgets a key of an input raises."""
    inputs = [
        open_input(soup_work / BASE, "base"),
        open_input(soup_work / "runs/tiny/checkpoint-6", "checkpoint"),
    ]
    plan = plan_keys(inputs, [1.0, 1.0], allow_partial=False)
    dropped = next(k for k in plan.keys if ".mlp.experts." in k)
    plan.sources[dropped] = plan.sources[dropped][:1]  # checkpoint-6's copy of the key silently unused
    with pytest.raises(RuntimeError, match="not accounted for"):
        account_keys(inputs, plan)


def test_hashes_come_from_the_merge_reads_and_equal_sha256_of_the_files(soup_work, monkeypatch):
    # A sharded base with single-file checkpoints (reads jump around the shards' layouts), one input
    # at weight 0 (never read by the merge: hashed on its own), chunks that split keys.
    monkeypatch.setattr(pipeline, "CHUNK_ELEMS", 777)
    out = _run_soup(
        soup_work,
        monkeypatch,
        "soup.output_dir=models/soup-hashes",
        "soup.base_dir=models/tiny-openseek-sharded",
        "soup.weights=[1, 0, 1, 1]",
        "soup.max_shard_size='60KB'",
    )
    info = json.loads((out / "merge_info.json").read_text())
    for row in info["inputs"]:
        files = sorted(p.name for p in Path(row["path"]).iterdir() if "safetensors" in p.name)
        assert sorted(row["files"]) == files
        assert row["files"] == {name: _sha256(Path(row["path"]) / name) for name in files}
    written = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
    assert len(written) > 3 and sorted(info["output_hashes"]) == written
    assert info["output_hashes"] == {name: _sha256(out / name) for name in written}
    prov = json.loads((out / "provenance.json").read_text())
    assert all(prov["files"][name] == digest for name, digest in info["output_hashes"].items())
    assert info["io"]["input_bytes"] == sum(
        (Path(row["path"]) / name).stat().st_size for row in info["inputs"] for name in row["files"]
    )


def test_combine_is_the_one_seam_a_new_method_plugs_into(soup_work, monkeypatch):
    x = [np.arange(6, dtype=np.float32), np.full(6, 2.0, np.float32), np.ones(6, np.float32)]
    got = methods.combine("linear", iter(x), [1.0, 2.0, 1.0], numerics.Workspace())
    want = (x[0] + 2 * x[1] + x[2]) / np.float32(4)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(UserError, match="not one of linear"):
        methods.combine("median-of-nothing", iter(x), [1.0, 1.0, 1.0], numerics.Workspace())

    # A method is a function in the table, selected by soup.method: the I/O loop runs it unchanged.
    def elementwise_max(chunks, weights, ws):
        first = next(chunks)
        acc = ws.acc(first.size)
        np.copyto(acc, first)
        for x in chunks:
            np.maximum(acc, x, out=acc)
        return acc

    monkeypatch.setitem(methods.METHODS, "max", elementwise_max)
    out = _run_soup(
        soup_work, monkeypatch, "soup.output_dir=models/soup-max", "soup.dtype=float32", "soup.method=max"
    )
    assert json.loads((out / "merge_info.json").read_text())["method"] == "max"
    inputs = [_tensors(soup_work / BASE), *(_tensors(soup_work / f"runs/tiny/checkpoint-{s}") for s in STEPS)]
    got = _tensors(out)
    for key in got:
        assert torch.equal(got[key], torch.stack([t[key].float() for t in inputs]).amax(0)), key


def _llama_set(root: Path, n: int) -> list[Path]:
    """A tiny llama-shaped base (bf16, untied lm_head) and n perturbed checkpoints, as save_pretrained writes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    dirs = [root / "base", *(root / f"run/checkpoint-{10 * (i + 1)}" for i in range(n))]
    for i, d in enumerate(dirs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.01 * i)
        model.save_pretrained(d)
    return dirs


def test_a_llama_shaped_set_soups_exactly_without_importing_transformers_or_torch(tmp_path):
    dirs = _llama_set(tmp_path, 2)
    ref = {}
    per_input = [_tensors(d) for d in dirs]
    for key in per_input[0]:
        ref[key] = (sum(t[key].float() for t in per_input) / len(dirs)).to(torch.bfloat16)
    (tmp_path / "soup.yaml").write_text(
        json.dumps({"soup": {"base_dir": "base", "checkpoints": ["run/checkpoint-*"], "output_dir": "out"}})
    )
    code = (
        "import sys; from openseek_cpt import cli; rc = cli.main(['soup', '--recipe', 'soup.yaml']); "
        "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch'))); "
        "sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IMPORTED []" in r.stdout, r.stdout  # the merge path loads neither transformers nor torch
    got = _tensors(tmp_path / "out")
    assert sorted(got) == sorted(ref) and "lm_head.weight" in got
    for key in ref:
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], ref[key]), key
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merge_info = json.loads((tmp_path / "out/merge_info.json").read_text())
    assert merge_info["fp32_keys"] == [] and merge_info["io"]["bytes_read_again_for_hashes"] == 0
    assert merge_info["inputs"][1]["files"]["model.safetensors"] == _sha256(dirs[1] / "model.safetensors")


# fp32 values whose bf16/f16 rounding is easy to get wrong: ties (to even, both ways), just above
# and below a tie, subnormals, the largest finite (rounds to inf), infinities, NaNs of any sign
# and payload, zeros of both signs.
EDGE_BITS = [
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,  # ties and neighbours
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80000001, 0x807F8000,  # subnormals
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,  # max finite and its neighbours
    0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFF800001,  # inf, nan
    0x00000000, 0x80000000, 0x3F800000, 0x477FE000, 0x477FF000, 0x33800000, 0x33000001,  # zeros, f16 edges
]  # fmt: skip


@pytest.mark.parametrize("split", [False, True], ids=["stored-order", "de-interleaved"])
@pytest.mark.parametrize("code", ["BF16", "F16", "F32"])
def test_numpy_rounding_gives_the_bits_torch_gives_on_edge_values(code, split):
    rng = np.random.default_rng(0)
    bits = np.concatenate([np.array(EDGE_BITS, np.uint32), rng.integers(0, 2**32, 4000, dtype=np.uint32)])
    bits = bits[: len(bits) // 2 * 2]
    a = bits.view(np.float32)
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[code]
    want = torch.from_numpy(a.copy()).to(torch_dtype).view(torch.uint8).numpy()
    if split:  # what to_fp32 hands the method for an even-length chunk: even elements, then odd
        a = np.concatenate([a[0::2], a[1::2]])
    out = np.empty(a.size * 2, np.uint8)
    got = numerics.from_fp32(a, code, out, np.empty(a.size, np.uint32), split).view(np.uint8)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]


@pytest.mark.parametrize("split", [False, True], ids=["stored-order", "de-interleaved"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_stored_chunks_widen_to_fp32_as_torch_widens_them(dtype, split):
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[
        dtype
    ]
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal(1000) * 1e3).to(torch_dtype)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=torch_dtype)
    raw = bytearray(x.view(torch.uint8).numpy().tobytes())
    got = numerics.to_fp32(raw, dtype, x.numel(), np.empty(x.numel(), np.float32), split)
    want = x.float().numpy()
    if split:
        want = np.concatenate([want[0::2], want[1::2]])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_outputs_finished_out_of_order_are_written_in_step_order_with_bounded_parking():
    """Workers finish in any order; the shard writer still gets chunk 0, 1, 2, ... and at most
    MAX_PARKED copies wait at once."""
    import random
    import threading

    class Recorder:
        def __init__(self):
            self.keys, self.most_parked = [], 0

        def write_bytes(self, key, data):
            self.keys.append((key, bytes(data)))
            self.most_parked = max(self.most_parked, len(queue._parked))

    writer = Recorder()
    queue = pipeline.OutputQueue(writer)
    order = list(range(200))
    rng = random.Random(0)
    jobs = iter(order)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(jobs, None)
            if index is None:
                return
            threading.Event().wait(rng.random() / 2000)  # uneven finishing times
            buf = bytearray(f"chunk {index}".encode())
            queue.put(index, f"k{index}", memoryview(buf))
            buf[:] = b"reused!"  # the worker's buffer is reused at once: a parked output is a copy

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.keys == [(f"k{i}", f"chunk {i}".encode()) for i in order]
    assert writer.most_parked <= pipeline.MAX_PARKED


def _with_nan(t: dict) -> dict:
    key = "model.layers.0.mlp.up_proj.weight"
    bad = t[key].clone()
    bad.view(-1)[7] = float("nan")
    bad.view(-1)[8] = float("inf")
    return {**t, key: bad}


def test_a_non_finite_input_is_refused_naming_the_input_and_key_and_writes_nothing(soup_work, monkeypatch):
    diverged = _broken_copy(soup_work, "checkpoint-nan", _with_nan)
    out = "models/soup-nan"
    with pytest.raises(UserError) as caught:
        _run_soup(
            soup_work,
            monkeypatch,
            f"soup.output_dir={out}",
            f"soup.checkpoints=[runs/tiny/checkpoint-6, {diverged}]",
        )
    message = str(caught.value)
    assert "model.layers.0.mlp.up_proj.weight holds NaN/inf in" in message
    assert "checkpoint-nan (2 of" in message and "checkpoint-6" not in message
    assert "soup.allow_non_finite=true" in message
    assert not (soup_work / out).exists()


def test_allow_non_finite_averages_them_on_request(soup_work, monkeypatch):
    diverged = _broken_copy(soup_work, "checkpoint-nan", _with_nan)
    out = _run_soup(
        soup_work, monkeypatch, "soup.output_dir=models/soup-nan-allowed",
        f"soup.checkpoints=[runs/tiny/checkpoint-6, {diverged}]", "soup.allow_non_finite=true",
    )  # fmt: skip
    up = _tensors(out)["model.layers.0.mlp.up_proj.weight"].float().view(-1)
    assert up[7].isnan() and up[8].isinf() and torch.isfinite(up[9:]).all()
