"""How a training rank ends and how `openseek-cpt launch` learns why: the whole protocol, both sides.

A failed multi-rank launch must end with one line, last, and the exit code the docs promise, even
though `accelerate launch` reports any failed rank as exit 1 and torch prints its own traceback.

1. The launcher makes a folder for the run (`rank_errors_folder`) and starts `accelerate launch`
   with `launcher_env(folder)`: RANK_ERRORS_ENV names the folder, LAUNCHER_PID_ENV its own PID.
2. A rank that stops with a line of its own (a user error, exit 2; a preemption, exit 3) prints the
   line and leaves it there (`leave_error`) as `rank-N.txt`, one line: `CODE<TAB>LINE`.
3. `launch_agent` leaves `failures.json` (`record_failures`): torch elastic's record of every failed
   rank, `[{"rank", "exitcode", "pid", "time"}]` (a negative exitcode is death by that signal).
4. The launcher reads them (`read_rank_error`, `read_failures`): it prints a rank's own line last and
   exits with its code (a user error before a preemption, then the lowest rank); else one line from
   the failures (`failure_line`: the rank killed first, its signal, the log), exit 1.
5. A rank ends on its own terms: a rank of a distributed run skips the interpreter's finalization
   (`end_distributed_rank`), leaves the process group within a deadline (`leave_process_group`),
   and exits 1 when the launcher's PID is gone (`exit_with_launcher`), so no orphan trains on.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from openseek_cpt.artifacts.temps import pid_alive
from openseek_cpt.errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USER_ERROR
from openseek_cpt.logs import rank_and_world

RANK_ERRORS_ENV = "OPENSEEK_CPT_RANK_ERRORS"
LAUNCHER_PID_ENV = "OPENSEEK_LAUNCHER_PID"
FAILURES_FILE = "failures.json"
# Exit codes a rank chooses itself, after printing its one line.
KNOWN_CODES = (EXIT_USER_ERROR, EXIT_PREEMPTED)
# After the outputs are complete, how long a rank may spend leaving the process group.
TEARDOWN_DEADLINE_S = 60.0


def rank_file(folder: str | Path, rank: int) -> Path:
    """Where rank `rank` leaves its one line."""
    return Path(folder, f"rank-{rank}.txt")


@contextlib.contextmanager
def rank_errors_folder() -> Iterator[Path]:
    """The launcher's folder for what its ranks leave; removed when the launch is over."""
    folder = Path(tempfile.mkdtemp(prefix="openseek-rank-errors-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def launcher_env(folder: Path) -> dict[str, str]:
    """The variables the launcher gives its ranks: where to leave a line, and whose death ends them."""
    return {LAUNCHER_PID_ENV: str(os.getpid()), RANK_ERRORS_ENV: str(folder)}


def leave_error(code: int, line: str) -> None:
    """Under `launch`, leave this rank's one line and its code for the launcher to print last."""
    if folder := os.environ.get(RANK_ERRORS_ENV):
        rank, _ = rank_and_world()
        with contextlib.suppress(OSError):
            rank_file(folder, rank).write_text(f"{code}\t{line}\n")


def read_rank_error(folder: Path) -> tuple[int, str] | None:
    """(code, one line) a rank left in `folder`: a user error (2) before a preemption (3), then the
    lowest rank; None when no rank left one (a crash: the traceback above says what happened)."""
    found = []
    for path in folder.glob("rank-*.txt"):
        with contextlib.suppress(OSError, ValueError):
            text, line = path.read_text().rstrip("\n").split("\t", 1)
            found.append((int(text) != EXIT_USER_ERROR, int(path.stem.split("-")[1]), int(text), line))
    if not found:
        return None
    _, rank, code, line = min(found)
    return code, f"{line} (rank {rank})"


def understood(exitcode: int) -> bool:
    """A rank ended by a signal or with a code of ours: its cause needs no torch traceback."""
    return exitcode < 0 or exitcode in KNOWN_CODES


def record_failures(failures: list[dict[str, int]]) -> None:
    """Under `launch`, leave the failed ranks (rank, exitcode, pid, time) for the launcher."""
    if folder := os.environ.get(RANK_ERRORS_ENV):
        Path(folder, FAILURES_FILE).write_text(json.dumps(failures))


def read_failures(folder: Path) -> list[dict[str, int]]:
    """The failed ranks launch_agent recorded (rank, exitcode, pid, time); [] when none did."""
    try:
        return list(json.loads((folder / FAILURES_FILE).read_text()))
    except (OSError, ValueError):
        return []


def failure_line(failures: list[dict[str, int]], log: str) -> str:
    """One line for a rank that failed without a line of its own: killed by a signal (the first
    such, the others followed it) or a crash, with the log that holds what it printed."""
    killed = sorted((f for f in failures if f["exitcode"] < 0), key=lambda f: (f["time"], f["rank"]))
    first = killed[0] if killed else min(failures, key=lambda f: (f["time"], f["rank"]))
    rank, code = first["rank"], first["exitcode"]
    if code >= 0:
        return f"openseek-cpt launch: rank {rank} failed with exit code {code}; its traceback is in {log}"
    signum = -code
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    hint = " (a SIGKILL nobody sent is usually the out-of-memory killer: see `dmesg`)" if signum == 9 else ""
    return (
        f"openseek-cpt launch: rank {rank} (pid {first['pid']}) was killed by signal {signum} ({name})"
        f"{hint}; what it printed last is in {log}; rerun to resume from the newest complete checkpoint"
    )


def end_distributed_rank(code: int) -> None:
    """A rank of a distributed run ends here with `code`, skipping the interpreter's finalization;
    a single process returns.

    Tearing down gloo's worker threads there aborted (SIGABRT) or hung a rank now and then, after
    its outputs were complete, and a rank that does so fails or holds the whole job. Everything the
    stage wrote is closed and fsynced by now; only the standard streams need flushing.
    """
    if rank_and_world()[1] <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _exit_now(code: int, message: str, stacks: bool = False) -> None:
    """From a watching thread: say why on stderr (and every thread's stack), then end the process."""
    # os.write, not logging: the main thread may hold the logging or stdio lock where it hangs
    os.write(2, message.encode())
    if stacks:
        faulthandler.dump_traceback(all_threads=True)
    os._exit(code)


def leave_process_group(exit_code: int, deadline_s: float = TEARDOWN_DEADLINE_S) -> None:
    """Barrier + destroy_process_group, bounded: past `deadline_s` the rank exits with `exit_code`.

    Deviation: Trainer leaves the process group alive, and tearing gloo down at interpreter exit
    aborted a rank now and then ("terminate called without an active exception", exit -6); the
    explicit teardown can hang instead (pytorch#75097): a rank that never leaves it (here or in
    the interpreter's finalization, which `end_distributed_rank` skips) holds a Slurm job until its
    time limit. Every output is complete when this runs (the final model or the preemption
    checkpoint, all ranks past the last barrier), so a stuck teardown loses nothing: the rank
    prints its threads' stacks, says so, and exits with the code the run earned.
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return

    message = (
        f"[train] process-group teardown still running after {deadline_s:.0f} s; "
        f"the outputs are complete, exiting with {exit_code}; stacks:\n"
    )
    timer = threading.Timer(deadline_s, _exit_now, (exit_code, message, True))
    timer.daemon = True
    timer.start()
    try:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    finally:
        timer.cancel()


def exit_with_launcher(interval: float = 0.1) -> None:
    """Under `openseek-cpt launch`: exit when the launcher is gone (killed with -9, no forwarding).

    `accelerate launch` dies with the launcher (parent-death signal), but its workers would be
    orphans training on; each rank checks the launcher's PID and ends itself. The check is cheap
    (a signal-0 kill and a /proc read), so it runs often: a tiny model trains several steps a second.
    """
    pid = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while pid_alive(pid):
            time.sleep(interval)
        _exit_now(EXIT_FAILURE, f"[train] launcher {pid} is gone; this rank exits\n")

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
