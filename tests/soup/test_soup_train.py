"""The soup of real training checkpoints: data -> train -> soup (with evaluation) as CLI processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, copy_workdir, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TRAIN = [
    "--set", "train.args.max_steps=6",
    "--set", "train.args.save_steps=2",
    "--set", "train.args.save_total_limit=3",
    "--set", "train.args.eval_strategy='no'",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_prepared_dir, tmp_path_factory) -> Path:
    work = copy_workdir(tiny_prepared_dir, tmp_path_factory, "soup-train")
    r = run_cli("train", "--recipe", str(TINY_RECIPE), *TRAIN, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_soup_of_training_checkpoints_is_the_exact_mean_and_is_evaluated(trained):
    r = run_cli("soup", "--recipe", str(TINY_RECIPE), "--set", "soup.eval_max_sequences=8", cwd=trained)
    assert r.returncode == 0, r.stderr[-3000:]
    out = trained / "models/tiny-openseek-soup"
    inputs = [trained / "models/tiny-openseek", *(trained / f"runs/tiny/checkpoint-{s}" for s in (2, 4, 6))]
    on_disk = [load_file(d / "model.safetensors") for d in inputs]
    soup = load_file(out / "model.safetensors")
    assert sorted(soup) == sorted(on_disk[0])
    for key in soup:
        acc = torch.zeros(on_disk[0][key].shape)
        for tensors in on_disk:
            acc += tensors[key].float()
        mean = acc / len(on_disk)
        want = mean if soup[key].dtype == torch.float32 else mean.to(torch.bfloat16)
        assert soup[key].dtype in (torch.bfloat16, torch.float32) and torch.equal(soup[key], want), key
    # Training moved the weights: the soup is not any single input.
    assert not torch.equal(on_disk[1]["model.norm.weight"], on_disk[3]["model.norm.weight"])
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    merge_info = json.loads((out / "merge_info.json").read_text())
    assert [i["step"] for i in merge_info["inputs"]] == [None, 2, 4, 6]
    rows = merge_info["evaluation"]
    assert [row["name"] for row in rows] == ["base", "checkpoint-2", "checkpoint-4", "checkpoint-6", "soup"]
    assert all(math.isfinite(row["loss"]) and row["sequences"] == 8 for row in rows)
    assert "perplexity" in r.stdout and "lowest:" in r.stdout
