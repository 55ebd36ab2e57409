"""A recipe file that is not what it looks like is refused in one line: repeated keys at any depth,
bytes that are not UTF-8 text, and train.args that would undo a lever or a logger that is absent."""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError

TINY_TEXT = TINY_RECIPE.read_text()


def write(tmp_path, text: str | bytes, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_key_given_twice_in_a_section_names_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  global_batch_size: 8\n  global_batch_size: 16\n")
    with pytest.raises(UserError, match=r"key 'global_batch_size' is given twice \(lines 2 and 3\)"):
        load_recipe(path)


def test_a_section_given_twice_is_named_not_reported_as_an_empty_list(tmp_path):
    path = write(tmp_path, TINY_TEXT + "\nsoup:\n  dtype: bfloat16\n")
    with pytest.raises(UserError, match=r"key 'soup' is given twice \(lines \d+ and \d+\)"):
        load_recipe(path)


def test_a_repeated_key_deep_inside_a_list_item_is_refused(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - path: a.jsonl\n      ratio: 0.5\n      ratio: 1.0\n")
    with pytest.raises(UserError, match=r"key 'ratio' is given twice \(lines 4 and 5\)"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("encoding", "match"),
    [("latin-1", r"not UTF-8 text \(byte 0xe9"), ("utf-16", r"not UTF-8 text \(byte 0xff at offset 0")],
)
def test_a_recipe_in_another_encoding_is_refused_naming_the_byte(tmp_path, encoding, match):
    path = write(tmp_path, ("# r\u00e9sum\u00e9\n" + TINY_TEXT).encode(encoding))
    with pytest.raises(UserError, match=match):
        load_recipe(path)


def test_a_binary_file_as_recipe_is_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, b"\x00\x01safetensors\x00" * 64, "model.bin")
    r = run_cli("recipe", "--recipe", str(path), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.bin" in r.stderr


def test_use_liger_kernel_is_refused_naming_the_loss_key():
    with pytest.raises(UserError, match=r"use_liger_kernel=True is refused; set train.loss: liger"):
        load_recipe(TINY_RECIPE, ["train.args.use_liger_kernel=true"])


def test_a_logger_whose_package_is_missing_is_named_at_load():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match=r"report_to='wandb' needs the 'wandb' package"):
        load_recipe(TINY_RECIPE, ["train.args.report_to=[wandb]"])


def test_anchors_aliases_and_merge_keys_load_as_yaml_defines_them(tmp_path):
    """`<<: *common` takes the anchored keys, a key written beside it overrides, `x-` keys are not keys."""
    text = TINY_TEXT.replace("train:\n", "x-args: &args\n  max_steps: 5\n  save_steps: 5\n\ntrain:\n", 1)
    text = text.replace("    max_steps: 24\n", "    <<: *args\n    save_steps: 1\n")
    text = text.replace("    save_steps: 6\n", "").replace("    eval_steps: 6\n", "    eval_steps: 1\n")
    text = text.replace("  output_dir: runs/tiny\n", "  output_dir: &run runs/tiny-anchored\n")
    text = text.replace("[runs/tiny/checkpoint-*]", "[runs/tiny-anchored/checkpoint-*]")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.args["max_steps"] == 5 and recipe.train.args["save_steps"] == 1
    assert recipe.train.output_dir == "runs/tiny-anchored"


def test_a_tab_in_the_indentation_names_the_line_and_the_tab(tmp_path):
    text = TINY_TEXT.replace("    max_steps: 24\n", "\tmax_steps: 24\n")
    line = text.splitlines().index("\tmax_steps: 24") + 1
    with pytest.raises(
        UserError, match=rf"line {line}: a tab in the indentation .* replace the tab with spaces"
    ):
        load_recipe(write(tmp_path, text))


def test_other_yaml_errors_keep_the_line_and_the_cause(tmp_path):
    with pytest.raises(
        UserError, match=r"line 3, column 1: not valid YAML \(while parsing a flow sequence; expected"
    ):
        load_recipe(write(tmp_path, "train:\n  global_batch_size: [8\n"))


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_recipe_is_refused_not_run_on_the_defaults(tmp_path, text):
    with pytest.raises(UserError, match=r"recipe\.yaml is empty \(no sections\)"):
        load_recipe(write(tmp_path, text))


def test_a_directory_as_recipe_is_named_as_a_directory_not_as_missing(tmp_path):
    (tmp_path / "conf.yaml").mkdir()
    r = run_cli("recipe", "--recipe", "conf.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "openseek-cpt recipe: error: recipe: 'conf.yaml' is a directory, not a YAML file; "
        "pass --recipe PATH to a YAML file"
    ]


def test_a_device_as_recipe_is_not_called_missing(tmp_path):
    with pytest.raises(UserError, match=r"'/dev/zero' is not a regular file"):
        load_recipe("/dev/zero")
