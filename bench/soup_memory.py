"""Peak memory and wall time of `openseek-cpt soup` against the naive soup and the I/O floor.

Builds a synthetic OpenSeek-Small-shaped model (real tensor sizes: the 151,851 x 1280 embedding,
an MLA attention block, the dense first layer, one MoE layer with 64 experts + 2 shared, the
router with its fp32 bias; about 0.93 GB in bf16, in several shards) and 8 checkpoints of it, then
measures, in this run, for 2 and for 8 checkpoints:
- `openseek-cpt soup` (a subprocess running the CLI);
- naive: load every model whole, average in fp32, save (a subprocess; what the original merge did);
- I/O floor: read every input file once and write the output's bytes (a subprocess).
Peak RSS is each process's VmHWM minus the VmHWM of an idle process that did the same imports;
wall time is measured after the imports, inside each process. Targets (issue 4): soup RSS above
idle <= 4x the largest tensor as stored, within 10% between 2 and 8 checkpoints; soup wall <=
1.5x the I/O floor.

    python bench/soup_memory.py [--workdir /tmp/soup-bench] [--scale 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, VOCAB, DENSE_FFN, EXPERT_FFN, EXPERTS, SHARED = 1280, 151_851, 7168, 896, 64, 2
SHARD_BYTES = 300_000_000

# Runs in each child: report VmHWM (peak RSS) and the seconds of work after the imports.
CHILD_PRELUDE = """
import json, sys, time
import torch, safetensors, transformers, safetensors.torch
import transformers.models.deepseek_v3.modeling_deepseek_v3  # soup reads its _keep_in_fp32_modules
from openseek_cpt import cli, soup
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
t0 = time.perf_counter()
"""
CHILD_REPORT = """
print("BENCH " + json.dumps({"hwm": _hwm(), "seconds": time.perf_counter() - t0, "rc": rc}), flush=True)
"""
IDLE = "rc = 0"
SOUP = "rc = cli.main(sys.argv[1:])"
NAIVE = """
from safetensors.torch import load_file, save_file
from pathlib import Path
dirs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
models = []
for d in dirs:  # every model whole in memory, as the original merge script held them
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    models.append(sd)
avg = {k: (sum(m[k].float() for m in models) / len(models)).to(models[0][k].dtype) for k in models[0]}
out.mkdir(parents=True, exist_ok=True)
save_file(avg, out / "model.safetensors", metadata={"format": "pt"})
rc = 0
"""
FLOOR = """
from pathlib import Path
files, out, out_bytes = [Path(p) for p in sys.argv[1:-2]], Path(sys.argv[-2]), int(sys.argv[-1])
buf = bytearray(16 << 20)
for f in files:  # read every input byte once
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
with open(out, "wb") as fh:  # write the output's bytes once
    left = out_bytes
    while left > 0:
        n = fh.write(memoryview(buf)[: min(left, len(buf))])
        left -= n
