"""The recipe: one YAML, validated once, every key overridable, unknown keys caught with a suggestion."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml
from conftest import REPO, TINY_RECIPE, run_cli

from openseek_cpt.artifacts.fileio import canonical_hash
from openseek_cpt.config import Recipe, load_recipe
from openseek_cpt.data import packing
from openseek_cpt.errors import EXIT_USER_ERROR, UserError
from openseek_cpt.recipe import keys

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


# ---- every key documents itself -------------------------------------------------------------------


def _declared_keys(cls=Recipe, prefix=""):
    """(dotted key, field) of every declared field, walking sections and list-of-section items (as N)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _declared_keys(tp, key + ".")
            continue
        yield key, f
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
            yield from _declared_keys(args[0], key + ".N.")


def test_every_field_declares_a_doc():
    lacking = [key for key, f in _declared_keys() if not f.metadata.get("doc", "").strip()]
    assert not lacking, f"fields without a doc: {lacking}"
    sections = [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("doc")]
    assert not sections, f"sections without a doc: {sections}"


def test_recipe_keys_lists_every_key_with_type_default_and_doc(tmp_path):
    r = run_cli("recipe", "--keys", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert list(rows) == [key for key, _ in _declared_keys()]
    listed = {k.key: k for k in keys.keys(Recipe)}
    for key, f in _declared_keys():
        assert listed[key].doc.startswith(f.metadata["doc"]) and f.metadata["doc"] in rows[key]
    assert "data.packing" in rows and "One of: " + ", ".join(packing.NAMES) in rows["data.packing"]
    assert rows["data.max_length"].split()[1:3] == ["int", "4096"]


def test_recipe_keys_with_a_recipe_shows_its_values_and_overrides(tmp_path):
    r = run_cli(
        "recipe", "--keys", "--recipe", str(TINY_RECIPE), "--set", "train.args.eval_strategy=no", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert rows["data.max_length"].split()[1:3] == ["int", "128"]
    assert rows["data.sources.1.label"].split()[4] == "code"  # KEY str | null VALUE
    assert rows["train.args.eval_strategy"].split()[4] == "'no'"  # the string, not False
    assert (
        "TrainingArguments" not in rows["train.args.eval_strategy"]
        and "When to run evaluation" in rows["train.args.eval_strategy"]
    )
    assert "data.sources.N.path" not in rows


def test_recipe_hash_is_the_same_formula_as_before_the_fields_carried_their_docs():
    """sha256 of json.dumps(sort_keys, default=str) of the five sections: the hash checkpoints recorded."""
    import hashlib
    import json

    for r in (load_recipe(None), load_recipe(TINY_RECIPE), load_recipe(OPENSEEK_RECIPE)):
        assert set(r.to_dict()) == {"seed", "assets", "data", "train", "soup"}
        blob = json.dumps(r.to_dict(), sort_keys=True, default=str).encode()
        assert r.hash() == hashlib.sha256(blob).hexdigest() == canonical_hash(r.to_dict())


# ---- --set values are read as their key's type ------------------------------------------------------


@pytest.mark.parametrize(
    "override, get, expect",
    [
        ("train.args.eval_strategy=no", lambda r: r.train.args["eval_strategy"], "no"),
        ("train.args.eval_strategy='no'", lambda r: r.train.args["eval_strategy"], "no"),
        ("assets.revision=1e3", lambda r: r.assets.revision, "1e3"),
        ("assets.revision=null", lambda r: r.assets.revision, None),
        ("data.sources.1.label=123", lambda r: r.data.sources[1].label, "123"),
        ("data.sources.1.label=yes", lambda r: r.data.sources[1].label, "yes"),
        ("train.args.learning_rate=1e-5", lambda r: r.train.args["learning_rate"], 1e-5),
        ("train.args.report_to=[tensorboard]", lambda r: r.train.args["report_to"], ["tensorboard"]),
        ("train.args.report_to=none", lambda r: r.train.args["report_to"], "none"),
        ("soup.max_shard_size=1000", lambda r: r.soup.max_shard_size, 1000),
        ("soup.max_shard_size=500MB", lambda r: r.soup.max_shard_size, "500MB"),
        ("soup.weights=[1, 2, 0]", lambda r: r.soup.weights, [1.0, 2.0, 0.0]),
        ("data.read_margin=1e-1", lambda r: r.data.read_margin, 0.1),
        ("train.gradient_checkpointing=true", lambda r: r.train.gradient_checkpointing, True),
    ],
)
def test_set_value_is_parsed_as_the_type_of_its_key(override, get, expect):
    value = get(load_recipe(TINY_RECIPE, [override]))
    assert value == expect and type(value) is type(expect)


def test_yaml_file_traps_are_numbers_or_named_errors(tmp_path):
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["train"]["args"]["learning_rate"] = "1e-5"  # what PyYAML makes of `learning_rate: 1e-5`
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).train.args["learning_rate"] == 1e-5
    path.write_text(TINY_RECIPE.read_text().replace("eval_strategy: steps", "eval_strategy: no"))
    with pytest.raises(UserError, match=r"train.args.eval_strategy must be a string, got False; quote it"):
        load_recipe(path)
    raw["assets"]["revision"] = False  # what PyYAML makes of `revision: no`
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"assets.revision must be a string, got False; quote it"):
        load_recipe(path)


