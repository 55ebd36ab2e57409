"""A full disk during a save, named as one: torch's C++ writer reports it without an errno.

`torch.save` (optimizer.pt, rng_state.pth, scheduler.pt) writes through a std::ostream, and a full
disk or quota comes back as `RuntimeError: basic_ios::clear: iostream error` followed by
`[enforce fail at inline_container.cc] unexpected pos ...`: nothing says "no space". A small probe
write where the save went tells a full disk from any other writer failure; the CLI then prints its
one "no space" line (exit 2) instead of the traceback. The cut-off checkpoint has no marker, so the
restart removes it and resumes from the previous complete one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

# More than the last partial block a failed write leaves free, less than any real save needs.
PROBE_BYTES = 1 << 20


@contextlib.contextmanager
def named_when_full(target: Path) -> Iterator[None]:
    """Run a save into `target`; a RuntimeError raised while the disk there is full becomes
    OSError(ENOSPC or EDQUOT, filename=target), raised from it. Other errors pass unchanged."""
    try:
        yield
    except RuntimeError as exc:
        full = probe_full(target)
        if full is None:
            raise
        raise full from exc


def probe_full(target: Path) -> OSError | None:
    """The OSError a PROBE_BYTES write (fsynced: some filesystems report ENOSPC only then) gets at
    `target` (or its nearest existing parent) when the disk or the quota is full; else None."""
    folder = next((p for p in (target, *target.parents) if p.is_dir()), None)
    if folder is None:
        return None
    probe = folder / f".openseek-space-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = memoryview(b"\0" * PROBE_BYTES)
            while left:  # a short write is how a disk with a few blocks left answers first
                left = left[os.write(fd, left) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OSError(exc.errno, os.strerror(exc.errno), str(target))
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None
