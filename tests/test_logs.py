"""Log lines: `[stage] message` once per job (rank 0), `[stage rank N]` where every rank speaks."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging
from openseek_cpt import logs
logs.setup()
log = logs.get_logger("train")
log.info("plan: 12 steps")
log.info("rank-specific: shard 3", extra=logs.EVERY_RANK)
log.warning("slow disk")
"""


def lines_of(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**env, "PATH": ""}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_two_rank_job_prints_shared_messages_once_and_ranked_messages_with_the_rank(rank):
    lines = lines_of({"RANK": rank, "WORLD_SIZE": "2"})
    shared = ["[train] plan: 12 steps"] if rank == "0" else []
    assert lines == [
        *shared,
        f"[train rank {rank}] rank-specific: shard 3",
        f"[train rank {rank}] WARNING: slow disk",
    ]


def test_a_single_process_prints_every_message_without_a_rank():
    assert lines_of({}) == [
        "[train] plan: 12 steps",
        "[train] rank-specific: shard 3",
        "[train] WARNING: slow disk",
    ]
