"""atomic_output_dir: a directory appears whole or not at all, and replaces only its own stage's output."""

from __future__ import annotations

import pytest

from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.provenance import read_provenance, write_provenance
from openseek_cpt.errors import UserError


def test_failed_write_leaves_no_directory_behind(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_successful_write_replaces_the_old_directory_whole(tmp_path):
    target = tmp_path / "out"
    for content in (b"old", b"new"):
        with atomic_output_dir(target) as tmp:
            (tmp / "f").write_bytes(content)
            write_provenance(tmp, stage="test")
    assert (target / "f").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert read_provenance(target)["files"].keys() == {"f"}


def test_a_stage_replaces_its_own_earlier_output_but_nothing_else(tmp_path):
    target = tmp_path / "out"
    for content in (b"old", b"new"):  # same stage twice: replaced (re-running a stage is expected)
        with atomic_output_dir(target, stage="data") as tmp:
            (tmp / "f").write_bytes(content)
            write_provenance(tmp, stage="data")
    assert (target / "f").read_bytes() == b"new"
    with pytest.raises(UserError, match="output of the data stage"), atomic_output_dir(target, stage="soup"):
        pass
    plain = tmp_path / "mine"
    plain.mkdir()
    (plain / "thesis.tex").write_text("x")
    with (
        pytest.raises(UserError, match="not an openseek-cpt artifact"),
        atomic_output_dir(plain, stage="data"),
    ):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty, stage="data") as tmp:  # an empty directory holds nothing to lose
        (tmp / "f").write_bytes(b"1")
    with pytest.raises(UserError, match="is the input"), atomic_output_dir(plain, stage="x", inputs=[plain]):
        pass
    assert (plain / "thesis.tex").read_text() == "x" and (target / "f").read_bytes() == b"new"
