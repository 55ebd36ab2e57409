"""`accelerate launch` run in this process for `openseek-cpt launch`, minus torch's failure traceback.

Run by the launcher as `python -m openseek_cpt.launch_agent ACCELERATE-LAUNCH-ARGS`. accelerate's
own CLI lets torch elastic's ChildFailedError escape, so a failed rank ended the output with the
agent's traceback and a `=====` report even when the rank had said what was wrong in one line.
Here the error is caught: each failed rank's (rank, exit code, pid, time) goes to `failures.json`
in the launcher's rank-errors folder (RANK_ERRORS_ENV), from which the launcher writes the last
line. torch's report is still printed when no failure is understood (no rank ended with a signal
or a code of ours): it then points at the crash's own traceback above it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from openseek_cpt.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, RANK_ERRORS_ENV

FAILURES_FILE = "failures.json"
# Exit codes a rank chooses itself, after printing its one line.
KNOWN_CODES = (EXIT_USER_ERROR, EXIT_PREEMPTED)


def understood(exitcode: int) -> bool:
    """A rank ended by a signal or with a code of ours: its cause needs no torch traceback."""
    return exitcode < 0 or exitcode in KNOWN_CODES


def main(argv: list[str] | None = None) -> int:
    """Run `accelerate launch ARGV`; a failed rank -> failures.json and exit 1, no traceback."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failures = [
            {"rank": rank, "exitcode": f.exitcode, "pid": f.pid, "time": f.timestamp}
            for rank, f in exc.failures.items()
        ]
        if not any(understood(f["exitcode"]) for f in failures):
            print(exc.format_msg(), file=sys.stderr, flush=True)
        return _report(failures)
    except subprocess.CalledProcessError as exc:  # one process: accelerate's simple launcher
        return _report([{"rank": 0, "exitcode": exc.returncode, "pid": 0, "time": 0}])
    return EXIT_OK


def _report(failures: list[dict[str, int]]) -> int:
    if folder := os.environ.get(RANK_ERRORS_ENV):
        Path(folder, FAILURES_FILE).write_text(json.dumps(failures))
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
