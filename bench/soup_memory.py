"""Wall time and peak memory of `openseek-cpt soup` against mergekit's linear merge and the floors.

Builds a synthetic model (default: llama-shaped, ~1 GB in bf16, that both tools accept; `--arch
deepseek` for the OpenSeek-Small-shaped set with 64 routed experts, which mergekit cannot merge)
and 8 checkpoints of it, then measures in this run, for base + 2 and base + 8 checkpoints:
- `openseek-cpt soup` (a subprocess running the CLI, timed from start to exit, imports included);
- mergekit `linear` (normalized, fp32 compute, bf16 out, `--lazy-unpickle`, in its own virtual
  environment: created by this script if missing, with the same CPU torch as this one);
- the I/O floor: read every input file once and write the output's bytes once, warm page cache
  and cold (inputs evicted with posix_fadvise DONTNEED first);
- the compute floor: sha256 of every input byte, plus one bf16->fp32 multiply-add per input
  element, each timed alone on one core (in memory), the sum divided over the cores.
The soup runs --repeats times (default 3), each run right after its own warm I/O floor and compute
floor, because a shared machine's speed drifts over minutes (the warm I/O floor far more than the
soup, which streams its inputs from DRAM, or the compute floor, in cache; docs/benchmarks.md); the
summary takes the median of each time (peak RSS: the highest of the runs) and prints every run's
ratio; mergekit and the cold floor run once.
Peak RSS is each process's own maximum (wait4), also shown above an idle process of the same tool
that only did its imports. Both outputs are compared with the fp32 mean rounded once to bf16, and
the soup's merge_info hashes with sha256 of the files. Targets: soup wall <= 1.5x
max(warm I/O floor, compute floor) and < 0.5x mergekit; RSS above idle <= 4x the largest tensor
and < 1/4 of mergekit's; 2 vs 8 checkpoints: memory within 10%.

    python bench/soup_memory.py [--arch llama|deepseek] [--workdir DIR] [--scale 1.0] [--keep]
        [--repeats 3] [--no-mergekit] [--mergekit-venv DIR] [--wheels /opt/wheels]

Other processes share the cores: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 300_000_000
CORES = os.cpu_count() or 1
# Llama-shaped: 7 layers of hidden 2048, untied 32k vocabulary (~0.98 GB in bf16).
LLAMA = {"hidden": 2048, "ffn": 5632, "layers": 7, "heads": 16, "vocab": 32_000}
# OpenSeek-Small-v1's tensors: embedding, dense layer 0, one MoE layer (tied lm_head).
HIDDEN, VOCAB, DENSE_FFN, EXPERT_FFN, EXPERTS, SHARED = 1280, 151_851, 7168, 896, 64, 2
DEFAULT_VENV = Path.home() / ".cache" / "openseek-cpt" / "mergekit-venv"

# Runs in each measured child: the time after the imports and the process's peak RSS.
# What `openseek-cpt soup` imports (no torch), with the OpenBLAS setting its command makes first.
IDLE_SOUP = "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS', '1'); from openseek_cpt import cli; import openseek_cpt.soup.stage"
IDLE_MERGEKIT = "import torch, transformers; import mergekit.merge, mergekit.config"
FLOOR = """
import os, sys, time
from pathlib import Path
files, out, out_bytes = [Path(p) for p in sys.argv[1:-2]], Path(sys.argv[-2]), int(sys.argv[-1])
t0 = time.perf_counter()
buf = bytearray(16 << 20)
for f in files:  # read every input byte once
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
t_read = time.perf_counter() - t0
with open(out, "wb", buffering=0) as fh:  # write the output's bytes once
    left = out_bytes
    while left > 0:
        left -= fh.write(memoryview(buf)[: min(left, len(buf))])
    t_write = time.perf_counter() - t0
    os.fsync(fh.fileno())
