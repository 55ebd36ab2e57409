"""Leaving the process group at the end of a run, bounded in time."""

from __future__ import annotations

import faulthandler
import os
import threading

import torch

# After the outputs are complete, how long a rank may spend leaving the process group.
TEARDOWN_DEADLINE_S = 60.0


def leave_process_group(exit_code: int, deadline_s: float = TEARDOWN_DEADLINE_S) -> None:
    """Barrier + destroy_process_group, bounded: past `deadline_s` the rank exits with `exit_code`.

    Deviation: Trainer leaves the process group alive, and tearing gloo down at interpreter exit
    aborted a rank now and then ("terminate called without an active exception", exit -6); the
    explicit teardown can hang instead (pytorch#75097): a rank that never leaves it (here or in
    the interpreter's finalization, which `cli.main` skips for ranks) holds a Slurm job until its
    time limit. Every output is complete when this runs (the final model or the preemption
    checkpoint, all ranks past the last barrier), so a stuck teardown loses nothing: the rank
    prints its threads' stacks, says so, and exits with the code the run earned.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return

    def give_up() -> None:
        # os.write, not logging: the main thread may hold the logging or stdio lock where it hangs
        os.write(
            2,
            f"[train] process-group teardown still running after {deadline_s:.0f} s; "
            f"the outputs are complete, exiting with {exit_code}; stacks:\n".encode(),
        )
        faulthandler.dump_traceback(all_threads=True)
        os._exit(exit_code)

    timer = threading.Timer(deadline_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    finally:
        timer.cancel()
