"""Release checks that need no cluster: the locks, the image definitions, the Makefile and sbatch scripts.

The GPU image cannot be built or run here (no GPU, no registry), so what can go wrong with it is
checked on the files: the lock pins every runtime dependency with hashes and its torch is a CUDA 12
build; the Dockerfile defaults to the CUDA 12.8 base and that lock; the Apptainer definition starts
from the archive `make sif` writes. The Makefile is checked through `make -n` (what it would run).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
from conftest import clean_make_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
GPU_LOCK = REPO / "container" / "requirements.lock"
CPU_LOCK = REPO / "container" / "requirements-cpu.lock"
TARGETS = ("help", "image", "sif", "lock", "device-wheels", "test-image-gpu", "test-lock-gpu", "download", "data",
           "train", "soup", "tiny", "test", "test-fast")  # fmt: skip
VARIABLES = ("RECIPE", "SLURM_NODES", "GPUS_PER_NODE", "PARTITION", "ACCOUNT", "TIME", "RUNTIME", "IMAGE",
             "SIF", "ENGINE", "LOCAL", "WAIT", "SET", "FLAVOR", "CA_BUNDLE", "WHEELS", "MOUNTS", "LOGDIR")  # fmt: skip


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (exact version, [sha256 hashes])} of a pip-compile/uv lock file."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *opts = line.split(" --hash=")
        req = Requirement(spec.strip())
        (op_version,) = req.specifier  # exactly one specifier ...
        assert op_version.operator == "==", f"{path.name}: {spec} is not pinned with =="  # ... and it pins
        pins[canonicalize_name(req.name)] = (op_version.version, [h.strip() for h in opts])
    return pins


def runtime_dependencies() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"]]


@pytest.mark.parametrize("lock", [GPU_LOCK, CPU_LOCK], ids=["gpu", "cpu"])
def test_lock_pins_every_runtime_dependency_within_pyproject_ranges_with_hashes(lock):
    pins = parse_lock(lock)
    for req in runtime_dependencies():
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req.name} (run `make lock`)"
        version = pins[name][0]
        assert req.specifier.contains(Version(version), prereleases=True), (
            f"{lock.name}: {req.name}=={version} is outside pyproject's {req.specifier}"
        )
    unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not unhashed, f"{lock.name}: no --hash for {unhashed} (pip --require-hashes would refuse)"
    assert all(h.startswith("sha256:") and len(h) == 71 for _, hs in pins.values() for h in hs)


def test_gpu_lock_holds_the_cuda_12_torch_with_cudnn_9():
    pins = parse_lock(GPU_LOCK)
    assert pins["torch"][0] == "2.10.0"  # PyPI's Linux wheel of 2.10.0 is the CUDA 12.8 build
    cuda_packages = {n: v for n, (v, _) in pins.items() if n.startswith("nvidia-")}
    assert "nvidia-cuda-runtime-cu12" in cuda_packages, sorted(cuda_packages)
    assert Version(cuda_packages["nvidia-cuda-runtime-cu12"]).major == 12
    assert Version(cuda_packages["nvidia-cudnn-cu12"]).major == 9
    assert Version(cuda_packages["nvidia-nccl-cu12"]).major == 2
    other_cuda = [n for n in cuda_packages if re.search(r"-cu(?!12$)\d+$", n)]
    assert not other_cuda, f"packages of another CUDA major in the GPU lock: {other_cuda}"


def test_cpu_lock_holds_the_cpu_torch_and_no_cuda_libraries():
    pins = parse_lock(CPU_LOCK)
    assert pins["torch"][0].endswith("+cpu")
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]


def test_the_images_and_ci_pin_the_same_versions_of_every_package_they_share_but_torch():
    """What the host's tests prove for the test lock holds for both images (the GPU image re-runs only
    its lever tests, on its own torch: tests/cluster/test_image_gpu.py)."""
    test = parse_lock(REPO / "container" / "requirements-test.lock")
    for lock in (GPU_LOCK, CPU_LOCK):
        pins = parse_lock(lock)
        differ = {n: (pins[n][0], test[n][0]) for n in pins.keys() & test.keys() if pins[n][0] != test[n][0]}
        allowed = {"torch"} if lock == GPU_LOCK else set()
        assert set(differ) <= allowed, f"{lock.name} vs the test lock: {differ} (run `make lock`)"


def test_dockerfile_defaults_to_the_tested_debian_base_and_the_gpu_lock_and_labels_the_revision():
    """The default base is the one `make test-image-gpu` builds: CUDA/cuDNN/NCCL come from the lock."""
    text = code_lines(REPO / "container" / "Dockerfile")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base == "debian:bookworm-slim", base
    assert re.search(r"^ARG LOCK=container/requirements\.lock$", text, re.M)
    assert "--require-hashes" in text and 'org.opencontainers.image.revision="${GIT_REV}"' in text
    assert "id=ca_bundle" in text  # the proxy CA is a build secret, never a layer
    # Debian bookworm's Python 3.11 resolves the GPU lock; NVIDIA's Ubuntu 24.04 (3.12) is checked too.
    lock = make("-n", "lock").stdout
    assert "--python-version 3.11" in lock and "--python-version 3.12" in lock


def test_apptainer_definition_bootstraps_from_the_archive_that_make_sif_writes():
    definition = (REPO / "container" / "openseek-cpt.def").read_text()
    assert re.search(r"^Bootstrap: docker-archive$", definition, re.M)
    archive = re.search(r"^From: (\S+)$", definition, re.M).group(1)
    dry = make("-n", "sif", "ENGINE=podman", "IMAGE=openseek-cpt:gpu", "SIF=x.sif").stdout
    assert f"-o {REPO}/{archive} openseek-cpt:gpu" in dry
    assert "apptainer build --force" in dry and "container/openseek-cpt.def" in dry
    # Nothing is installed in the definition: the environment comes only from the image.
    assert not re.search(r"^%post", definition, re.M) and "pip install" not in definition


def code_lines(path: Path) -> str:
    """The file without its comment lines: a check must not pass on what a comment says."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def make(*args: str, path: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = clean_make_env({**os.environ, "PATH": path or os.environ["PATH"]})
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), *args], capture_output=True, text=True, env=env, check=check
    )


