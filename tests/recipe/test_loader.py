"""A recipe file that is not what it looks like is refused in one line: repeated keys at any depth,
bytes that are not UTF-8 text, and train.args that would undo a lever or a logger that is absent."""

from __future__ import annotations

import pytest
from conftest import TINY_RECIPE, run_cli

from openseek_cpt.errors import UserError
from openseek_cpt.recipe.loader import load_recipe

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
