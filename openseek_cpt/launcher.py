"""Start `openseek-cpt train` under `accelerate launch` with the world size the job really has.

Knows Slurm and Accelerate, not the stages. Stable interface (slurm/*.sbatch call it, one task
per node, e.g. `srun -N$NODES --ntasks-per-node=1 openseek-cpt launch --recipe R`):

- `derive_world(nproc=None, env=os.environ) -> World`: the one place the world size comes from.
  Under Slurm (`SLURM_JOB_ID` and `SLURM_NNODES` set): num_machines = SLURM_NNODES, machine_rank =
  SLURM_NODEID, main address = the `NodeAddr` of the first node of SLURM_JOB_NODELIST (through
  `scontrol show hostnames` + `scontrol show node`: node names need not resolve), port =
  20000 + SLURM_JOB_ID % 20000 (same on every node, different per job). Outside Slurm: one
  machine, 127.0.0.1, a free port (or MASTER_PORT). Processes per node: `nproc` if given, else
  SLURM_GPUS_ON_NODE, else the CUDA_VISIBLE_DEVICES count, else torch.cuda.device_count(), else 1.
- `accelerate_command(recipe_path, overrides, world, config_file) -> list[str]`: the exact
  `accelerate launch` command, run through `launch_agent` (accelerate's own parser and launcher,
  with torch's failure traceback caught): `python -m openseek_cpt.launch_agent --config_file C
  --num_machines .. --machine_rank .. --num_processes TOTAL --main_process_ip ..
  --main_process_port .. [--multi_gpu] -m openseek_cpt train --recipe R --set ...` (`--multi_gpu`
  when TOTAL > 1 and the config is not FSDP: the flag makes accelerate ignore the config's
  distributed_type; on a CPU-only machine it starts gloo DDP processes).
  Rendezvous is `static` (machine ranks come from Slurm, so no c10d store is needed). The config
  is the recipe's `train.accelerate_config`: relative to the current directory, else to the checkout
  that holds this package (so the shipped recipes/accelerate_configs work from any workdir).
- `launch_train(recipe_path, overrides=(), nproc=None) -> int`: runs it and returns its exit code.
  SIGTERM/SIGUSR1 received by the launcher are forwarded to the training ranks (the direct
  children of `accelerate launch`: the workers, not torch's elastic agent, which would otherwise
  kill them after 30 s). Exit status: 0 when training finished; `errors.EXIT_PREEMPTED` (3) when a
  preemption signal was forwarded and the run stopped (the ranks save at the end of the current
  step; `accelerate launch` reports any non-zero rank as 1, so the launcher relies on having
  forwarded the signal — resuming from the newest complete checkpoint is right either way);
  otherwise the child's exit code. The last line of a failed launch is the rank's own one-line
  error, or one naming the rank, the signal (or exit code) and the log to read; no torch traceback
  for a rank that was killed by a signal or chose its code (how the ranks tell it: `rank_exit`).
  Killing the launcher (even with -9) ends its ranks: accelerate launch gets a parent-death
  SIGKILL and each rank watches the launcher's PID (`rank_exit.exit_with_launcher`), so no orphan
  trains on in the background.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from openseek_cpt import rank_exit
from openseek_cpt.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from openseek_cpt.logs import get_logger
from openseek_cpt.shipped import find_shipped

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
log = get_logger("launch")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this launcher sits in the job: machines, its rank, processes, rendezvous address."""

    num_machines: int
    machine_rank: int
    num_processes: int  # total over all machines
    processes_per_node: int
    main_address: str
    main_port: int


def launch_train(recipe_path: str | Path, overrides: Sequence[str] = (), nproc: int | None = None) -> int:
    """Run `train` under `accelerate launch` for this node; returns its exit code (see module doc)."""
    from openseek_cpt.config import load_recipe

    recipe = load_recipe(recipe_path, overrides)  # fail fast, before any process starts
    recipe.train.check_accepted()
    config_file = recipe.train.accelerate_config
    if not Path(config_file).is_file() and not Path(config_file).is_absolute():
        config_file = str(find_shipped(config_file) or config_file)  # recipes/accelerate_configs
    if not Path(config_file).is_file():
        raise UserError(
            f"train.accelerate_config: {config_file!r} does not exist; point it at an Accelerate YAML"
        )
    world = derive_world(nproc)
    cmd = accelerate_command(recipe_path, overrides, world, config_file)
    log.info(f"{world}")
    log.info(" ".join(cmd))
    with rank_exit.rank_errors_folder() as errors:
        code, forwarded = _run_ranks(cmd, errors)
        earned, failures = rank_exit.read_rank_error(errors), rank_exit.read_failures(errors)
    if code == EXIT_OK:
        return code
    if earned:
        rank_code, line = earned
        print(line, file=sys.stderr, flush=True)  # last: the rank's own one line
        return rank_code
    if failures:
        print(rank_exit.failure_line(failures, _log_of_this_process()), file=sys.stderr, flush=True)
    return EXIT_PREEMPTED if forwarded else code


