"""A full disk is one line naming the path, what is free there and the fix (exit 2), never a
traceback, and nothing half-written takes a final name. A real tmpfs of 256 KiB stands in for a
full filesystem (mounting needs root; CI runs as root)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, fresh_workdir, run_cli


def mount_tmpfs(mount: Path, size: str) -> Path:
    """A real tmpfs of `size` at `mount` (skips the test without root or mount)."""
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    return mount


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = mount_tmpfs(tmp_path / "full", "256k")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_stage_that_fills_the_disk_says_so_in_one_line_and_leaves_nothing_complete(small_tmpfs, tmp_path):
    r = run_cli("tiny-assets", "--out", str(small_tmpfs / "tiny"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("openseek-cpt")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr  # one line, last
    assert "no space left on the device (or the quota) writing" in errors[0], r.stderr
    assert str(small_tmpfs) in errors[0] and "MiB free there now" in errors[0]
    finished = [
        p for p in small_tmpfs.rglob("provenance.json") if not any(part.startswith(".") for part in p.parts)
    ]
    assert finished == [], finished  # only temp-named work in progress, if anything


def test_a_checkpoint_save_that_fills_the_disk_in_torchs_writer_is_one_line_last(tiny_prepared_dir, tmp_path):
    """2 MiB hold the tiny model's weights (1 MiB) but not its optimizer.pt (2 MiB): torch.save fails
    with an iostream error that names no errno; the run still ends with the one "no space" line."""
    work = fresh_workdir(tiny_prepared_dir, tmp_path)
    mount = mount_tmpfs(tmp_path / "full", "2m")
    try:
        sets = ["train.output_dir=" + str(mount / "run"), "train.args.max_steps=1", "train.args.save_steps=1",
                "train.args.eval_strategy='no'", "train.precision=fp32"]  # fmt: skip
        r = run_cli("train", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)], cwd=work)
        ckpt = mount / "run" / "checkpoint-1"
        assert (ckpt / "model.safetensors").is_file(), r.stderr[
            -3000:
        ]  # the weights fit: torch's writer failed
        assert not (ckpt / "openseek_checkpoint.json").exists()  # never complete: the restart removes it
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "openseek-cpt train: error: no space left on the device (or the quota) writing "
    ), last
    assert str(ckpt) in last, last


def test_a_writer_error_is_named_a_full_disk_only_when_the_disk_there_is_full(tmp_path):
    """torch's writer says "iostream error" for any failure: only a full disk (a probe write fails
    with ENOSPC) becomes OSError(ENOSPC) naming the target; on a disk with room it passes unchanged."""
    from openseek_cpt.train.full_disk import named_when_full

    mount = mount_tmpfs(tmp_path / "full", "4m")  # room for the 1 MiB probe until filled
    try:
        target = mount / "checkpoint-1"
        with pytest.raises(RuntimeError, match="iostream"), named_when_full(target):
            raise RuntimeError("basic_ios::clear: iostream error")  # room left: not a full disk
        with contextlib.suppress(OSError), (mount / "filler").open("wb") as f:
            f.write(b"\0" * (8 << 20))
        with pytest.raises(OSError) as caught, named_when_full(target):
            raise RuntimeError("basic_ios::clear: iostream error")
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]  # the probe is gone
    finally:
        subprocess.run(["umount", str(mount)], check=False)