def test_set_gives_the_same_recipe_hash_as_the_same_value_in_the_file():
    assert load_recipe(TINY_RECIPE, ["train.args.save_steps=6", "data.sources.0.ratio=0.7"]).hash() == (
        load_recipe(TINY_RECIPE).hash()
    )


def test_conflicting_keys_are_an_error_naming_both(tmp_path):
    with pytest.raises(UserError, match=r"data.sources.0 sets both formatting and text_field"):
        load_recipe(TINY_RECIPE, ["data.sources.0.text_field=body"])
    # formatting: null plus a text_field is no conflict
    r = load_recipe(TINY_RECIPE, ["data.sources.0.formatting=null", "data.sources.0.text_field=body"])
    assert r.data.sources[0].text_field == "body"


# ---- every section validates at load, for every stage ----------------------------------------------

BAD = [
    ("soup.dtype=bf16", "soup.dtype='bf16' is not one of bfloat16, float16, float32"),
    (
        "train.attn_implementation=fastest",
        "train.attn_implementation='fastest' cannot be shown to keep packed",
    ),
    ("train.experts_implementation=fast", "train.experts_implementation='fast' is not one of eager"),
    ("train.args.save_steps=-5", "train.args.save_steps=-5 must be > 0"),
    ("train.args.max_steps=0", "train.args.max_steps=0 must be > 0 (or -1)"),
    ("train.args.save_total_limit=0", "train.args.save_total_limit=0 must be > 0 (or None)"),
    (
        "train.args.eval_strategy=sometimes",
        "train.args.eval_strategy='sometimes' is not one of no, steps, epoch",
    ),
    (
        "train.args.lerning_rate=1",
        "train.args.lerning_rate is not a transformers.TrainingArguments field; did you mean",
    ),
    (
        "train.args.output_dir=x",
        "train.args.output_dir is set by the train stage; remove it and set train.output_dir",
    ),
    (
        "train.args.save_strategy=epoch",
        "--load_best_model_at_end requires the save and eval strategy to match",
    ),
    ("train.precision=fp8", "train.precision='fp8' is not one of"),
    ("soup.max_shard_size=2XB", "soup.max_shard_size='2XB' is not a size"),
    ("soup.weights=[1, -1]", "soup.weights=[1.0, -1.0] must be >= 0"),
    ("soup.method=mean", "soup.method='mean' is not one of linear"),
    ("soup.eval_max_sequences=-1", "soup.eval_max_sequences=-1 must be >= 0"),
    ("data.sources.1.type=csv", "data.sources.1.type='csv' is not one of auto"),
    ("data.sources.0.formatting=no_colon", "data.sources.0.formatting='no_colon' is not 'module:function'"),
    ("data.read_margin=-0.5", "data.read_margin=-0.5 must be >= 0"),
    ("data.eval_size=-1", "data.eval_size=-1 must be >= 0"),
    ("assets.model_dir=", "assets.model_dir is empty"),
    ("train.output_dir=", "train.output_dir is empty"),
    ("seed=-1", "seed=-1 must be >= 0"),
    ("train.per_device_batch_size=0", "train.per_device_batch_size=0 must be > 0"),
]
STAGES = ("data", "train", "soup", "download", "launch")


