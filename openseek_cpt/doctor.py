"""`openseek-cpt doctor`: can this node train the recipe fast and correctly? One line per check.

Checks, each `ok`, `warn` or `FAIL`: torch and its CUDA build (12.x), the GPUs (count, name,
compute capability), the driver against the CUDA 12 minimum, bf16 support when the recipe asks for
bf16, the kernels the recipe asks for (flash-attn for flash_attention_2/3; Triton + a C compiler +
Python headers for flex_attention, torch.compile and Liger; liger-kernel for `train.loss: liger`;
what the routed experts' bf16 grouped_mm runs as on this architecture), NCCL (available, its
version, and a one-process all-reduce on the first GPU), and a one-step smoke test of the levers
(attention, bf16 experts, loss) on the first GPU. Exit 0 when nothing FAILs, 1 otherwise; on a
machine without a GPU the GPU checks FAIL (this is a check for training nodes) unless
`--allow-cpu`, which turns them into warnings so the rest can be checked anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openseek_cpt.errors import EXIT_FAILURE, EXIT_OK

# CUDA 12.x needs a driver >= 525.60.13 on Linux (minor-version compatibility covers 12.0-12.x).
MIN_DRIVER_CUDA12 = (525, 60, 13)
# Triton kernels need a C compiler and Python.h at run time (launcher stubs built per Python).
COMPILERS = ("cc", "gcc", "clang")


@dataclass
class Check:
    status: str  # ok | warn | FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def run(recipe: Any = None, allow_cpu: bool = False) -> int:
    """Print every check; EXIT_OK if none failed, else EXIT_FAILURE."""
    checks = collect(recipe, allow_cpu)
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if c.status == "FAIL"]
    print(
        f"doctor: {len(checks)} checks, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
    )
    if any(c.name == "gpu" and c.status != "ok" for c in checks):
        print(
            "doctor: no GPU visible: not a training node"
            + ("" if allow_cpu else "; --allow-cpu checks the rest")
        )
    return EXIT_FAILURE if failed else EXIT_OK


def collect(recipe: Any = None, allow_cpu: bool = False) -> list[Check]:
    import torch

    t = getattr(recipe, "train", None)
    attn = getattr(t, "attn_implementation", "sdpa")
    loss = getattr(t, "loss", "chunked")
    precision = getattr(t, "precision", "bf16-mixed")
    compile_asked = bool((getattr(t, "args", None) or {}).get("torch_compile"))
    checks = [Check("ok", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    gpu = torch.cuda.is_available()
    no_gpu = "warn" if allow_cpu else "FAIL"
    if torch.version.cuda is None:
        checks.append(Check(no_gpu, "cuda build", "torch is a CPU build; install the GPU lock (CUDA 12.8)"))
    elif not torch.version.cuda.startswith("12."):
        checks.append(
            Check(
                "warn",
                "cuda build",
                f"CUDA {torch.version.cuda}, not the tested stack (the image pins torch 2.10.0 + CUDA 12.8): "
                "train in the image, or `pip install --require-hashes -r container/requirements.lock`",
            )
        )
    else:
        checks.append(Check("ok", "cuda build", f"CUDA {torch.version.cuda}"))
    checks.append(driver_check(no_gpu))
    if not gpu:
        checks.append(Check(no_gpu, "gpu", "no CUDA device visible (CUDA_VISIBLE_DEVICES, --nv, driver)"))
    else:
        names = [
            f"{torch.cuda.get_device_name(i)} sm{''.join(map(str, torch.cuda.get_device_capability(i)))}"
            for i in range(torch.cuda.device_count())
        ]
        checks.append(Check("ok", "gpu", f"{len(names)} x {', '.join(sorted(set(names)))}"))
        if precision.startswith("bf16"):
            ok = torch.cuda.is_bf16_supported()
            checks.append(
                Check(
                    "ok" if ok else "FAIL",
                    "bf16",
                    "supported" if ok else f"not supported; {precision} needs sm80+",
                )
            )
        if precision == "bf16-mixed":
            checks.append(grouped_gemm_check(torch.cuda.get_device_capability(0)))
    checks.extend(kernel_checks(attn, loss, compile_asked, gpu))
    checks.append(nccl_check(gpu, no_gpu))
    if gpu:
        checks.append(smoke_step(attn, loss))
    return checks


# torch's bf16 grouped_mm takes a CUTLASS grouped GEMM on these compute capabilities only.
GROUPED_GEMM_ARCHS = {(9, 0): "Hopper (H100/H800/H200)", (10, 0): "Blackwell (B200)"}


def grouped_gemm_check(capability: tuple[int, int]) -> Check:
    """What the routed experts' bf16 grouped_mm runs as on this GPU."""
    sm = f"sm{capability[0]}{capability[1]}"
    if capability in GROUPED_GEMM_ARCHS:
        return Check(
            "ok", "experts grouped_mm", f"{sm} {GROUPED_GEMM_ARCHS[capability]}: CUTLASS grouped GEMM"
        )
    return Check(
        "warn",
        "experts grouped_mm",
        f"{sm}: no grouped GEMM kernel (A800/A100 are sm80): one mm per expert after a host sync",
    )