def test_make_help_lists_every_target_and_variable():
    out = make("help").stdout
    for target in TARGETS:
        assert re.search(rf"^  {target}\s+\S", out, re.M), f"target {target} missing from `make help`"
    for var in VARIABLES:
        assert re.search(rf"^  {var}=", out, re.M), f"variable {var} missing from `make help`"
    phony = re.search(r"^\.PHONY: (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert sorted(phony) == sorted(TARGETS)


def test_make_train_submits_one_task_per_node_with_requeue_signal_and_the_variables(tmp_path):
    fake = tmp_path / "bin"  # `make -n` only prints; sbatch just has to exist for the Slurm branch
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nexit 99\n")
    (fake / "sbatch").chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    dry = make("-n", "train", "SLURM_NODES=4", "GPUS_PER_NODE=8", "PARTITION=gpu", "ACCOUNT=lab", "TIME=1-00:00:00",
               "SIGNAL_BEFORE=600", "SET=train.args.max_steps=10 seed=1", path=path).stdout  # fmt: skip
    for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=lab",
                 "--time=1-00:00:00", "--signal=B:USR1@600", "--output=logs/%x-%j.out"):  # fmt: skip
        assert flag in dry, f"{flag} missing from: {dry}"
    assert "slurm/train.sbatch recipes/openseek/config.yaml --set train.args.max_steps=10 --set seed=1" in dry
    local = make("-n", "train", "LOCAL=1", "RECIPE=recipes/tiny/config.yaml", path=path).stdout
    assert "openseek-cpt launch --recipe recipes/tiny/config.yaml" in local and "sbatch" not in local
    for stage in ("data", "soup"):
        dry = make("-n", stage, "TIME=30", path=path).stdout
        assert f"--job-name=openseek-{stage}" in dry and f"slurm/{stage}.sbatch" in dry and "--time=30" in dry
        assert f"openseek-cpt {stage} --recipe" in make("-n", stage, "LOCAL=1", path=path).stdout


def test_make_train_on_several_nodes_without_slurm_is_an_error_not_a_local_run():
    r = make("-n", "train", "SLURM_NODES=4", "HAVE_SLURM=", check=False)
    assert r.returncode == 2 and "openseek-cpt launch" not in r.stdout
    assert "SLURM_NODES=4 needs Slurm" in r.stderr and "sbatch is not on PATH" in r.stderr
    r = make("-n", "train", "SLURM_NODES=2", "LOCAL=1", "HAVE_SLURM=/usr/bin/sbatch", check=False)
    assert r.returncode == 2 and "LOCAL=1 runs on this machine only" in r.stderr


