"""evaluation.eval_loss: finite, deterministic, per token, and blind across packed documents."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from openseek_cpt.errors import UserError
from openseek_cpt.evaluation import eval_loss

BASE = "models/tiny-openseek"


def _save(path: Path, rows: dict) -> Path:
    DatasetDict({"eval": Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def docs() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 1024, (n,), generator=gen).tolist() for n in (17, 30, 9, 24)]


def test_eval_loss_is_finite_and_equal_when_run_twice(tiny_assets_dir, tmp_path, docs):
    data = _save(tmp_path / "ds", {"input_ids": [docs[0] + docs[1], docs[2] + docs[3]],
                                   "seq_lengths": [[17, 30], [9, 24]]})  # fmt: skip
    first = eval_loss(tiny_assets_dir / BASE, data, batch_size=1)
    second = eval_loss(tiny_assets_dir / BASE, data, batch_size=2)
    assert math.isfinite(first["loss"]) and first["loss"] > 0
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    # Each document's first token is not scored: (17-1)+(30-1)+(9-1)+(24-1).
    assert first["tokens"] == 76 and first["sequences"] == 2
    again = eval_loss(tiny_assets_dir / BASE, data, batch_size=1)
    assert again["loss"] == first["loss"]


def test_packed_documents_score_as_if_evaluated_alone(tiny_assets_dir, tmp_path, docs):
    packed = _save(
        tmp_path / "packed", {"input_ids": [docs[0] + docs[1] + docs[2]], "seq_lengths": [[17, 30, 9]]}
    )
    alone = _save(tmp_path / "alone", {"input_ids": docs[:3], "seq_lengths": [[17], [30], [9]]})
    a = eval_loss(tiny_assets_dir / BASE, packed)
    b = eval_loss(tiny_assets_dir / BASE, alone)
    assert a["tokens"] == b["tokens"] == 53
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # Without the document boundaries the same tokens score differently (the check can fail).
    crossed = _save(tmp_path / "crossed", {"input_ids": [docs[0] + docs[1] + docs[2]], "seq_lengths": [[56]]})
    assert eval_loss(tiny_assets_dir / BASE, crossed)["loss"] != pytest.approx(a["loss"], rel=1e-5)


def test_missing_split_is_a_user_error(tiny_assets_dir, tmp_path, docs):
    data = tmp_path / "train-only"
    DatasetDict({"train": Dataset.from_dict({"input_ids": [docs[0]]})}).save_to_disk(str(data))
    with pytest.raises(UserError, match="no split 'eval'"):
        eval_loss(tiny_assets_dir / BASE, data)


def test_the_eval_table_shows_every_model_its_change_against_the_base_and_the_lowest():
    from openseek_cpt.evaluation import format_eval_table

    rows = [
        {"name": "base", "loss": 2.5, "perplexity": 12.18, "split": "eval", "sequences": 4, "tokens": 100},
        {
            "name": "checkpoint-6",
            "loss": 2.6,
            "perplexity": 13.46,
            "split": "eval",
            "sequences": 4,
            "tokens": 100,
        },
        {"name": "soup", "loss": 2.25, "perplexity": 9.49, "split": "eval", "sequences": 4, "tokens": 100},
    ]
    text = format_eval_table(rows).splitlines()
    assert text[0] == "eval loss on split 'eval' (4 sequences, 100 tokens):"
    assert text[2].split() == ["base", "2.5000", "12.180", "+0.0000"]
    assert text[4].split() == ["soup", "2.2500", "9.490", "-0.2500"] and text[-1] == "  lowest: soup"
    md = format_eval_table(rows, markdown=True).splitlines()
    assert "| checkpoint-6 | 2.6000 | 13.460 | +0.1000 |" in md and md[0].endswith("lowest: soup.")
    # The older name -> loss mapping renders too (reports of earlier soups).
    assert "| soup | 2.2500 |  | -0.2500 |" in format_eval_table({"base": 2.5, "soup": 2.25}, markdown=True)
