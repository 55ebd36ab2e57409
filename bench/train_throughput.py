"""Training throughput (tokens/s), MFU and where a step goes, measured through the train stage.

    python bench/train_throughput.py [--steps 6] [--warmup 2] [--seq N] [--per-device N]
                                     [--budget SECONDS] [--rows 0,0,0]

The model, collator and Trainer are the ones `openseek-cpt train` builds: `setup.setup_run` and
`stage.build_trainer` on a recipe (so TrainingArguments, precision, the fused optimizer, the collator's
document resets and the stage's callbacks are exactly the stage's), then `trainer.train()`. Only
the inputs are synthetic: random packed rows (documents 64..seq/2 tokens) in a prepared-dataset
directory, and, when the recipe's model is not on disk, a random-init model of its architecture.

On a GPU: recipes/openseek/config.yaml (OpenSeek-Small-v1: deepseek_v3, 1.39B total / 0.40B
active, seq 4096, bf16-mixed); on CPU: recipes/tiny/config.yaml with the tiny model (the figures
then only show relative costs). One row per lever (see `ablation`), each printed, and appended to
$OUT/train_throughput.txt when OUT is set, as it finishes: tokens/s per device, MFU
(openseek_cpt.modeling.flops against the device's bf16 peak), the row's own peak memory (GPU
allocated, or CPU peak RSS, above what the process held when the row started; rows are garbage
collected in between) and the ratio to the first row, then the first row's step breakdown. A
row that fails is reported and skipped; `--budget` stops starting rows once spent. On a GPU
machine without network: bench/device/run.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/train_throughput.py` from a checkout, nothing installed

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from openseek_cpt import doctor  # noqa: E402
from openseek_cpt.config import load_recipe  # noqa: E402
from openseek_cpt.errors import first_line  # noqa: E402
from openseek_cpt.modeling import flops  # noqa: E402
from openseek_cpt.train.setup import setup_run  # noqa: E402
from openseek_cpt.train.stage import build_trainer  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, split at the Trainer's own callback points."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.parts = {"data+log": 0.0, "forward": 0.0, "backward+clip": 0.0, "optimizer": 0.0}
        self.total = 0.0
        self.steps = 0
        self._last_end = None
        self._forward = 0.0

    def attach(self, model) -> None:
        def pre(module, args, kwargs):
            sync()
            self._t_fwd = time.perf_counter()

        def post(module, args, kwargs, output):
            sync()
            self._forward += time.perf_counter() - self._t_fwd

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kw):
        sync()
        self._begin = time.perf_counter()
        self._forward = 0.0

    def on_pre_optimizer_step(self, args, state, control, **kw):
        sync()
        self._pre_opt = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync()
        end = time.perf_counter()
        if state.global_step > self.warmup:
            data = self._begin - self._last_end
            self.parts["data+log"] += data
            self.parts["forward"] += self._forward
            self.parts["backward+clip"] += self._pre_opt - self._begin - self._forward
            self.parts["optimizer"] += end - self._pre_opt
            self.total += end - self._last_end
            self.steps += 1
        self._last_end = end


def synthetic_dataset(out: Path, rows: int, seq: int, vocab: int, eos: int) -> Path:
    """A prepared-dataset directory (train split + manifest) of random packed rows."""
    from datasets import Dataset, DatasetDict

    g = torch.Generator().manual_seed(0)
    data = {"input_ids": [], "seq_lengths": []}
    for _ in range(rows):
        lengths, left = [], seq
        while left > 0:
            n = min(left, int(torch.randint(64, max(seq // 2, 65), (1,), generator=g)))
            lengths.append(n)
            left -= n
        data["input_ids"].append(torch.randint(1, vocab, (seq,), generator=g).tolist())
        data["seq_lengths"].append(lengths)
    DatasetDict({"train": Dataset.from_dict(data)}).save_to_disk(str(out))
    manifest = {"vocab_size": vocab, "max_length": seq, "eos_token_id": eos, "pad_token_id": eos}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def model_dir_for(recipe_path: Path, work: Path) -> Path:
    """The recipe's model if it is on disk, else a random-init model of its architecture."""
    recipe = load_recipe(recipe_path)
    if Path(recipe.train_model_dir, "config.json").is_file():
        return Path(recipe.train_model_dir)
    if torch.cuda.is_available():
        from transformers import DeepseekV3ForCausalLM

        config = openseek_small_config()
        out = work / "model"
        DeepseekV3ForCausalLM(config).save_pretrained(out)
        print(f"random-init OpenSeek-Small-v1 architecture saved to {out} ({recipe.train_model_dir} absent)")
        return out
    from openseek_cpt.testing import fixtures as tiny_assets

    return tiny_assets.build_tiny_hub(work / "model", seed=233)


