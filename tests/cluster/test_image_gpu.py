"""The GPU image users take to the cluster, built and run here without a GPU (`make test-image-gpu`).

`make image FLAVOR=gpu` with podman on the debootstrapped Debian base (no registry here): CUDA,
cuDNN and NCCL come from the GPU lock's hashed nvidia-* wheels, the driver from the GPU runtime.
Inside the image: torch is the CUDA 12.8 build and cuDNN 9 / NCCL load without a GPU, Triton can
build its launcher (gcc + Python.h), the lock is exactly what is installed, `doctor` says "no GPU",
`openseek-cpt tiny` runs on the CPU, and the GPU-lever tests pass on the shipped torch and
transformers. Then the docker-archive that `make sif` feeds `apptainer build`.
Marked `container`; builds a ~10 GB image (minutes, most of it downloading and unpacking torch).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import podman_images
import pytest
from conftest import REPO, clean_make_env
from podman_images import CA_BUNDLE, missing, podman, save_as_make_sif_does

IMAGE = "localhost/openseek-cpt:gpu"
GPU_LOCK = REPO / "container" / "requirements.lock"
TEST_LOCK = REPO / "container" / "requirements-test.lock"
# The tests of the GPU levers (loss, attention isolation, experts, router balance, precision under
# autocast), run inside the image so the torch that ships is the one tested; their end-to-end ones
# (the 2-rank router run, the real-shape pipeline) run on the host only, where every other version is
# the same lock's (test_release checks it) and the tiny pipeline below runs in the image end to end.
LEVER_TESTS = (
    "tests/modeling/test_loss.py",
    "tests/modeling/test_attention_isolation.py",
    "tests/modeling/test_experts.py",
    "tests/modeling/test_router_balance.py",
    "tests/modeling/test_precision_under_autocast.py",
)
PYTEST = ("pytest", "iniconfig", "pluggy")  # from the test lock; the GPU lock has pygments + packaging
NO_APPTAINER = (
    "apptainer is not installable here (Debian packages no apptainer/singularity runtime, only "
    "siftool): `make sif` is tested up to the docker-archive it feeds `apptainer build`"
)

pytestmark = [pytest.mark.container, pytest.mark.skipif(bool(missing()), reason=str(missing()))]


def lock_pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a hashed lock."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)
    return {normalise(name): version for name, version in pins}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    return podman_images.podman_env(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman_env, tmp_path_factory) -> str:
    """`make image FLAVOR=gpu` with podman on the local Debian base and the proxy CA secret."""
    base = podman_images.local_base(podman_env, tmp_path_factory.mktemp("base"))
    args = ["ENGINE=podman", "FLAVOR=gpu", f"BASE_IMAGE={base}", "IMAGE=openseek-cpt:gpu"]
    if CA_BUNDLE.is_file():
        args.append(f"CA_BUNDLE={CA_BUNDLE}")
    r = subprocess.run(["make", "-s", "-C", str(REPO), "image", *args], env=clean_make_env(podman_env),
                       capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return IMAGE


def inside(env: dict, image: str, *cmd: str, timeout: float = 600, check: bool = True) -> str:
    return podman(env, "run", "--rm", image, *cmd, timeout=timeout, check=check).stdout


def test_image_sets_what_gpu_runtimes_read_and_is_labelled_with_the_gpu_lock(podman_env, image):
    config = json.loads(podman(podman_env, "image", "inspect", image, "--format", "{{json .Config}}").stdout)
    assert "NVIDIA_VISIBLE_DEVICES=all" in config["Env"]
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in config["Env"]
    assert config["Labels"]["io.openseek-cpt.lock"] == "container/requirements.lock"


def test_torch_is_the_cuda_12_8_build_and_cudnn_9_and_nccl_load_without_a_gpu(podman_env, image):
    code = (
        "import json, sys, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'cudnn': torch.backends.cudnn.version(), 'nccl': '.'.join(map(str, torch.cuda.nccl.version())),"
        " 'gpu': torch.cuda.is_available(), 'python': sys.version.split()[0]}))"
    )
    found = json.loads(inside(podman_env, image, "python", "-c", code).splitlines()[-1])
    print(f"inside {image}: {found}")
    pins = lock_pins(GPU_LOCK)
    assert found["torch"].split("+")[0] == pins["torch"] and found["cuda"] == "12.8", found
    assert found["cudnn"] // 10000 == 9, found  # 91002 is cuDNN 9.10.2
    assert found["nccl"] == pins["nvidia-nccl-cu12"] and found["gpu"] is False, found


def test_triton_builds_its_launcher_with_gcc_and_python_headers_as_an_arbitrary_uid(podman_env, image):
    """Before a kernel's first launch Triton compiles a launcher module for the running Python
    (`compile_module_from_src`: cc -shared -fPIC with Python.h and its bundled cuda.h) and imports
    it; the same call here, on a module without the driver library that only a GPU node has."""
    code = """
from triton.backends.nvidia import driver
from triton.runtime.build import compile_module_from_src
src = ('#include "cuda.h"\\n#include <Python.h>\\n'
       'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "launcher_probe", NULL, -1, NULL};\\n'
       'PyMODINIT_FUNC PyInit_launcher_probe(void) { return PyModule_Create(&m); }\\n')
