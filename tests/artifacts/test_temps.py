"""Every temp name comes from `temp_path`, and what a killed writer leaves is swept.

Each writer below runs in a real subprocess through its real code path, is killed with SIGKILL
while its temp entry exists, and then the sweep (or the next run of the same writer) removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE

from openseek_cpt.artifacts.atomic import atomic_output_dir
from openseek_cpt.artifacts.fileio import read_json, write_json_atomic
from openseek_cpt.artifacts.temps import KINDS, sweep_leftovers, temp_path
from openseek_cpt.testing import fixtures, megatron_files

REPO = Path(__file__).resolve().parents[2]
# What a child prints once its temp entry exists; then it waits to be killed.
READY = "import sys, time\ndef ready():\n    print('READY', flush=True)\n    time.sleep(600)\n"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_every_kind_of_temp_name_is_swept_once_its_process_is_gone(tmp_path):
    dead = _dead_pid()
    final = tmp_path / "out.bin"
    leftovers = [temp_path(final, kind, pid=dead) for kind in KINDS]
    assert [p.name for p in leftovers] == [f".out.bin.{kind}-{dead}" for kind in KINDS]
    mine = temp_path(final, "tmp")  # this process lives: kept
    for p in [*leftovers, mine]:
        p.mkdir() if p.name.endswith(f"work-{dead}") else p.write_bytes(b"x")
    assert sorted(sweep_leftovers(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
    with pytest.raises(ValueError, match="not one of"):
        temp_path(final, "partial")  # type: ignore[arg-type]


def _kill_mid_write(code: str, cwd: Path, env: dict[str, str] | None = None) -> int:
    """Run `code` (which calls `ready()` mid-write) in a child python, SIGKILL it there; its pid."""
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", READY + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", line + child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return child.pid


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# Each case: (child code, the leftover names it leaves for pid P, the next run that removes them).
def _atomic_dir(root: Path) -> tuple[str, Callable[[int], list[str]], Callable[[], None]]:
    code = f"""
    from openseek_cpt.artifacts.atomic import atomic_output_dir
    with atomic_output_dir({str(root / "final")!r}) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        ready()
    """

    def again() -> None:
        with atomic_output_dir(root / "final") as tmp:
            (tmp / "whole.bin").write_bytes(b"y")

    return code, lambda pid: [f".final.tmp-{pid}"], again


def _old_dir(root: Path) -> tuple[str, Callable[[int], list[str]], Callable[[], None]]:
    (root / "final").mkdir()
    (root / "final" / "previous.bin").write_bytes(b"p")
    code = f"""
    import pathlib
    from openseek_cpt.artifacts.atomic import atomic_output_dir
    rename = pathlib.Path.rename
    def rename_then_stop(self, target):  # the real rename, then killed between the two renames
        out = rename(self, target)
        if ".old-" in str(target):
            ready()
        return out
    pathlib.Path.rename = rename_then_stop
    with atomic_output_dir({str(root / "final")!r}) as tmp:
        (tmp / "new.bin").write_bytes(b"n")
    """

    def again() -> None:
        with atomic_output_dir(root / "final") as tmp:
            (tmp / "whole.bin").write_bytes(b"y")

    return code, lambda pid: [f".final.old-{pid}", f".final.tmp-{pid}"], again


def _json_file(root: Path) -> tuple[str, Callable[[int], list[str]], Callable[[], None]]:
    code = f"""
    from openseek_cpt.artifacts.fileio import write_json_atomic
    class Slow:
        def __str__(self):  # serialized after the temp file is open
            ready()
    write_json_atomic({str(root / "marker.json")!r}, {{"value": Slow()}})
    """
    return (
        code,
        lambda pid: [f".marker.json.tmp-{pid}"],
        lambda: write_json_atomic(root / "marker.json", {"v": 1}),
    )


def _megatron(root: Path) -> tuple[str, Callable[[int], list[str]], Callable[[], None]]:
    code = f"""
    import numpy as np
    from openseek_cpt.testing import megatron_files
    def documents():
        yield np.arange(1, 50)
        ready()
    megatron_files.write_documents({str(root / "mix")!r}, documents(), vocab_size=100)
    """

    def again() -> None:
        megatron_files.write_documents(root / "mix", [[1, 2, 3]], vocab_size=100)
        assert megatron_files.read_documents(root / "mix")["input_ids"][:] == [[1, 2, 3]]

    return code, lambda pid: [f".mix.bin.tmp-{pid}"], again


def _tiktoken_ranks(root: Path) -> tuple[str, Callable[[int], list[str]], Callable[[], None]]:
    wheels = sorted(fixtures.cache_dir().glob("dashscope-*.whl"))
    if not wheels:
        pytest.skip("the Qwen ranks wheel is not cached (fetching it needs the network)")
    (root / wheels[-1].name).symlink_to(wheels[-1])
    code = """
    import pathlib
    from openseek_cpt.testing import fixtures
    write_bytes = pathlib.Path.write_bytes
    def write_then_stop(self, data):  # the real write, then killed before the rename
        write_bytes(self, data)
        ready()
    pathlib.Path.write_bytes = write_then_stop
    fixtures.qwen_ranks()
    """

    def again() -> None:
        assert fixtures.qwen_ranks() == root / "qwen.tiktoken"

    return code, lambda pid: [f".qwen.tiktoken.tmp-{pid}"], again


WRITERS = {
    "atomic dir": _atomic_dir,
    "atomic dir moved aside": _old_dir,
    "atomic json file": _json_file,
    "megatron bin": _megatron,
    "tiktoken ranks": _tiktoken_ranks,
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_killed_writers_temp_is_removed_by_its_next_run(tmp_path, monkeypatch, writer):
    code, leftovers, again = WRITERS[writer](tmp_path)
    monkeypatch.setenv("OPENSEEK_CPT_CACHE", str(tmp_path))  # the tiktoken case's cache
    pid = _kill_mid_write(code, tmp_path, {"OPENSEEK_CPT_CACHE": str(tmp_path)})
    assert _hidden(tmp_path) == sorted(leftovers(pid))
    again()
    assert _hidden(tmp_path) == []


def test_a_killed_data_stages_work_dir_is_swept(tiny_workdir):
    """The data stage's scratch (`.OUTPUT.work-PID`), left by a kill in the middle of tokenizing."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe["data"]["num_proc"] = 1
    (tiny_workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = """
    from openseek_cpt.data import stage
    from openseek_cpt.config import load_recipe
    def prepare_then_stop(*args, **kwargs):  # the work dir exists by now
        ready()
    stage.prepare_source = prepare_then_stop
    stage.run(**load_recipe("recipe.yaml").stage_args("data"))
    """
    pid = _kill_mid_write(code, tiny_workdir)
    datasets_dir = tiny_workdir / Path(recipe["data"]["output_dir"]).parent
    out_name = Path(recipe["data"]["output_dir"]).name
    assert _hidden(datasets_dir) == [f".{out_name}.work-{pid}"]
    assert [p.name for p in sweep_leftovers(datasets_dir)] == [f".{out_name}.work-{pid}"]
    assert _hidden(datasets_dir) == []


def test_a_finished_writer_leaves_no_temp(tmp_path):
    with atomic_output_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_bytes(b"x")
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    megatron_files.write_documents(tmp_path / "p", [[1, 2]], vocab_size=10)
    assert _hidden(tmp_path) == [] and read_json(tmp_path / "m.json") == {"a": 1}
