"""Exports never replace a file they did not write, nor their input; the refusal comes before any work.

An existing PREFIX.bin/.idx (or MindRecord PATH, PATH.db) is replaced only when the sidecar
`*.provenance.json` beside it says an earlier export wrote it. The user's files are compared byte
for byte afterwards.
"""

from __future__ import annotations

import pytest
from conftest import copy_workdir, run_cli


@pytest.fixture(scope="module")
def work(tiny_prepared_dir, tmp_path_factory):
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "export-outputs")


def _refused(r, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _user_files(work, *names: str) -> dict:
    for name in names:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(f"the user's own {name}\n".encode())
    return {name: (work / name).read_bytes() for name in names}


@pytest.mark.parametrize("existing", ["mine/corpus.bin", "mine/corpus.idx", "mine/corpus.provenance.json"])
def test_export_megatron_onto_a_users_file_is_refused_and_it_is_untouched(work, existing):
    before = _user_files(work, existing)
    r = run_cli("export-megatron", "datasets/tiny-mix", "mine/corpus", cwd=work)
    _refused(r, "export-megatron: PREFIX", existing, "not written by export", "remove it yourself")
    assert {name: (work / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (work / "mine").iterdir()) == [existing.split("/")[1]]
    (work / existing).unlink()


def test_export_megatron_replaces_its_own_earlier_export(work):
    for _ in range(2):
        r = run_cli("export-megatron", "datasets/tiny-mix", "again/corpus", cwd=work)
        assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (work / "again").iterdir()) == [
        "corpus.bin", "corpus.idx", "corpus.provenance.json",
    ]  # fmt: skip


def test_export_megatron_onto_a_file_another_stage_wrote_is_refused(work):
    before = _user_files(work, "other/corpus.bin")
    (work / "other/corpus.provenance.json").write_text('{"stage": "data"}\n')
    r = run_cli("export-megatron", "datasets/tiny-mix", "other/corpus", cwd=work)
    _refused(r, "other/corpus.bin", "written by the data stage")
    assert (work / "other/corpus.bin").read_bytes() == before["other/corpus.bin"]


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("datasets/tiny-mix/train/corpus", "inside the input 'datasets/tiny-mix'"),
        ("adir", "is a directory"),
        ("afile/corpus", "is a file, not a directory"),
    ],
)
def test_export_megatron_to_a_bad_prefix_is_one_line(work, prefix, words):
    (work / "adir.bin").mkdir(exist_ok=True)
    (work / "afile").write_text("a file\n")
    r = run_cli("export-megatron", "datasets/tiny-mix", prefix, cwd=work)
    _refused(r, words)


def test_export_mindrecord_onto_a_users_file_is_refused_and_it_is_untouched(work):
    """Checked before MindSpore is even needed: refused the same with or without it installed."""
    before = _user_files(work, "mine/rows.mindrecord.db")
    r = run_cli("export-mindrecord", "datasets/tiny-mix", "mine/rows.mindrecord", cwd=work)
    _refused(r, "export-mindrecord: PATH", "rows.mindrecord.db", "not written by export")
    assert (work / "mine/rows.mindrecord.db").read_bytes() == before["mine/rows.mindrecord.db"]
