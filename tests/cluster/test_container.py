"""The image, built and run for real with podman: `make image` (CPU flavour), `openseek-cpt tiny` inside
it as an arbitrary uid, and the same image on both nodes of a real Slurm cluster (RUNTIME=podman).

No registry is reachable here, so the base image is a local Debian made with debootstrap and
imported (ENVIRONMENT.md); the host's CA bundle goes in as the build's proxy CA secret and the
host's local wheel folder (pip's find-links) as WHEELS, the two documented build options.
Marked `container` (a few minutes); .ci/run runs it with everything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import podman_images
import pytest
import slurm_cluster
from conftest import REPO, clean_make_env
from podman_images import BASE, CA_BUNDLE, missing, podman, save_as_make_sif_does

IMAGE = "localhost/openseek-cpt:test-cpu"

pytestmark = [pytest.mark.container, pytest.mark.skipif(bool(missing()), reason=str(missing()))]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    return podman_images.podman_env(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def base_image(podman_env, tmp_path_factory) -> str:
    return podman_images.local_base(podman_env, tmp_path_factory.mktemp("base"))


def find_links() -> str | None:
    """The host's pip find-links folder holding the CPU torch wheel, if there is one."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    folders = re.findall(r"find-links='([^']+)'", r.stdout) + [os.environ.get("PIP_FIND_LINKS", "")]
    for folder in folders:
        if folder and list(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
            return folder
    return None


@pytest.fixture(scope="module")
def image(podman_env, base_image) -> str:
    """`make image` of the CPU flavour with podman, the proxy CA secret and the local wheels."""
    args = ["ENGINE=podman", "FLAVOR=cpu", f"BASE_IMAGE={base_image}", f"IMAGE={IMAGE}"]
    if CA_BUNDLE.is_file():
        args.append(f"CA_BUNDLE={CA_BUNDLE}")
    wheels = find_links()
    if wheels:
        args.append(f"WHEELS={wheels}")
    else:
        args.append("BUILD_ARGS=--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
    r = subprocess.run(["make", "-s", "-C", str(REPO), "image", *args], env=podman_env, capture_output=True,
                       text=True, timeout=1500)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return IMAGE


def test_image_is_labelled_with_versions_and_git_revision(podman_env, image):
    labels = json.loads(podman(podman_env, "image", "inspect", image, "--format", "{{json .Labels}}").stdout)
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == rev
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.base.name"] == BASE
    assert labels["io.openseek-cpt.lock"] == "container/requirements-cpu.lock"
    out = podman(
        podman_env, "run", "--rm", image, "python", "-c", "import torch; print(torch.__version__)"
    ).stdout
    assert out.strip() == "2.13.0+cpu"
    assert (
        "usage: openseek-cpt" in podman(podman_env, "run", "--rm", image).stdout
    )  # entrypoint default: --help


def test_tiny_pipeline_runs_inside_the_image_as_an_arbitrary_uid(podman_env, image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the uid below owns nothing on the host, as on clusters that map users
    r = podman(podman_env, "run", "--rm", "--user", "4321:4321", "-v", f"{work}:/workspace/run", "-w",
               "/workspace/run", image, "openseek-cpt", "tiny", timeout=1200, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    soup = work / "models" / "tiny-openseek-soup"
    assert (soup / "provenance.json").is_file() and list(soup.glob("*.safetensors"))
    assert list((work / "runs" / "tiny").glob("checkpoint-*"))
    assert all(p.stat().st_uid == 4321 for p in (work / "runs").rglob("*"))


def test_image_saves_as_the_docker_archive_that_the_apptainer_definition_bootstraps_from(
    podman_env, image, tmp_path
):
    """`make sif` up to apptainer (not installable here): the archive it feeds `apptainer build`."""
    manifest = save_as_make_sif_does(podman_env, image, tmp_path / "openseek-cpt.tar", timeout=600)
    assert manifest[0]["RepoTags"] == [image]
    assert "build/openseek-cpt.tar" in (REPO / "container" / "openseek-cpt.def").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.running_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def test_same_image_runs_data_and_two_node_training_under_slurm_with_runtime_podman(
    podman_env, image, cluster, tiny_assets_dir, tmp_path
):
    work = tmp_path / "work"
    shutil.copytree(tiny_assets_dir, work, symlinks=True)
    shutil.copytree(REPO / "recipes", work / "recipes")  # recipe paths are relative to the workdir
    env = {**podman_env, **cluster.env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env = clean_make_env(env)
    common = ["-s", "-f", str(REPO / "Makefile"), "RECIPE=recipes/tiny/config.yaml", "RUNTIME=podman",
              f"IMAGE={image}", "GPUS_PER_NODE=0", "WAIT=1"]  # fmt: skip

    def make(target: str, *args: str) -> str:
        r = subprocess.run(["make", target, *common, *args], cwd=work, env=env, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
        job = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"
        log = next(iter((work / "logs").glob(f"*-{job}.out")), None)
        text = log.read_text(errors="replace") if log else "(no job log)"
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + text[-4000:]
        return text

    log = make("data")
    assert "RUNTIME=podman" in log and (work / "datasets" / "tiny-mix" / "provenance.json").is_file()
    steps = "train.args.max_steps=6 train.args.save_steps=3 train.args.eval_steps=6"
    log = make("train", "SLURM_NODES=2", f"SET={steps}")
    worlds = re.findall(r"\[launch\] World\(num_machines=(\d+), machine_rank=(\d+), num_processes=(\d+)", log)
    assert sorted(worlds) == [("2", "0", "2"), ("2", "1", "2")], log[-3000:]
    # accelerate launch of the image's stack (not the host venv), through the launch agent
    assert re.search(r"/opt/venv/bin/python\S* -m openseek_cpt\.launch_agent ", log), log[-3000:]
    run = work / "runs" / "tiny"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    marker = json.loads((run / "checkpoint-6" / "openseek_checkpoint.json").read_text())
    assert marker["world_size"] == 2