def openseek_small_config():
    """BAAI/OpenSeek-Small-v1's architecture (its config.json's sizes)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=151851, hidden_size=1280, intermediate_size=7168, moe_intermediate_size=896,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=10, num_key_value_heads=10,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=151643, eos_token_id=151850,
    )  # fmt: skip


class PeakMemory:
    """Peak memory of one row above the memory held when the row starts: GPU allocated bytes, or
    on CPU the process's peak RSS (Linux resets VmHWM on `echo 5 > /proc/self/clear_refs`)."""

    def __init__(self) -> None:
        gc.collect()  # the previous row's Trainer sits in reference cycles (bound forwards)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def mib(self) -> float:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self._status("VmHWM")
        return (peak - self.base) / 2**20


def measure(recipe_path: Path, overrides: list[str], args, label: str) -> dict:
    """Build the Trainer exactly as `openseek-cpt train` does and time `trainer.train()`."""
    memory = PeakMemory()
    recipe = load_recipe(recipe_path, overrides)
    setup = setup_run(**recipe.stage_args("train"))
    trainer = build_trainer(setup)
    timer = StepTimer(args.warmup)
    timer.attach(trainer.model)
    trainer.add_callback(timer)
    trainer.train()
    peak_mib = memory.mib()
    seq = setup.manifest["max_length"]
    tokens = timer.steps * recipe.train.global_batch_size * seq
    tps = tokens / timer.total
    peak, device = flops.device_peak_flops()
    config = trainer.accelerator.unwrap_model(trainer.model).config
    mfu = flops.training_flops_per_token(config, seq) * tps / peak if peak else float("nan")
    parts = {k: v / timer.total for k, v in timer.parts.items()}
    del trainer, setup, timer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"label": label, "tps": tps, "mfu": mfu, "device": device, "peak_mib": peak_mib, **parts}


def ablation(gpu: bool) -> list[tuple[list[str], str]]:
    """Each row adds one lever to the previous: stock stack -> bf16 experts -> chunked CE -> Liger
    CE -> flex -> flash varlen; torch.compile is measured on sdpa and on flex apart, so a failing
    kernel costs one row, not the rest. Rows whose kernel is not installed are left out; flex only
    on a GPU (torch's CPU flex has no backward)."""
    import importlib.util

    stock = ["train.loss=hf", "train.experts_implementation=grouped_mm", "train.attn_implementation=sdpa"]
    bf16 = [
        "train.loss=hf",
        "train.experts_implementation=grouped_mm_autocast",
        "train.attn_implementation=sdpa",
    ]
    chunked = ["train.loss=chunked", *bf16[1:]]
    rows = [
        (stock, "stock: fp32 grouped_mm experts, full logits, sdpa"),
        (bf16, "+ bf16 experts (grouped_mm_autocast)"),
        (chunked, "+ chunked CE"),
    ]
    best_loss = chunked[0]
    if gpu and importlib.util.find_spec("liger_kernel"):
        rows.append((["train.loss=liger", *bf16[1:]], "+ Liger fused CE (instead of chunked)"))
    rows.append(([*chunked, "train.args.torch_compile=true"], "chunked CE + torch.compile (sdpa)"))
    if gpu:
        flex = [best_loss, bf16[1], "train.attn_implementation=flex_attention"]
        rows.append((flex, "chunked CE + flex_attention (block mask)"))
        rows.append(([*flex, "train.args.torch_compile=true"], "chunked CE + flex + torch.compile"))
        if importlib.util.find_spec("flash_attn"):
            rows.append(
                (
                    [best_loss, bf16[1], "train.attn_implementation=flash_attention_2"],
                    "chunked CE + flash_attention_2 varlen",
                )
            )
    return rows