def _run_ranks(cmd: list[str], errors: Path) -> tuple[int, list[int]]:
    """Run `cmd` to its end, forwarding preemption signals to the ranks: (exit code, signals forwarded)."""
    # Own session: we decide who gets signals. The ranks learn our PID and exit when we are gone
    # (kill -9 forwards nothing); `accelerate launch` itself gets SIGKILL when we die.
    env = {**os.environ, **rank_exit.launcher_env(errors)}
    child = subprocess.Popen(cmd, start_new_session=True, env=env, preexec_fn=_die_with_parent)
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        targets = _children(child.pid) or [child.pid]
        log.info(f"signal {signum}: forwarding to training ranks {targets}")
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGINT)
    for sig in FORWARDED_SIGNALS:  # until exit: a late signal must not replace the code the run earned
        signal.signal(sig, signal.SIG_IGN)  # (a Python handler is reset to the default at finalization)
    return code, forwarded


def _log_of_this_process() -> str:
    """Where this process's stderr goes when it is a file (a Slurm job log), else 'the output above'."""
    with contextlib.suppress(OSError):
        target = os.readlink("/proc/self/fd/2")
        if Path(target).is_file():
            return target
    return "the output above"


def derive_world(nproc: int | None = None, env: Mapping[str, str] | None = None) -> World:
    """(machines, machine rank, total processes, per node, main address, port) from Slurm or this host."""
    env = os.environ if env is None else env
    per_node = nproc if nproc is not None else processes_per_node(env)
    if per_node <= 0:
        raise UserError(f"launch: --nproc={per_node} must be > 0")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NNODES"):
        machines = int(env["SLURM_NNODES"])
        rank = int(env.get("SLURM_NODEID", "0"))
        address = first_node_address(env["SLURM_JOB_NODELIST"]) if machines > 1 else "127.0.0.1"
        port = int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
        return World(machines, rank, machines * per_node, per_node, address, port)
    port = int(env.get("MASTER_PORT") or _free_port())
    return World(1, 0, per_node, per_node, "127.0.0.1", port)


def processes_per_node(env: Mapping[str, str]) -> int:
    """GPUs this node has for the job: Slurm's count, CUDA_VISIBLE_DEVICES, torch, else 1 (CPU)."""
    gpus = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus:
        return int(gpus.split("(")[0].split(":")[-1])
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "-1"):
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except ImportError:
        return 1


def first_node_address(nodelist: str) -> str:
    """NodeAddr of the first node of a Slurm nodelist (names like n[1-4] need not resolve)."""
    if shutil.which("scontrol") is None and os.environ.get("SLURM_LAUNCH_NODE_IPADDR"):
        # Inside a container (podman/pyxis/apptainer) there is no scontrol; the step was started by
        # the batch script, which Slurm runs on the first node, and srun exports that node's address.
        return os.environ["SLURM_LAUNCH_NODE_IPADDR"]
    names = _scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise UserError(f"launch: SLURM_JOB_NODELIST={nodelist!r} expands to no host")
    for field in _scontrol("show", "node", names[0]).split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return names[0]


def accelerate_command(
    recipe_path: str | Path, overrides: Sequence[str], world: World, config_file: str | Path
) -> list[str]:
    """The `accelerate launch ... -m openseek_cpt train ...` command for this node."""
    # `accelerate launch`, run by launch_agent: the same parser and code, minus torch's traceback.
    cmd = [
        sys.executable, "-m", "openseek_cpt.launch_agent",
        "--config_file", str(config_file),
        "--num_machines", str(world.num_machines),
        "--machine_rank", str(world.machine_rank),
        "--num_processes", str(world.num_processes),
        "--main_process_ip", world.main_address,
        "--main_process_port", str(world.main_port),
        "--rdzv_backend", "static",
    ]  # fmt: skip
    if world.num_processes > 1 and config_distributed_type(config_file) != "FSDP":
        # --multi_gpu makes accelerate ignore the config's distributed_type: only for DDP configs.
        cmd.append("--multi_gpu")
    cmd += ["-m", "openseek_cpt", "train", "--recipe", str(recipe_path)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def config_distributed_type(config_file: str | Path) -> str:
    """The `distributed_type` of an Accelerate config file (e.g. MULTI_GPU, FSDP)."""
    import yaml

    try:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(
            f"train.accelerate_config: cannot read {str(config_file)!r} ({exc}); fix the file"
        ) from None
    return str(config.get("distributed_type", "NO")).upper()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(
            f"launch: `scontrol {' '.join(args)}` failed ({exc}); is Slurm installed here?"
        ) from None
    if out.returncode != 0:
        raise UserError(f"launch: `scontrol {' '.join(args)}` failed: {out.stderr.strip()[:200]}")
    return out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