def smoke_step(attn: str, loss: str, device: str = "cuda") -> Check:
    """One forward + backward of a tiny deepseek_v3 on the first GPU with the recipe's attention,
    bf16 experts and loss under bf16 autocast: the levers' kernels compile and run here."""
    import torch

    from openseek_cpt.modeling import attention, experts, router_precision
    from openseek_cpt.modeling import loss as lm_loss
    from openseek_cpt.testing.fixtures import tiny_config

    name = f"smoke step ({attn}, {loss} loss, bf16 experts)"
    try:
        from transformers import DeepseekV3ForCausalLM

        attention.prepare(attn)
        config = tiny_config(512, 2)
        config.use_cache = False
        config._attn_implementation = attn
        config._experts_implementation = experts.resolve(None, "bf16-mixed")
        model = DeepseekV3ForCausalLM(config).to(device).train()  # type: ignore[arg-type]
        router_precision.keep_routers_fp32(model)
        lm_loss.install(model, loss)
        ids = torch.randint(3, 512, (2, 256), device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            value = model(input_ids=ids, labels=ids).loss
        value.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        finite = bool(torch.isfinite(value)) and all(
            g is not None and bool(torch.isfinite(g).all()) for g in grads
        )
    except Exception as exc:  # any kernel that fails to build or run is this check's finding
        return Check(
            "FAIL", name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        )
    return Check(
        "ok" if finite else "FAIL", name, f"loss {float(value):.3f}" + ("" if finite else ", not finite")
    )


def driver_check(no_gpu: str) -> Check:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check(
            no_gpu,
            "driver",
            "nvidia-smi not found (no NVIDIA driver here, or a container run without --gpus/--nv/CDI)",
        )
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check(no_gpu, "driver", f"nvidia-smi failed: {exc}")
    if not out:
        return Check(no_gpu, "driver", "nvidia-smi reports no GPU")
    version = tuple(int(x) for x in out[0].split(".") if x.isdigit())
    ok = version >= MIN_DRIVER_CUDA12
    need = ".".join(map(str, MIN_DRIVER_CUDA12))
    return Check(
        "ok" if ok else "FAIL", "driver", f"{out[0]} ({'>=' if ok else '<'} {need}, the CUDA 12.x minimum)"
    )


def kernel_checks(attn: str, loss: str, compile_asked: bool, gpu: bool) -> list[Check]:
    checks = []
    triton_needed = attn == "flex_attention" or loss == "liger" or compile_asked
    if triton_needed or gpu:
        status = "FAIL" if triton_needed and gpu else "warn"
        has_triton = importlib.util.find_spec("triton") is not None
        checks.append(
            Check("ok" if has_triton else status, "triton", "importable" if has_triton else "not installed")
        )
        compiler = next((c for c in COMPILERS if shutil.which(c)), None)
        checks.append(
            Check(
                "ok" if compiler else status,
                "c compiler",
                (shutil.which(compiler) or compiler)
                if compiler
                else "none on PATH; Triton cannot build its launcher",
            )
        )
        header = Path(sysconfig.get_paths()["include"]) / "Python.h"
        checks.append(
            Check(
                "ok" if header.is_file() else status,
                "python headers",
                str(header) if header.is_file() else f"{header} missing (install python3-dev)",
            )
        )
    module = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attn)
    if module:
        found = importlib.util.find_spec(module) is not None
        checks.append(
            Check(
                "ok" if found else "FAIL",
                f"attention {attn}",
                f"{module} importable"
                if found
                else f"{module} not installed; use flex_attention or install it",
            )
        )
    else:
        checks.append(Check("ok", f"attention {attn}", "built into torch/transformers"))
    if loss == "liger":
        found = importlib.util.find_spec("liger_kernel") is not None
        checks.append(
            Check(
                "ok" if found else "FAIL",
                "loss liger",
                "liger_kernel importable" if found else "liger-kernel missing: pip install '.[gpu]'",
            )
        )
    return checks


def nccl_check(gpu: bool, no_gpu: str) -> Check:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        gloo = dist.is_available() and dist.is_gloo_available()
        return Check(no_gpu, "nccl", f"not available in this torch build (gloo: {'yes' if gloo else 'no'})")
    try:
        version = ".".join(map(str, torch.cuda.nccl.version()))  # the library loads without a GPU
    except (RuntimeError, AttributeError):
        version = "?"
    if not gpu:
        return Check(no_gpu, "nccl", f"{version} built in, but no GPU to run it on")
    if dist.is_initialized():
        return Check("ok", "nccl", f"{version} (process group already running)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    try:
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        x = torch.ones(1, device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        result = float(x)
    except Exception as exc:  # report any NCCL failure as a check result
        return Check("FAIL", "nccl", f"{version}: all-reduce failed: {exc}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return Check("ok" if result == 1.0 else "FAIL", "nccl", f"{version}, one-GPU all-reduce ok")
