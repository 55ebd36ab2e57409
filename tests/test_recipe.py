"""The recipe: one YAML, validated once, every key overridable, unknown keys caught with a suggestion."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, TINY_RECIPE, run_cli

from openseek_cpt.errors import UserError
from openseek_cpt.recipe import load_recipe

OPENSEEK_RECIPE = REPO / "recipes" / "openseek" / "config.yaml"


def test_openseek_recipe_reproduces_the_original_run_settings():
    r = load_recipe(OPENSEEK_RECIPE)
    assert r.seed == 233
    assert r.assets.base_model == "BAAI/OpenSeek-Small-v1"
    assert r.assets.tokenizer_trust_remote_code and not r.assets.model_trust_remote_code
    assert r.data.max_length == 4096 and r.data.packing == "bfd_split"
    assert r.train.global_batch_size == 1024
    a = r.train.args
    assert (a["learning_rate"], a["lr_scheduler_type"], a["optim"]) == (2e-5, "constant", "adamw_torch_fused")
    assert (a["adam_beta1"], a["adam_beta2"], a["weight_decay"], a["max_grad_norm"]) == (0.9, 0.95, 0.01, 1.0)
    assert (a["max_steps"], a["save_steps"], a["save_total_limit"]) == (7000, 1000, 10)


def test_tiny_recipe_is_the_same_shape_as_the_openseek_recipe():
    tiny, full = yaml.safe_load(TINY_RECIPE.read_text()), yaml.safe_load(OPENSEEK_RECIPE.read_text())
    assert set(tiny) == set(full)
    assert set(tiny["train"]["args"]) <= set(full["train"]["args"]) | {"optim"}


def test_overrides_reach_nested_keys_and_list_items():
    r = load_recipe(
        TINY_RECIPE,
        [
            "data.max_length=64",
            "data.sources.0.ratio=0.5",
            "data.sources.1.ratio=0.5",
            "train.args.max_steps=3",
            "seed=7",
        ],
    )
    assert r.data.max_length == 64 and r.seed == 7
    assert [s.ratio for s in r.data.sources] == [0.5, 0.5]
    assert r.train.args["max_steps"] == 3


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(UserError, match=r"unknown key 'data.max_lenght'; did you mean 'data.max_length'"):
        load_recipe(TINY_RECIPE, ["data.max_lenght=5"])
    with pytest.raises(
        UserError, match=r"data.sources.0.txt_field'; did you mean 'data.sources.0.text_field'"
    ):
        load_recipe(TINY_RECIPE, ["data.sources.0.txt_field=x"])


def test_wrong_types_name_the_field_and_value():
    with pytest.raises(UserError, match=r"data.max_length must be an integer, got 'long'"):
        load_recipe(TINY_RECIPE, ["data.max_length=long"])
    with pytest.raises(UserError, match=r"train.gradient_checkpointing must be true or false"):
        load_recipe(TINY_RECIPE, ["train.gradient_checkpointing=3"])


def test_ratio_sum_error_names_the_total_and_each_ratio():
    with pytest.raises(UserError, match=r"sum to 1\.0046, not 1\.0 \(docs=0\.7046, code=0\.3\)"):
        load_recipe(TINY_RECIPE, ["data.sources.0.ratio=0.7046"])


def test_recipe_hash_changes_with_any_setting():
    assert load_recipe(TINY_RECIPE).hash() == load_recipe(TINY_RECIPE).hash()
    assert load_recipe(TINY_RECIPE).hash() != load_recipe(TINY_RECIPE, ["train.args.max_steps=5"]).hash()


def test_cli_reports_bad_recipe_in_one_line_with_exit_code_2(tmp_path):
    r = run_cli("data", "--recipe", str(TINY_RECIPE), "--set", "data.packing=greedy", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "data.packing='greedy' is not one of bfd_split, bfd, wrapped, truncate" in r.stderr
    r = run_cli("data", "--recipe", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("data", "--recipe", str(TINY_RECIPE), "--set", "novalue", cwd=tmp_path)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
