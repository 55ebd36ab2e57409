"""One writer per training run: an exclusive lock on its output_dir that names its holder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from openseek_cpt.errors import UserError


class RunLock:
    """An exclusive lock on a run's output_dir (POSIX record lock: released when the process dies).

    The lock file names its holder (host, pid, Slurm job) so a refused second writer can say who.
    """

    NAME = ".openseek_train.lock"

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / cls.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"train.output_dir: {str(output_dir)!r} is in use by another training run ({holder}); "
                "wait for it to end, stop it, or choose another train.output_dir"
            ) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the lock; the file stays (deleting it would race)
            self.fd = -1
