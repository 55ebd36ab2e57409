"""`accelerate launch` run in this process for `openseek-cpt launch`, minus torch's failure traceback.

Run by the launcher as `python -m openseek_cpt.launch_agent ACCELERATE-LAUNCH-ARGS`. accelerate's
own CLI lets torch elastic's ChildFailedError escape, so a failed rank ended the output with the
agent's traceback and a `=====` report even when the rank had said what was wrong in one line.
Here the error is caught: each failed rank's (rank, exit code, pid, time) is left for the launcher
(`rank_exit.record_failures`), which writes the last line from it. torch's report is still printed when no failure is understood (no rank ended with a signal
or a code of ours): it then points at the crash's own traceback above it.
"""

from __future__ import annotations

import subprocess
import sys

from openseek_cpt.errors import EXIT_FAILURE, EXIT_OK
from openseek_cpt.rank_exit import record_failures, understood


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
    record_failures(failures)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