print(f"FLOOR {t_write} {t_read} {time.perf_counter() - t0}")
"""
COMPUTE = """
import hashlib, sys, time
import torch
torch.set_num_threads(1)
nbytes, nelems = int(sys.argv[1]), int(sys.argv[2])
block = torch.randn(1 << 21).to(torch.bfloat16)
raw = memoryview(block.view(torch.uint8).numpy())
t0 = time.perf_counter()
h = hashlib.sha256()
for _ in range(nbytes // len(raw)):
    h.update(raw)
t_sha = time.perf_counter() - t0
acc, tmp = torch.zeros(block.numel()), torch.empty(block.numel())
t0 = time.perf_counter()
for _ in range(nelems // block.numel()):
    acc.add_(tmp.copy_(block), alpha=1.0)
print(f"COMPUTE {t_sha} {time.perf_counter() - t0}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama", "deepseek"), default="llama")
    ap.add_argument(
        "--workdir", default=None, help="where the synthetic models go (default: a temp dir in /tmp)"
    )
    ap.add_argument("--scale", type=float, default=1.0, help="scale the model (layers or experts)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models (reused by the next run)")
    ap.add_argument("--counts", default="2,8", help="numbers of checkpoints to merge with the base")
    ap.add_argument(
        "--repeats", type=int, default=3, help="soup runs (each with its own floors); medians are reported"
    )
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    ap.add_argument("--mergekit-venv", default=str(DEFAULT_VENV))
    ap.add_argument("--wheels", default=os.environ.get("WHEELS", "/opt/wheels"), help="find-links for torch")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats}: give 1 or more soup runs")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soup-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {_uptime()}; {CORES} cores; {shutil.disk_usage(work).free / 1e9:.0f} GB free at {work}")
    mergekit = None
    if not args.no_mergekit and args.arch == "llama":
        mergekit = ensure_mergekit(Path(args.mergekit_venv), args.wheels)
    elif not args.no_mergekit:
        print("[bench] mergekit has no deepseek_v3 architecture: skipped (use --arch llama to compare)")
    try:
        counts = [int(n) for n in args.counts.split(",")]
        run_bench(work, args.arch, args.scale, counts, mergekit, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print(f"[bench] {_uptime()}")


def run_bench(
    work: Path, arch: str, scale: float, counts: list[int], mergekit: Path | None, repeats: int
) -> None:
    t0 = time.perf_counter()
    shapes, config = llama_shapes(scale) if arch == "llama" else deepseek_shapes(scale)
    base = write_model(work / "base", shapes, config, seed=0)
    ckpts = [
        write_model(work / f"runs/checkpoint-{100 * (i + 1)}", shapes, config, seed=i + 1)
        for i in range(max(counts))
    ]
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    largest = max(_numel(s) * (4 if dt == "F32" else 2) for _, s, dt in shapes)
    print(
        f"[bench] synthetic {arch} model: {len(shapes)} tensors, {model_bytes / 1e9:.2f} GB in "
        f"{len(list(base.glob('*.safetensors')))} shards, largest tensor {largest / 1e6:.0f} MB "
        f"(built or reused in {time.perf_counter() - t0:.0f} s)"
    )
    idle_soup = child([sys.executable, "-c", IDLE_SOUP])["rss"]
    idle_mk = child([str(mergekit / "bin/python"), "-c", IDLE_MERGEKIT])["rss"] if mergekit else 0
    print(f"[bench] idle after imports: soup {idle_soup / 1e6:.0f} MB, mergekit {idle_mk / 1e6:.0f} MB")
    results = {}
    for n in counts:
        inputs = [base, *ckpts[:n]]
        files = [f for d in inputs for f in sorted(d.iterdir()) if "safetensors" in f.name]
        in_bytes = sum(f.stat().st_size for f in files)
        r = {"n": n, "in_bytes": in_bytes}
        r["cold"] = floor(files, work, model_bytes, evict=True)
        floor(files, work, model_bytes)  # warm the page cache
        elems = sum(_numel(s) for _, s, _ in shapes) * len(inputs)
        recipe = work / f"recipe-{n}.json"
        soup_out = work / f"soup-out-{n}"
        recipe.write_text(json.dumps({"soup": {
            "base_dir": str(base), "checkpoints": [str(c) for c in ckpts[:n]],
            "output_dir": str(soup_out), "dtype": "bfloat16", "max_shard_size": SHARD_BYTES,
        }}))  # fmt: skip
        warm, compute, soups = [], [], []
        for _ in range(repeats):  # floors and soup interleaved: each repeat sees the same machine state
            warm.append(floor(files, work, model_bytes))
            out = child([sys.executable, "-c", COMPUTE, str(in_bytes), str(elems)])["stdout"]
            t_sha, t_fma = (float(x) for x in out.split("COMPUTE ")[1].split())
            compute.append({"compute": (t_sha + t_fma) / CORES, "sha": t_sha, "fma": t_fma})
            shutil.rmtree(soup_out, ignore_errors=True)
            soups.append(child([sys.executable, "-m", "openseek_cpt", "soup", "--recipe", str(recipe)]))
        r["warm"] = _median(warm, "write")
        r.update(_median(compute, "compute"))
        r["soup"] = {**_median(soups, "wall"), "rss": max(s["rss"] for s in soups)}  # the highest peak
        r["ratios"] = [
            s["wall"] / max(w["write"], c["compute"]) for w, c, s in zip(warm, compute, soups, strict=True)
        ]
        info = json.loads((soup_out / "merge_info.json").read_text())
        r["soup_merge_s"] = info["io"]["merge_seconds"]
        r["soup_rehashed"] = info["io"]["bytes_read_again_for_hashes"]
        r["hashes_ok"] = all(
            digest == _sha256(Path(row["path"]) / name)
            for row in info["inputs"]
            for name, digest in row["files"].items()
        ) and all(digest == _sha256(soup_out / name) for name, digest in info["output_hashes"].items())
        mk_out = work / f"mergekit-out-{n}"
        if mergekit:
            cfg = work / f"mergekit-{n}.yml"
            cfg.write_text(json.dumps({
                "merge_method": "linear",
                "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in inputs],
                "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "bfloat16",
            }))  # fmt: skip
            cmd = [str(mergekit / "bin/mergekit-yaml"), str(cfg), str(mk_out), "--lazy-unpickle"]
            r["mergekit"] = child(
                [*cmd, "--out-shard-size", f"{SHARD_BYTES // 1_000_000}M", "--no-copy-tokenizer"]
            )
        print(f"[bench] N={n}: checking both outputs against the fp32 mean rounded to bf16 ...", flush=True)
        r["soup_exact"] = exact(inputs, soup_out)
        r["mergekit_exact"] = exact(inputs, mk_out) if mergekit else None
        shutil.rmtree(soup_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
        results[n] = r
        report_one(r, largest, idle_soup, idle_mk)
    summary(results, largest, idle_soup, idle_mk)


def report_one(r: dict, largest: int, idle_soup: int, idle_mk: int) -> None:
    n, soup = r["n"], r["soup"]
    print(
        f"[bench] N={n} ({r['in_bytes'] / 1e9:.2f} GB read): I/O floor warm {r['warm']['write']:.2f} s "
        f"(+ fsync {r['warm']['fsync'] - r['warm']['write']:.2f} s), cold {r['cold']['write']:.2f} s; "
        f"compute floor {r['compute']:.2f} s (sha256 {r['sha']:.2f} s + fma {r['fma']:.2f} s, / {CORES} cores)"
    )
    spread = ", ".join(f"{x:.2f}" for x in r["ratios"])
    print(
        f"[bench] N={n} soup: {soup['wall']:.2f} s wall ({r['soup_merge_s']:.2f} s merging, {soup['cpu']:.2f} s CPU), peak RSS "
        f"{soup['rss'] / 1e6:.0f} MB ({(soup['rss'] - idle_soup) / 1e6:.0f} MB above idle), exact: {r['soup_exact']}, "
        f"hashes = sha256 of the files: {r['hashes_ok']}, bytes read again for hashes: {r['soup_rehashed']}; "
        f"x floor in each of the {len(r['ratios'])} runs: {spread}"
    )
    if "mergekit" in r:
        mk = r["mergekit"]
        print(
            f"[bench] N={n} mergekit linear: {mk['wall']:.2f} s wall ({mk['cpu']:.2f} s CPU), peak RSS {mk['rss'] / 1e6:.0f} MB "
            f"({(mk['rss'] - idle_mk) / 1e6:.0f} MB above idle), exact: {r['mergekit_exact']}"
        )


def summary(results: dict, largest: int, idle_soup: int, idle_mk: int) -> None:
    print(f"\n[bench] largest tensor {largest / 1e6:.0f} MB; wall times include process start and imports")
    print(
        f"{'N':>2}  {'method':<22} {'wall s':>7} {'x floor':>8} {'peak RSS':>9} {'above idle':>11} {'x largest':>9} exact"
    )
    for n, r in results.items():
        floor_s = max(r["warm"]["write"], r["compute"])
        rows = [
            ("I/O floor warm", r["warm"]["write"], None, None),
            ("I/O floor cold", r["cold"]["write"], None, None),
        ]
        rows += [("compute floor", r["compute"], None, None)]
        rows += [("openseek-cpt soup", r["soup"]["wall"], r["soup"]["rss"], idle_soup)]
        if "mergekit" in r:
            rows += [("mergekit linear", r["mergekit"]["wall"], r["mergekit"]["rss"], idle_mk)]
        for name, wall, rss, idle in rows:
            mem = (
                f"{rss / 1e6:>6.0f} MB {(rss - idle) / 1e6:>8.0f} MB {(rss - idle) / largest:>9.2f}"
                if rss
                else " " * 31
            )
            ok = {"openseek-cpt soup": r["soup_exact"], "mergekit linear": r["mergekit_exact"]}.get(name, "")
            print(f"{n:>2}  {name:<22} {wall:>7.2f} {wall / floor_s:>8.2f} {mem} {ok}")
    for n, r in results.items():
        floor_s = max(r["warm"]["write"], r["compute"])
        soup_above = r["soup"]["rss"] - idle_soup
        line = (
            f"[bench] N={n}: soup {r['soup']['wall'] / floor_s:.2f}x max(warm I/O, compute) floor (target <= 1.5); "
            f"RSS above idle {soup_above / largest:.2f}x largest tensor (target <= 4)"
        )
        if "mergekit" in r:
            mk_above = r["mergekit"]["rss"] - idle_mk
            line += (
                f"; {r['soup']['wall'] / r['mergekit']['wall']:.2f}x mergekit's time (target < 0.5), "
                f"{soup_above / mk_above:.3f}x its memory above idle (target < 0.25)"
            )
        print(line)
    if len(results) > 1:
        (a, ra), (b, rb) = sorted(results.items())[0], sorted(results.items())[-1]
        mem = (rb["soup"]["rss"] - idle_soup) / (ra["soup"]["rss"] - idle_soup) - 1
        print(
            f"[bench] soup {a} vs {b} checkpoints: memory above idle {mem:+.1%} (target within 10%); time "
            f"x{rb['soup']['wall'] / ra['soup']['wall']:.2f} for x{rb['in_bytes'] / ra['in_bytes']:.2f} the bytes read"
        )


# --------------------------------------------------------------------------- measuring


# Started fresh (exec), this small process forks the measured command and reports its wait4 rusage:
# a child forked straight from this bench would inherit the bench's own (large) peak RSS.
SPAWN = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
cpu = usage.ru_utime + usage.ru_stime
print("SPAWN", usage.ru_maxrss * 1024, time.perf_counter() - t0, cpu, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _median(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median (the upper one of an even count): its other figures stay its own."""
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def child(cmd: list[str]) -> dict:
    """Run one process: its wall time, its own peak RSS (bytes) and its stdout."""
    proc = subprocess.run([sys.executable, "-c", SPAWN, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"[bench] {' '.join(cmd[:4])} ... failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    _, rss, wall, cpu = proc.stderr.strip().splitlines()[-1].split()
    return {"wall": float(wall), "rss": int(rss), "cpu": float(cpu), "stdout": proc.stdout}


def floor(files: list[Path], work: Path, out_bytes: int, evict: bool = False) -> dict:
    if evict:
        for f in [*files]:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    out = child([sys.executable, "-c", FLOOR, *map(str, files), str(work / "floor.bin"), str(out_bytes)])
    (work / "floor.bin").unlink()
    t_write, t_read, t_fsync = (float(x) for x in out["stdout"].split("FLOOR ")[1].split())
    return {"write": t_write, "read": t_read, "fsync": t_fsync}


def exact(inputs: list[Path], out: Path) -> bool:
    """Is every output tensor the fp32 mean of the inputs (summed in input order), rounded once to bf16?"""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        return {k: d / "model.safetensors" for k in _keys(d / "model.safetensors")}

    maps = [where(d) for d in inputs]
    got = where(out) if out.is_dir() else {}
    if sorted(got) != sorted(maps[0]):
        print(f"[bench] {out.name}: keys differ from the base ({len(got)} vs {len(maps[0])})")
        return False
    for key in sorted(maps[0]):
        acc = None
        for m in maps:
            with safe_open(m[key], "pt") as f:
                x = f.get_tensor(key).float()
            acc = x if acc is None else acc.add_(x)
        want = acc / len(maps)
        with safe_open(got[key], "pt") as f:
            y = f.get_tensor(key)
        if not torch.equal(y, want.to(y.dtype)) or (y.dtype != torch.float32 and y.dtype != torch.bfloat16):
            print(f"[bench] {out.name}: {key} differs from the fp32 mean ({y.dtype})")
            return False
    return True


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _uptime() -> str:
    return "uptime: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- mergekit


def ensure_mergekit(venv: Path, wheels: str) -> Path:
    """mergekit in its own virtual environment, with this interpreter's (CPU) torch pinned."""
    if (venv / "bin" / "mergekit-yaml").is_file():
        return venv
    import torch

    print(f"[bench] installing mergekit into {venv} (torch pinned to {torch.__version__}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    links = ["--find-links", wheels] if Path(wheels).is_dir() else []
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")  # never a CUDA torch pulled in by mergekit
    subprocess.run([*pip, *links, f"torch=={torch.__version__}"], check=True)
    subprocess.run([*pip, *links, "-c", str(constraints), "mergekit"], check=True)
    return venv


# --------------------------------------------------------------------------- synthetic models


def llama_shapes(scale: float) -> tuple[list[tuple[str, tuple[int, ...], str]], dict]:
    h, f, v = LLAMA["hidden"], LLAMA["ffn"], LLAMA["vocab"]
    layers = max(1, round(LLAMA["layers"] * scale))
    shapes = [
        ("model.embed_tokens.weight", (v, h), "BF16"),
        ("lm_head.weight", (v, h), "BF16"),
        ("model.norm.weight", (h,), "BF16"),
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,), "BF16"),
            (f"{p}.post_attention_layernorm.weight", (h,), "BF16"),
        ]
        shapes += [(f"{p}.self_attn.{n}_proj.weight", (h, h), "BF16") for n in "qkvo"]
        shapes += [(f"{p}.mlp.{n}.weight", s, "BF16") for n, s in _mlp(f, h)]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": LLAMA["heads"], "num_key_value_heads": LLAMA["heads"],
        "vocab_size": v, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    return shapes, config


def deepseek_shapes(scale: float) -> tuple[list[tuple[str, tuple[int, ...], str]], dict]:
    """OpenSeek-Small-v1's tensors: embedding, dense layer 0, one MoE layer (tied lm_head)."""
    h, experts = HIDDEN, max(1, round(EXPERTS * scale))
    shapes = [("model.embed_tokens.weight", (VOCAB, h), "BF16"), ("model.norm.weight", (h,), "BF16")]
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,), "BF16"),
            (f"{p}.post_attention_layernorm.weight", (h,), "BF16"),
            (f"{p}.self_attn.q_proj.weight", (10 * 192, h), "BF16"),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (512 + 64, h), "BF16"),
            (f"{p}.self_attn.kv_a_layernorm.weight", (512,), "BF16"),
            (f"{p}.self_attn.kv_b_proj.weight", (10 * (128 + 128), 512), "BF16"),
            (f"{p}.self_attn.o_proj.weight", (h, 10 * 128), "BF16"),
        ]
    shapes += [(f"model.layers.0.mlp.{n}.weight", s, "BF16") for n, s in _mlp(DENSE_FFN, h)]
    p = "model.layers.1.mlp"
    shapes += [
        (f"{p}.gate.weight", (experts, h), "BF16"),
        (f"{p}.gate.e_score_correction_bias", (experts,), "F32"),
    ]
    shapes += [(f"{p}.shared_experts.{n}.weight", s, "BF16") for n, s in _mlp(SHARED * EXPERT_FFN, h)]
    for e in range(experts):
        shapes += [(f"{p}.experts.{e}.{n}.weight", s, "BF16") for n, s in _mlp(EXPERT_FFN, h)]
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "tie_word_embeddings": True,
    }
    return shapes, config