HEADER = f"{'variant':<52} {'tokens/s/dev':>12} {'MFU':>6} {'peak MiB':>9}  vs first"


def row_line(r: dict, first: dict | None) -> str:
    ratio = f"x{r['tps'] / first['tps']:.2f}" if first else "x1.00"
    return f"{r['label']:<52} {r['tps']:>12.0f} {r['mfu']:>6.3f} {r['peak_mib']:>9.0f}  {ratio}"


def report(line: str, out_file: Path | None) -> None:
    """Print one line now and append it to $OUT's file, so a time-out keeps every finished row."""
    print(line, flush=True)
    if out_file is not None:
        with out_file.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=None, help="default: openseek (GPU) or tiny (CPU)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-device", type=int, default=None, help="sequences per step (default: the recipe's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the recipe's)")
    p.add_argument("--budget", type=float, default=0, help="seconds after which no new row starts (0: none)")
    p.add_argument(
        "--rows", default=None, help="comma-separated row numbers to run (default: all), e.g. 0,0,0"
    )
    args = p.parse_args()
    started = time.monotonic()
    gpu = torch.cuda.is_available()
    out_dir = os.environ.get("OUT")
    out_file = Path(out_dir) / "train_throughput.txt" if out_dir else None
    recipe_path = Path(args.recipe or REPO / "recipes" / ("openseek" if gpu else "tiny") / "config.yaml")
    base = load_recipe(recipe_path)
    per_device = args.per_device or base.train.per_device_batch_size
    seq = args.seq or base.data.max_length
    experts_path = doctor.grouped_gemm_check(torch.cuda.get_device_capability(0)).detail if gpu else "cpu"
    report(f"{'GPU' if gpu else 'CPU'}: {recipe_path}, {per_device} x {seq} tokens per step, {args.steps} steps "
           f"after {args.warmup} warmup; experts: {experts_path}; load average {os.getloadavg()[0]:.2f}", out_file)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    results: list[dict] = []
    try:
        model_dir = model_dir_for(recipe_path, work)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id") or 0
        dataset = synthetic_dataset(work / "data", (args.steps + args.warmup) * per_device, seq, vocab, eos)
        common = [
            f"train.model_dir={model_dir}", f"train.dataset_dir={dataset}",
            f"train.output_dir={work / 'run'}", f"train.per_device_batch_size={per_device}",
            f"train.global_batch_size={per_device}", f"train.args.max_steps={args.steps + args.warmup}",
            "train.args.save_strategy='no'", "train.args.eval_strategy='no'", "train.args.report_to=none",
            "train.args.logging_steps=1", "train.args.dataloader_num_workers=0",
            "train.args.dataloader_pin_memory=false",
        ]  # fmt: skip
        variants = ablation(gpu)
        chosen = [int(i) for i in args.rows.split(",")] if args.rows else range(len(variants))
        report(HEADER, out_file)
        for i in chosen:
            extra, label = variants[i]
            if args.budget and time.monotonic() - started > args.budget:
                report(f"{label}: not started (--budget {args.budget:g} s spent)", out_file)
                continue
            shutil.rmtree(work / "run", ignore_errors=True)
            try:
                r = measure(recipe_path, common + extra, args, label)
            except Exception as exc:  # a variant the device or version lacks: report, keep going
                gc.collect()
                report(f"{label}: failed ({type(exc).__name__}: {first_line(exc)[:160]})", out_file)
                continue
            report(row_line(r, results[0] if results else None), out_file)
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results:
        report("no row finished", out_file)
        raise SystemExit(1)
    first = results[0]
    parts = ", ".join(f"{k} {first[k]:.0%}" for k in ("data+log", "forward", "backward+clip", "optimizer"))
    report(
        f"device: {first['device']}; first row's step: {parts}; load average {os.getloadavg()[0]:.2f}",
        out_file,
    )


if __name__ == "__main__":
    main()
