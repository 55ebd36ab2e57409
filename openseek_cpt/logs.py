"""One logging setup for every stage: `[stage] message` lines on stdout, once per job.

The CLI calls `setup()` once; each module takes `get_logger(STAGE)`. In a distributed run (the
launcher's RANK/WORLD_SIZE) only rank 0 prints what every rank knows alike, so 64 ranks write one
line, not 64; a message that differs per rank is logged with `extra=EVERY_RANK` and printed by every
rank as `[stage rank N] message`. Warnings and errors print on every rank, with the rank. Under
`accelerate launch` a handler may already be installed, so `setup` replaces it (force).
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "openseek_cpt"
EVERY_RANK = {"every_rank": True}


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process as the launcher set them; (0, 1) outside a launcher.

    The package's one reader of RANK/WORLD_SIZE."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


class _StageFormatter(logging.Formatter):
    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world

    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.rpartition(".")[2] if record.name.startswith(ROOT + ".") else record.name
        ranked = self.world > 1 and (
            getattr(record, "every_rank", False) or record.levelno >= logging.WARNING
        )
        where = f"{stage} rank {self.rank}" if ranked else stage
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[{where}] {level}{record.getMessage()}"


class _RankZeroFilter(logging.Filter):
    """On ranks other than 0, lets through only warnings and EVERY_RANK messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "every_rank", False))


def setup(level: int = logging.INFO) -> None:
    """Route the package's loggers to stdout as `[stage] message`, once per process."""
    rank, world = rank_and_world()
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_StageFormatter(rank, world))
    if rank != 0:
        handler.addFilter(_RankZeroFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage or module, e.g. get_logger("data") -> lines `[data] ...`."""
    return logging.getLogger(f"{ROOT}.{stage}")
