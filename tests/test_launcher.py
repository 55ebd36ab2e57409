"""The launcher's world and command: derived from Slurm or this machine, the accelerate flags per config."""

from __future__ import annotations

import sys

from conftest import REPO

from openseek_cpt import launcher


def test_launcher_derives_the_world_from_slurm_or_this_machine():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8"}
    w = launcher.derive_world(env=env)
    assert (w.num_machines, w.machine_rank, w.num_processes, w.processes_per_node) == (1, 0, 8, 8)
    assert w.main_port == 20000 + 4242 % 20000
    assert launcher.derive_world(env={"CUDA_VISIBLE_DEVICES": "0,1,3"}).num_processes == 3
    local = launcher.derive_world(nproc=2, env={})
    assert (local.num_machines, local.num_processes, local.main_address) == (1, 2, "127.0.0.1")
    configs = REPO / "recipes" / "accelerate_configs"
    cmd = launcher.accelerate_command("r.yaml", ["train.args.max_steps=3"], local, configs / "ddp.yaml")
    joined = " ".join(cmd)
    assert "--num_processes 2" in joined and "--multi_gpu" in cmd and "--machine_rank 0" in joined
    assert cmd[:3] == [sys.executable, "-m", "openseek_cpt.launch_agent"]
    assert cmd[cmd.index("-m", 3) :] == [
        "-m",
        "openseek_cpt",
        "train",
        "--recipe",
        "r.yaml",
        "--set",
        "train.args.max_steps=3",
    ]
    single = launcher.accelerate_command(
        "r.yaml", [], launcher.derive_world(nproc=1, env={}), configs / "ddp.yaml"
    )
    assert "--multi_gpu" not in single
    # --multi_gpu would make accelerate ignore the config's distributed_type: never with FSDP
    fsdp = launcher.accelerate_command("r.yaml", [], local, configs / "fsdp.yaml")
    assert "--multi_gpu" not in fsdp and "--num_processes" in fsdp