def _mlp(ffn: int, h: int) -> list[tuple[str, tuple[int, int]]]:
    return [("gate_proj", (ffn, h)), ("up_proj", (ffn, h)), ("down_proj", (h, ffn))]


def write_model(path: Path, shapes, config: dict, seed: int) -> Path:
    """Sharded safetensors (+ index and config) as save_pretrained writes them; one shard in RAM at a time.

    A model already there with the same shapes (from `--keep`) is reused.
    """
    import torch
    from safetensors.torch import save_file

    stamp = json.dumps({"shapes": shapes, "config": config, "seed": seed})
    if (path / "bench-stamp.json").is_file() and (path / "bench-stamp.json").read_text() == stamp:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shards: list[list] = [[]]
    size = 0
    for key, shape, dtype in shapes:
        nbytes = _numel(shape) * (4 if dtype == "F32" else 2)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape, dtype))
        size += nbytes
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape, dtype in shard:
            t = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen)
            tensors[key] = t if dtype == "F32" else t.to(torch.bfloat16)
            del t
            weight_map[key] = name
        save_file(tensors, path / name, metadata={"format": "pt"})
        del tensors
    total = sum(_numel(s) * (4 if dt == "F32" else 2) for _, s, dt in shapes)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(config))
    (path / "bench-stamp.json").write_text(stamp)
    return path


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
