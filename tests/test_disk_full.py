"""A full disk is one line naming the path, what is free there and the fix (exit 2), never a
traceback, and nothing half-written takes a final name. A real tmpfs of 256 KiB stands in for a
full filesystem (mounting needs root; CI runs as root)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import run_cli


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
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