def test_make_without_sbatch_runs_a_one_node_stage_here_and_says_so():
    for stage, command in (("data", "data"), ("train", "launch"), ("soup", "soup")):
        r = make("-n", stage, "HAVE_SLURM=")
        assert f"openseek-cpt {command} --recipe" in r.stdout and "sbatch" not in r.stdout.split("\n", 1)[1]
        assert "no sbatch on PATH: running here" in r.stdout


@pytest.mark.parametrize("stage", ["data", "train", "soup"])
def test_make_refuses_a_mistyped_runtime_before_anything_is_queued(stage):
    r = make("-n", stage, "RUNTIME=apptainr", "HAVE_SLURM=/usr/bin/sbatch", check=False)
    assert r.returncode == 2 and "sbatch" not in r.stdout
    assert "RUNTIME=apptainr is not one of" in r.stderr and "nothing was submitted" in r.stderr
    runtimes = re.search(r"^RUNTIMES := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    script = (REPO / "slurm" / "runtime.sh").read_text()
    for runtime in runtimes:  # every runtime the Makefile accepts is one runtime.sh knows
        assert runtime == "none" or re.search(rf"^\s+[a-z|]*\b{runtime}\b[a-z|]*\)", script, re.M), runtime
    for runtime in runtimes:
        assert "sbatch" in make("-n", stage, f"RUNTIME={runtime}", "HAVE_SLURM=/usr/bin/sbatch").stdout


def test_make_image_passes_flavour_base_lock_revision_proxy_ca_and_wheels():
    dry = make("-n", "image", "ENGINE=podman", "FLAVOR=cpu", "BASE_IMAGE=localbase:bookworm",
               "CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt", "WHEELS=/opt/wheels").stdout  # fmt: skip
    assert "podman build -f" in dry and "-t openseek-cpt:cpu" in dry
    assert "--build-arg BASE_IMAGE=localbase:bookworm" in dry
    assert "--build-arg LOCK=container/requirements-cpu.lock" in dry
    assert re.search(r"--build-arg GIT_REV=[0-9a-f]{40}", dry)
    assert "--secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt" in dry
    assert "-v /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels" in dry
    gpu = make("-n", "image", "ENGINE=docker").stdout
    assert (
        "BASE_IMAGE=debian:bookworm-slim" in gpu
        and "LOCK=container/requirements.lock" in gpu
        and "-t openseek-cpt:gpu" in gpu
    )


@pytest.mark.parametrize("script", ["train", "data", "soup"])
def test_sbatch_scripts_are_valid_bash_and_leave_the_world_size_to_the_launcher(script):
    path = REPO / "slurm" / f"{script}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    code = code_lines(path)
    assert "source " in code and "runtime.sh" in code and "osc_step" in code
    for launcher_logic in ("SLURM_NNODES", "SLURM_NODEID", "accelerate", "MASTER_ADDR", "num_processes"):
        assert launcher_logic not in code, f"{script}.sbatch computes {launcher_logic}: the launcher's job"
    if script == "train":
        assert re.search(r"^#SBATCH --requeue$", text, re.M)
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)
        assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
        assert "openseek-cpt launch" in code and "scontrol requeue" in code
    else:
        assert f"openseek-cpt {script}" in code


