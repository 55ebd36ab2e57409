"""Shared fixtures: the tiny assets are built once per session (no network) and copied per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny" / "config.yaml"


# What the Makefile exports to its recipes; under `make test` the tests inherit them, and a nested
# `make` would take them for the user's settings (e.g. IMAGE=openseek-cpt:gpu for FLAVOR=cpu).
MAKE_EXPORTS = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "RUNTIME", "IMAGE", "SIF", "MOUNTS", "OPENSEEK_SLURM_DIR")


def clean_make_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without what an outer `make` exported, for tests that run `make` themselves."""
    return {k: v for k, v in env.items() if k not in MAKE_EXPORTS}


class WatchedProcess:
    """A real subprocess whose output a thread reads (lines, and `'loss'` log lines counted), so a
    test can wait for a moment (a step, a checkpoint on disk) and kill it there with a real signal."""

    def __init__(self, cmd: list[str], cwd: str | Path, env: dict[str, str] | None = None):
        env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.losses = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.losses += line.count("'loss'")

    def wait_for(self, predicate, timeout: float = 300) -> bool:
        """True once `predicate()` holds while the process runs; False if it ends or time runs out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if predicate():
                return True
            time.sleep(0.0005)
        return False

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def refused_in_one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """The single `openseek-cpt ...` error line of a refused command (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("openseek-cpt ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_cli(
    *args: str, cwd: str | Path, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run `python -m openseek_cpt ARGS` in `cwd` as a real subprocess; returns the completed process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "openseek_cpt", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_assets_dir(tmp_path_factory) -> Path:
    """A workdir with `models/tiny` (hub stand-in + sources) and `models/tiny-openseek` (downloaded)."""
    root = tmp_path_factory.mktemp("tiny-assets")
    r = run_cli("tiny-assets", "--out", "models/tiny", cwd=root)
    assert r.returncode == 0, r.stderr
    r = run_cli("download", "--recipe", str(TINY_RECIPE), cwd=root)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="session")
def tiny_prepared_dir(tiny_assets_dir, tmp_path_factory) -> Path:
    """The tiny assets plus the tiny recipe's prepared dataset (`datasets/tiny-mix`), built once."""
    root = tmp_path_factory.mktemp("tiny-prepared") / "work"
    shutil.copytree(tiny_assets_dir, root, symlinks=True)
    r = run_cli("data", "--recipe", str(TINY_RECIPE), cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def copy_workdir(src: Path, tmp_path_factory, name: str) -> Path:
    """A private copy of a shared fixture workdir, for tests that write into it."""
    work = tmp_path_factory.mktemp(name) / "work"
    shutil.copytree(src, work, symlinks=True)
    return work


def assert_same_final_weights(a: Path, b: Path) -> None:
    """The `final` weights of two run dirs are bitwise equal, key by key."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not wa[k].equal(wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def fresh_workdir(prepared: Path, where: Path) -> Path:
    """A copy of a prepared workdir without runs/ (a training run that starts from nothing)."""
    work = where / "work"
    shutil.copytree(prepared, work, symlinks=True, ignore=shutil.ignore_patterns("runs"))
    return work


@pytest.fixture()
def tiny_workdir(tiny_assets_dir, tmp_path) -> Path:
    """A fresh copy of the tiny assets workdir for one test (tests may write datasets/ and runs/)."""
    work = tmp_path / "work"
    shutil.copytree(tiny_assets_dir, work, symlinks=True)
    return work


# Fixtures that run the CLI end to end (download, data, train; test_tiny's whole pipeline, twice): a
# test using one, directly or through another fixture, is in the end-to-end tier. `make test-fast`
# runs the rest (the unit tier).
END_TO_END_FIXTURES = {"tiny_assets_dir", "two_tiny_runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)
