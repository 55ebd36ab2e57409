"""One logging setup for every stage: `[stage] message` lines on stdout.

The CLI calls `setup()` once; each module takes `get_logger("data")` etc. Under `accelerate launch`
a handler may already be installed, so `setup` replaces it (force) rather than adding a second one.
"""

from __future__ import annotations

import logging
import sys

ROOT = "openseek_cpt"


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.rpartition(".")[2] if record.name.startswith(ROOT + ".") else record.name
        prefix = f"[{stage}] " if record.levelno < logging.WARNING else f"[{stage}] {record.levelname}: "
        return prefix + record.getMessage()


def setup(level: int = logging.INFO) -> None:
    """Route the package's loggers to stdout as `[stage] message`, once per process."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_StageFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(stage: str) -> logging.Logger:
    """The logger of one stage or module, e.g. get_logger("data") -> lines `[data] ...`."""
    return logging.getLogger(f"{ROOT}.{stage}")
