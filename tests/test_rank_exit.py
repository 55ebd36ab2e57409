"""The rank-exit protocol: what a rank leaves under `launch` is what the launcher reads back, and the
launcher's last line picks the rank that explains the failure."""

from __future__ import annotations

import pytest

from openseek_cpt import rank_exit
from openseek_cpt.errors import EXIT_PREEMPTED, EXIT_USER_ERROR


@pytest.fixture
def under_launch(tmp_path, monkeypatch):
    """A rank's environment as the launcher sets it; the folder it reads back."""
    with rank_exit.rank_errors_folder() as folder:
        for name, value in rank_exit.launcher_env(folder).items():
            monkeypatch.setenv(name, value)
        yield folder
    assert not folder.exists()  # the launcher leaves nothing behind


def test_a_ranks_one_line_and_code_come_back_to_the_launcher_with_the_rank(under_launch, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    rank_exit.leave_error(EXIT_USER_ERROR, "openseek-cpt train: error: train.args.max_steps=-2 must be > 0")
    assert rank_exit.read_rank_error(under_launch) == (
        EXIT_USER_ERROR,
        "openseek-cpt train: error: train.args.max_steps=-2 must be > 0 (rank 3)",
    )


def test_a_user_error_is_reported_before_a_preemption_then_the_lowest_rank(under_launch, monkeypatch):
    for rank, code in ((0, EXIT_PREEMPTED), (2, EXIT_USER_ERROR), (1, EXIT_USER_ERROR)):
        monkeypatch.setenv("RANK", str(rank))
        rank_exit.leave_error(code, f"line of rank {rank}")
    assert rank_exit.read_rank_error(under_launch) == (EXIT_USER_ERROR, "line of rank 1 (rank 1)")


def test_outside_launch_a_rank_leaves_nothing_and_a_damaged_file_is_no_line(tmp_path, monkeypatch):
    monkeypatch.delenv(rank_exit.RANK_ERRORS_ENV, raising=False)
    rank_exit.leave_error(EXIT_USER_ERROR, "nowhere to go")
    rank_exit.record_failures([{"rank": 0, "exitcode": 1, "pid": 1, "time": 0}])
    assert list(tmp_path.iterdir()) == []
    rank_exit.rank_file(tmp_path, 0).write_text("not a code\n")
    (tmp_path / rank_exit.FAILURES_FILE).write_text("{cut")
    assert rank_exit.read_rank_error(tmp_path) is None and rank_exit.read_failures(tmp_path) == []


def test_the_agents_failure_record_comes_back_to_the_launcher(under_launch):
    failures = [{"rank": 1, "exitcode": -9, "pid": 42, "time": 10}]
    rank_exit.record_failures(failures)
    assert rank_exit.read_failures(under_launch) == failures
    assert rank_exit.understood(-9) and rank_exit.understood(EXIT_PREEMPTED) and not rank_exit.understood(1)


def test_the_last_line_of_a_failed_launch_names_the_rank_killed_first_its_signal_and_the_log():
    killed = {"rank": 1, "exitcode": -9, "pid": 42, "time": 10}
    collateral = {"rank": 0, "exitcode": 1, "pid": 41, "time": 10}  # its collective lost the peer
    line = rank_exit.failure_line([collateral, killed], "/logs/train-7.out")
    assert line.startswith("openseek-cpt launch: rank 1 (pid 42) was killed by signal 9 (SIGKILL)"), line
    assert "out-of-memory killer" in line and "is in /logs/train-7.out" in line, line
    assert "\n" not in line
    crash = rank_exit.failure_line([collateral], "the output above")
    assert (
        crash == "openseek-cpt launch: rank 0 failed with exit code 1; its traceback is in the output above"
    )
