"""A real two-node Slurm cluster on this machine, for the tests that submit jobs.

Debian's slurm-wlm is built with MULTIPLE_SLURMD, so two `slurmd -N n1|n2` on one host act as two
nodes (recipe in ../shared/ENVIRONMENT.md). Everything lives under one directory of the test's own
and every Slurm command is pointed at it with SLURM_CONF; nothing under /etc changes. Daemons are
stopped by the PIDs in their pid files (munged only if this module started it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "munged")

SLURM_CONF = """\
ClusterName=ci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
MpiDefault=none
ReturnToService=2
InactiveLimit=0
MinJobAge=300
KillWait=30
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=10000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def missing_requirements() -> str | None:
    """Why a real cluster cannot be started here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root to run slurmd/munged (CI runs as root; .ci/run installs slurm-wlm and munge)"
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm/munge not installed (missing {', '.join(absent)}): apt-get install -y slurm-wlm munge"
    return None


@dataclass
class Cluster:
    """A running cluster: `env` points Slurm commands at it; helpers wrap squeue/scontrol."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            **kw,
        )

    def job_state(self, job_id: str) -> str:
        """State of a job (PENDING, RUNNING, COMPLETED, FAILED, ...); jobs stay visible for MinJobAge."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return _field(out, "JobState") or "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        return _field(self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout, name)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout}s (wanted {states})\n{self.logs()}"
                )
            time.sleep(0.5)

    def logs(self) -> str:
        """The daemons' logs, tail of each, for assertion messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _field(scontrol_line: str, name: str) -> str | None:
    for token in scontrol_line.split():
        key, _, value = token.partition("=")
        if key == name:
            return value
    return None


@contextlib.contextmanager
def running_cluster(root: Path, ctld_port: int = 16817) -> Iterator[Cluster]:
    """Start munged (if needed), slurmctld and two slurmd; yield once both nodes are idle; stop them."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    root = Path(root)
    for sub in ("state", "log", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=root, ctld_port=ctld_port))
    cluster = Cluster(root=root, env={"SLURM_CONF": str(conf)})
    started_munge = _ensure_munged()
    pidfiles = [root / "slurmctld.pid", *(root / f"slurmd-{n}.pid" for n in NODES)]
    try:
        cluster.run("slurmctld", "-f", str(conf))
        for node in NODES:
            cluster.run("slurmd", "-f", str(conf), "-N", node)
        _wait_idle(cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--partition", "debug", check=False, timeout=20)
        for pidfile in reversed(pidfiles):
            _stop(pidfile)
        if started_munge:
            _stop(Path("/run/munge/munged.pid"))


def _ensure_munged() -> bool:
    """Start munged as the munge user unless one is already answering; True if we started it."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return False
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return True
        time.sleep(0.1)
    raise RuntimeError("munged did not come up")


def _wait_idle(cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        r = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = r.stdout.strip()
        idle = {line.split()[0] for line in states.splitlines() if line.split()[-1] == "idle"}
        if idle >= set(NODES):
            return
        time.sleep(0.3)
    raise RuntimeError(f"nodes not idle after {timeout}s: {states!r}\n{cluster.logs()}")


def _stop(pidfile: Path, timeout: float = 20) -> None:
    """SIGTERM the daemon named by `pidfile` and wait until it is gone (so its ports are free again)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