@pytest.mark.parametrize("i", range(len(BAD)), ids=[b[0] for b in BAD])
def test_bad_value_in_any_section_is_a_one_line_error_at_load(i, tmp_path, capsys):
    """In-process CLI (one import of transformers); the stage rotates so every stage is exercised."""
    from openseek_cpt import cli

    override, expect = BAD[i]
    extra = ["--set", "train.args.load_best_model_at_end=true"] if "load_best" in expect else []
    stage = STAGES[i % len(STAGES)]
    code = cli.main([stage, "--recipe", str(TINY_RECIPE), "--set", override, *extra])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"openseek-cpt {stage}: error: "), err
    assert expect in lines[0]


MISMATCHED_STRATEGIES = ("train.args.save_strategy=epoch", "train.args.load_best_model_at_end=true")


def test_training_arguments_are_built_at_load_only_by_the_commands_that_train():
    """Keys, types and ranges: every command at load. TrainingArguments' own cross-field checks (its
    build imports transformers' modeling code): train, launch, tiny and recipe at load, not data."""
    script = f"""
import sys
from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError
recipe = load_recipe({str(TINY_RECIPE)!r}, {list(MISMATCHED_STRATEGIES)!r})
print("modeling code imported at load:", "transformers.modeling_utils" in sys.modules)
try:
    recipe.train.check_accepted()
except UserError as exc:
    print("refused:", exc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "modeling code imported at load: False" in r.stdout, r.stdout
    assert "refused: recipe: train.args: --load_best_model_at_end requires the save and eval" in r.stdout


@pytest.mark.parametrize("command", ["train", "recipe"])
def test_a_command_that_trains_refuses_what_training_arguments_refuses_at_load(command, tmp_path, capsys):
    from openseek_cpt import cli

    sets = [a for s in MISMATCHED_STRATEGIES for a in ("--set", s)]
    code = cli.main([command, "--recipe", str(TINY_RECIPE), *sets])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "--load_best_model_at_end requires the save and eval strategy to match" in err


@pytest.mark.parametrize("stage", ["data", "train", "soup"])
def test_soup_dtype_typo_fails_every_stage_before_any_work(stage, tmp_path):
    """A real subprocess in an empty directory: the recipe error comes before any file is looked at."""
    r = run_cli(stage, "--recipe", str(TINY_RECIPE), "--set", "soup.dtype=bf16", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"openseek-cpt {stage}: error: recipe: soup.dtype='bf16' is not one of" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_choices_are_those_transformers_accept():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, ALL_FP8_EXPERTS_FUNCTIONS

    from openseek_cpt.modeling import attention, experts

    # only the document-isolating ones (attention.py), all of them transformers' own names
    assert set(attention.NAMES) <= {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    assert set(experts.IMPLEMENTATIONS) == {
        "eager",
        *ALL_EXPERTS_FUNCTIONS,
        *ALL_FP8_EXPERTS_FUNCTIONS,
        "grouped_mm_autocast",  # experts.py registers it when a bf16-mixed model loads
    }
    with pytest.raises(UserError, match="cannot be shown to keep packed documents apart"):
        load_recipe(TINY_RECIPE, ["train.attn_implementation=kernels-community/flash-attn3"])


def test_loading_a_recipe_without_train_args_imports_neither_torch_transformers_nor_numpy(tmp_path):
    """The recipe layer, the assembly and every stage's config module (with the tables they read:
    packing, readers, soup methods, attention, experts) load no torch, and no numpy: the soup command
    sets OPENBLAS_NUM_THREADS after loading the recipe."""
    package = REPO / "openseek_cpt"
    modules = sorted(f"openseek_cpt.recipe.{p.stem}" for p in (package / "recipe").glob("[!_]*.py"))
    modules += sorted(f"openseek_cpt.{p.parent.name}.config" for p in package.glob("*/config.py"))
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules}]; "
        "from openseek_cpt.config import load_recipe; load_recipe(None); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert len(modules) >= 8 and r.stdout.strip() == "[]"
