"""Exit codes and the exceptions that map to them: the only place either is defined.

The CLI maps exceptions to exit codes; stages raise, they never choose a status themselves.
`slurm/train.sbatch` and the launcher test for EXIT_PREEMPTED (a test ties the sbatch value to it).
"""

from __future__ import annotations

EXIT_OK = 0
# Anything unexpected (a bug, a crash in a dependency): the traceback is printed.
EXIT_FAILURE = 1
# Bad input (usage, recipe, data): one line naming the field, the value and the fix; no traceback.
EXIT_USER_ERROR = 2
# `train` stopped on SIGTERM/SIGUSR1 after saving a complete checkpoint: requeue, it resumes itself.
EXIT_PREEMPTED = 3


class UserError(Exception):
    """Bad input: recipe, usage or data. The CLI prints the message on one line and exits 2.

    The message names the field, the value and the fix.
    """


class Preempted(Exception):
    """Training stopped on a signal after saving `checkpoint` (complete); the CLI exits EXIT_PREEMPTED."""

    def __init__(self, checkpoint: str | None):
        super().__init__(f"preempted; saved {checkpoint}" if checkpoint else "preempted before any save")
        self.checkpoint = checkpoint


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name (for one-line errors)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