mod = compile_module_from_src(src=src, name="launcher_probe", include_dirs=driver.include_dirs)
print("built and imported", mod.__name__, mod.__file__)
"""
    out = podman(podman_env, "run", "--rm", "--user", "4321:4321", image, "python", "-c", code).stdout
    assert "built and imported launcher_probe /workspace/.cache/triton/" in out, out


def test_pip_check_passes_and_the_installed_versions_are_the_locked_ones(podman_env, image):
    assert "No broken requirements found" in inside(podman_env, image, "pip", "check")
    listed = json.loads(inside(podman_env, image, "pip", "list", "--format", "json"))
    installed = {normalise(p["name"]): p["version"] for p in listed}
    expected = {**lock_pins(GPU_LOCK), "openseek-cpt": "0.1.0", "pip": installed.get("pip")}
    assert installed == expected, {
        "not installed or other version": {k: v for k, v in expected.items() if installed.get(k) != v},
        "not in the lock": sorted(set(installed) - set(expected)),
    }


def test_doctor_says_no_gpu_and_exits_1_or_0_with_allow_cpu(podman_env, image):
    r = podman(podman_env, "run", "--rm", image, "openseek-cpt", "doctor", check=False)
    print(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ok   cuda build: CUDA 12.8" in r.stdout
    assert "FAIL gpu: no CUDA device visible" in r.stdout
    assert re.search(r"^doctor: \d+ checks, 3 failed \(driver, gpu, nccl\)$", r.stdout, re.M), r.stdout
    r = podman(podman_env, "run", "--rm", image, "openseek-cpt", "doctor", "--allow-cpu", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warn gpu: no CUDA device visible" in r.stdout and "0 failed" in r.stdout


def test_tiny_runs_end_to_end_on_the_cpu_inside_the_gpu_image(podman_env, image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # an arbitrary uid, as on clusters that map users
    r = podman(podman_env, "run", "--rm", "--user", "4321:4321", "-v", f"{work}:/workspace/run", "-w",
               "/workspace/run", image, "tiny", timeout=1800, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    soup = work / "models" / "tiny-openseek-soup"
    assert (soup / "provenance.json").is_file() and list(soup.glob("*.safetensors"))


@pytest.fixture(scope="module")
def pytest_wheels(tmp_path_factory) -> Path:
    """pytest and its two own requirements, downloaded here with the test lock's hashes."""
    folder = tmp_path_factory.mktemp("pytest-wheels")
    blocks = re.findall(
        r"^([a-z0-9_.-]+==\S+(?: \\\n\s+--hash=sha256:[0-9a-f]+)+)", TEST_LOCK.read_text(), re.M
    )
    wanted = [b for b in blocks if normalise(b.split("==")[0]) in PYTEST]
    assert len(wanted) == len(PYTEST), wanted
    (folder / "requirements.txt").write_text("\n".join(wanted) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-r",
                    str(folder / "requirements.txt"), "-d", str(folder)], check=True, timeout=600)  # fmt: skip
    return folder


def test_gpu_lever_tests_pass_inside_the_image_on_the_shipped_torch_and_transformers(
    podman_env, image, pytest_wheels, tmp_path
):
    """Only tests/, recipes/ and pyproject.toml go in: the package tested is the one installed in the image."""
    from openseek_cpt.testing.fixtures import qwen_ranks

    src = tmp_path / "src"
    shutil.copytree(REPO / "tests", src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "recipes", src / "recipes")  # the tiny recipe the shared fixtures run
    shutil.copy(REPO / "pyproject.toml", src)
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "pip install -q --no-index --no-deps --require-hashes --find-links /wheels -r /wheels/requirements.txt"
        " && pip check && python -c 'import openseek_cpt, torch, transformers;"
        ' print("package", openseek_cpt.__file__, "torch", torch.__version__, "transformers", transformers.__version__)\''
        f' && cd /src && python -m pytest -p no:cacheprovider -q -rfE -m "not e2e" --junitxml=/out/junit.xml {" ".join(LEVER_TESTS)}'
    )
    r = podman(podman_env, "run", "--rm", "--shm-size=2g", "-e", "OPENSEEK_CPT_CACHE=/cache",
               "-v", f"{qwen_ranks().parent}:/cache:ro", "-v", f"{pytest_wheels}:/wheels:ro",
               "-v", f"{src}:/src", "-v", f"{out}:/out", image, "sh", "-c", script,
               timeout=3600, check=False)  # fmt: skip
    print(r.stdout[-6000:])
    assert "package /opt/venv/lib/" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def test_image_saves_as_the_docker_archive_that_apptainer_builds_the_sif_from(podman_env, image, tmp_path):
    if shutil.which("apptainer") is None:  # the archive itself: test_container (same `make sif` line)
        pytest.skip(NO_APPTAINER)
    archive = tmp_path / "openseek-cpt.tar"
    try:
        manifest = save_as_make_sif_does(podman_env, image, archive)
        assert manifest[0]["RepoTags"] == [image]
        sif = tmp_path / "openseek-cpt.sif"
        subprocess.run(
            ["apptainer", "build", str(sif), f"docker-archive://{archive}"], check=True, timeout=3600
        )
        out = subprocess.run(["apptainer", "exec", str(sif), "python", "-c", "import torch; print(torch.version.cuda)"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert out.strip() == "12.8"
    finally:
        archive.unlink(missing_ok=True)  # as large as the image; pytest keeps its last temp folders