rc = 0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--workdir", default=None, help="where the synthetic models go (default: a temp dir in /tmp)"
    )
    ap.add_argument("--scale", type=float, default=1.0, help="scale the expert count (disk/RAM short)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soup-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] disk: {shutil.disk_usage(work).free / 1e9:.0f} GB free at {work}", flush=True)
    try:
        run_bench(work, args.scale)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_bench(work: Path, scale: float) -> None:
    t0 = time.perf_counter()
    shapes = model_shapes(max(1, round(EXPERTS * scale)))
    base = work / "base"
    write_model(base, shapes, offset=0.0)
    ckpts = [
        write_model(work / f"runs/checkpoint-{100 * (i + 1)}", shapes, offset=1e-3 * (i + 1))
        for i in range(8)
    ]
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    largest = max(_numel(s) * (4 if dt == "F32" else 2) for _, s, dt in shapes)
    print(
        f"[bench] synthetic model: {len(shapes)} tensors, {model_bytes / 1e9:.2f} GB on disk in "
        f"{len(list(base.glob('*.safetensors')))} shards, largest tensor {largest / 1e6:.0f} MB "
        f"(built in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    idle = child(IDLE, [])["hwm"]
    print(f"[bench] idle process after imports: {idle / 1e6:.0f} MB", flush=True)
    rows = []
    for n in (2, 8):
        inputs = [base, *ckpts[:n]]
        files = [f for d in inputs for f in sorted(d.iterdir()) if f.name.endswith((".safetensors", ".json"))]
        out_bytes = model_bytes
        child(FLOOR, [*map(str, files), str(work / "floor.bin"), str(out_bytes)])  # warm the page cache
        floor = child(FLOOR, [*map(str, files), str(work / "floor.bin"), str(out_bytes)])
        (work / "floor.bin").unlink()
        recipe = work / f"recipe-{n}.yaml"
        recipe.write_text(
            json.dumps(
                {
                    "soup": {
                        "base_dir": str(base),
                        "checkpoints": [str(c) for c in ckpts[:n]],
                        "output_dir": str(work / "soup-out"),
                        "dtype": "bfloat16",
                    }
                }
            )
        )
        ours = child(SOUP, ["soup", "--recipe", str(recipe)])
        shutil.rmtree(work / "soup-out")
        naive = child(NAIVE, [*map(str, inputs), str(work / "naive-out")])
        shutil.rmtree(work / "naive-out")
        for name, r in (("I/O floor", floor), ("openseek-cpt soup", ours), ("naive", naive)):
            rows.append((n, name, (r["hwm"] - idle), r["seconds"], r["seconds"] / floor["seconds"]))
            print(
                f"[bench] N={n} {name}: {(r['hwm'] - idle) / 1e6:.0f} MB above idle, {r['seconds']:.2f} s",
                flush=True,
            )
    print(f"\n[bench] inputs = base + N checkpoints; largest tensor as stored: {largest / 1e6:.0f} MB")
    print(
        f"{'N':>2}  {'method':<18} {'peak RSS above idle':>20} {'x largest':>10} {'wall s':>8} {'x floor':>8}"
    )
    for n, name, rss, sec, ratio in rows:
        print(f"{n:>2}  {name:<18} {rss / 1e6:>17.0f} MB {rss / largest:>10.2f} {sec:>8.2f} {ratio:>8.2f}")
    soup_rss = {n: rss for n, name, rss, _, _ in rows if name == "openseek-cpt soup"}
    soup_ratio = {n: ratio for n, name, _, _, ratio in rows if name == "openseek-cpt soup"}
    growth = soup_rss[8] / soup_rss[2] - 1
    print(
        f"\n[bench] soup RSS above idle: {soup_rss[8] / largest:.2f}x largest tensor (target <= 4), "
        f"8 vs 2 checkpoints {growth:+.1%} (target within 10%); wall {soup_ratio[2]:.2f}x / "
        f"{soup_ratio[8]:.2f}x the I/O floor for 2 / 8 checkpoints (target <= 1.5)"
    )


def model_shapes(experts: int) -> list[tuple[str, tuple[int, ...], str]]:
    """OpenSeek-Small-v1's tensors: embedding, dense layer 0, one MoE layer (tied lm_head)."""
    h = HIDDEN
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
    shapes += [(f"model.layers.0.mlp.{n}.weight", s, "BF16") for n, s in _mlp(DENSE_FFN)]
    p = "model.layers.1.mlp"
    shapes += [
        (f"{p}.gate.weight", (experts, h), "BF16"),
        (f"{p}.gate.e_score_correction_bias", (experts,), "F32"),
    ]
    shapes += [(f"{p}.shared_experts.{n}.weight", s, "BF16") for n, s in _mlp(SHARED * EXPERT_FFN)]
    for e in range(experts):
        shapes += [(f"{p}.experts.{e}.{n}.weight", s, "BF16") for n, s in _mlp(EXPERT_FFN)]
    return shapes


def _mlp(ffn: int) -> list[tuple[str, tuple[int, int]]]:
    return [("gate_proj", (ffn, HIDDEN)), ("up_proj", (ffn, HIDDEN)), ("down_proj", (HIDDEN, ffn))]


def write_model(path: Path, shapes, offset: float) -> Path:
    """Sharded safetensors (+ index and config) like save_pretrained writes; one shard in RAM at a time."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
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
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape, dtype in shard:
            t = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen) + offset
            tensors[key] = t if dtype == "F32" else t.to(torch.bfloat16)
            del t
            weight_map[key] = name
        save_file(tensors, path / name, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": sum(_numel(s) * 2 for _, s, _ in shapes)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def child(body: str, argv: list[str]) -> dict:
    """Run one measured process; returns its {"hwm", "seconds", "rc"}."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + body + CHILD_REPORT, *argv], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            result = json.loads(line[6:])
            if result["rc"] != 0:
                raise SystemExit(f"[bench] child failed (rc {result['rc']}): {proc.stderr[-2000:]}")
            return result
    raise SystemExit(f"[bench] child failed: {proc.stderr[-3000:]}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