def test_runtime_wrapper_passes_mounts_and_hf_environment_to_each_container_runtime(tmp_path):
    """The command each runtime would run, with a stand-in for the runtime binary that prints its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("podman", "docker", "apptainer"):
        (bin_dir / tool).write_text(
            '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\nenv | grep ^APPTAINERENV_ || true\n'
        )
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "https://mirror.example", "NCCL_SOCKET_IFNAME": "ib0", "SLURM_NODEID": "1",
           "MOUNTS": "/data,/scratch:/mnt/scratch", "IMAGE": "openseek-cpt:gpu", "SIF": "/x/o.sif"}  # fmt: skip
    for runtime in ("podman", "docker", "apptainer"):
        out = subprocess.run(
            ["bash", str(REPO / "slurm" / "runtime.sh"), "openseek-cpt", "data", "--recipe", "r.yaml"],
            env={**env, "RUNTIME": runtime}, cwd=tmp_path, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert out[0] == ("exec" if runtime == "apptainer" else "run")
        args = "\n".join(out)
        for mount in (
            f"{tmp_path}:{tmp_path}",
            f"{tmp_path}/hf:{tmp_path}/hf",
            "/data:/data",
            "/scratch:/mnt/scratch",
        ):
            assert mount in out, f"{runtime}: mount {mount} missing: {out}"
        if runtime == "apptainer":
            assert "APPTAINERENV_HF_ENDPOINT=https://mirror.example" in args and "/x/o.sif" in out
            assert "APPTAINERENV_SLURM_NODEID=1" in args and "APPTAINERENV_NCCL_SOCKET_IFNAME=ib0" in args
        else:
            for name in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "NCCL_SOCKET_IFNAME", "SLURM_NODEID"):
                assert out[out.index(name) - 1] == "-e", f"{runtime}: {name} not passed"
            assert "--network" in out and out[out.index("--network") + 1] == "host"
            assert out[out.index("openseek-cpt:gpu") + 1 :] == ["openseek-cpt", "data", "--recipe", "r.yaml"]


def test_make_tiny_creates_the_venv_when_missing_and_runs_the_tiny_pipeline(tmp_path):
    venv = tmp_path / "venv"
    dry = make("-n", "tiny", f"VENV={venv}").stdout
    assert f"python3 -m venv {venv}" in dry and f"{venv}/bin/openseek-cpt tiny" in dry
    assert f"{venv}/bin/pip install -q --no-deps -e {REPO}" in dry and "[test]" not in dry


def pip_installs(lines: list[str], pip: str) -> list[list[str]]:
    """The arguments of each `PIP install` line, without -q, paths made relative to the repo."""
    out = []
    for line in lines:
        words = line.replace(f"{REPO}/", "").replace(str(REPO), ".").split()
        if words[:2] == [pip, "install"] and "--upgrade" not in words:
            out.append([w for w in words[2:] if w != "-q"])
    return out


def test_make_installs_the_venv_exactly_as_ci_does_from_the_hashed_test_lock(tmp_path):
    """`make tiny`/`make test` and .ci/run install the same lock with the same flags, so what a fresh
    machine runs is what CI tested (pyproject's ranges would resolve the newest releases instead)."""
    venv = tmp_path / "venv"
    made = pip_installs(make("-n", "test", f"VENV={venv}").stdout.splitlines(), f"{venv}/bin/pip")
    ci = pip_installs(code_lines(REPO / ".ci" / "run").splitlines(), "pip")
    assert ci == [["--require-hashes", "-r", "container/requirements-test.lock"], ["--no-deps", "-e", "."]]
    assert made == ci, f"the Makefile installs {made}, .ci/run installs {ci}"


@pytest.fixture()
def recording_sbatch(tmp_path) -> tuple[str, Path]:
    """A PATH whose `sbatch` records its arguments in `calls` and prints a job id."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (fake / "sbatch").chmod(0o755)
    return f"{fake}:{os.environ['PATH']}", calls


@pytest.mark.parametrize(
    ("target", "setting", "says"),
    [
        ("train", "SLURM_NODES=abc", "SLURM_NODES=abc is not a whole number >= 1"),
        ("train", "SLURM_NODES=0", "SLURM_NODES=0 is not a whole number >= 1"),
        ("train", "SLURM_NODES=-2", "SLURM_NODES=-2 is not a whole number >= 1"),
        ("train", "GPUS_PER_NODE=x", "GPUS_PER_NODE=x is not a whole number >= 0"),
        ("train", "SIGNAL_BEFORE=5m", "SIGNAL_BEFORE=5m is not a whole number >= 0"),
        ("data", "RECIPE=missing.yaml", "RECIPE=missing.yaml does not exist"),
        ("train", "RECIPE=recipes", "RECIPE=recipes is a directory"),
        ("soup", "LOCAL=yes", "LOCAL=yes must be 1"),
        ("data", "WAIT=true", "WAIT=true must be 1"),
        ("soup", "CPUS_PER_TASK=0", "CPUS_PER_TASK=0 is not a whole number >= 1"),
    ],
)
def test_a_bad_make_variable_is_one_line_and_nothing_is_submitted(recording_sbatch, target, setting, says):
    path, calls = recording_sbatch
    r = make(target, setting, "RUNTIME=none", path=path, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and f"make {target}: {says}" in r.stderr, r.stderr
    assert "nothing was submitted" in r.stderr and not calls.exists(), "sbatch was called"


def test_good_make_variables_reach_sbatch(recording_sbatch, tmp_path):
    path, calls = recording_sbatch
    r = make("train", "SLURM_NODES=2", "GPUS_PER_NODE=0", "RECIPE=recipes/tiny/config.yaml", "RUNTIME=none",
             "WAIT=0", f"LOGDIR={tmp_path}/logs", path=path)  # fmt: skip
    assert r.stdout.strip() == "4242"
    args = calls.read_text().split()
    assert "--nodes=2" in args and "--wait" not in args and not any(a.startswith("--gpus") for a in args)
