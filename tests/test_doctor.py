"""`openseek-cpt doctor` reports on any machine and fails when the node cannot train the recipe.

CI has no GPU: there the GPU checks must FAIL (exit 1), `--allow-cpu` turns them into warnings
(exit 0), and a kernel the recipe asks for but the machine lacks fails even then. The image
definition and the GPU lock must carry what those kernels need (gcc + Python headers, liger-kernel).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, run_cli

OPENSEEK_RECIPE = str(REPO / "recipes" / "openseek" / "config.yaml")
LINE = re.compile(r"^(ok|warn|FAIL) +[\w .-]+: .+$")


def lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln and not ln.startswith("doctor:")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_without_a_gpu_doctor_reports_every_check_and_exits_1(tmp_path):
    r = run_cli("doctor", "--recipe", OPENSEEK_RECIPE, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert all(LINE.match(ln) for ln in lines(r.stdout)), r.stdout
    for name in ("gpu", "driver", "nccl"):
        assert re.search(rf"^FAIL {name}: ", r.stdout, re.M), r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_allow_cpu_turns_the_gpu_checks_into_warnings_and_exits_0(tmp_path):
    r = run_cli("doctor", "--allow-cpu", "--recipe", OPENSEEK_RECIPE, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^warn gpu: ", r.stdout, re.M) and "FAIL" not in r.stdout


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_a_missing_attention_kernel_the_recipe_asks_for_fails_even_with_allow_cpu(tmp_path):
    r = run_cli(
        "doctor", "--allow-cpu", "--recipe", OPENSEEK_RECIPE,
        "--set", "train.attn_implementation=flash_attention_2", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^FAIL attention flash_attention_2: flash_attn not installed", r.stdout, re.M), r.stdout


def test_the_image_has_a_c_compiler_and_python_headers_for_triton():
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    install = next(ln for ln in dockerfile.splitlines() if "apt-get install" in ln)
    for package in ("gcc", "libc6-dev", "python3-dev"):
        assert re.search(rf"\b{re.escape(package)}\b", install), f"{package} missing from: {install}"


def test_liger_kernel_is_pinned_in_the_gpu_lock_and_optional_everywhere_else():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("liger") for d in project["dependencies"])  # CI installs no GPU package
    gpu_extra = project["optional-dependencies"]["gpu"]
    assert gpu_extra == ["liger-kernel==0.8.5"]
    gpu_lock = (REPO / "container" / "requirements.lock").read_text()
    cpu_lock = (REPO / "container" / "requirements-cpu.lock").read_text()
    assert re.search(r"^liger-kernel==0\.8\.5 \\\n    --hash=sha256:[0-9a-f]{64}", gpu_lock, re.M)
    assert re.search(r"^triton==", gpu_lock, re.M)  # liger's only other requirement besides torch
    assert "liger-kernel" not in cpu_lock


def test_grouped_gemm_is_called_fast_only_on_the_architectures_with_the_kernel():
    from openseek_cpt import doctor

    assert doctor.grouped_gemm_check((9, 0)).status == "ok"  # H100/H200
    assert doctor.grouped_gemm_check((10, 0)).status == "ok"  # B200
    for capability in ((8, 0), (8, 9), (12, 0)):  # A800/A100, L40S, consumer Blackwell
        check = doctor.grouped_gemm_check(capability)
        assert check.status == "warn" and "one mm per expert" in check.detail, check


def test_the_smoke_step_runs_the_levers_forward_and_backward_and_reports_a_finite_loss():
    """On the CPU with sdpa (no GPU here); on a GPU doctor runs it with the recipe's attention."""
    from openseek_cpt import doctor

    check = doctor.smoke_step("sdpa", "chunked", device="cpu")
    assert check.status == "ok", check.line()
    assert check.detail.startswith("loss ")


def test_an_h100_pcie_is_counted_at_its_own_peak_not_the_sxm_one(monkeypatch):
    import torch

    from openseek_cpt.modeling import flops

    for name, peak in (
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
    ):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert flops.device_peak_flops() == (peak, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_without_a_gpu_the_last_line_is_a_plain_verdict(tmp_path):
    r = run_cli("doctor", "--recipe", OPENSEEK_RECIPE, cwd=tmp_path)
    assert (
        r.stdout.splitlines()[-1]
        == "doctor: no GPU visible: not a training node; --allow-cpu checks the rest"
    )


def test_a_cuda_13_build_is_a_warning_that_says_how_to_get_the_tested_stack(monkeypatch):
    from openseek_cpt import doctor

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    check = next(c for c in doctor.collect(None, allow_cpu=True) if c.name == "cuda build")
    assert check.status == "warn", check.line()
    assert (
        "CUDA 13.0" in check.detail
        and "pip install --require-hashes -r container/requirements.lock" in check.detail
    )
