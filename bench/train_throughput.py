"""Training throughput (tokens/s), MFU and where a step goes, measured through the train stage.

    python bench/train_throughput.py [--steps 6] [--warmup 2] [--seq N] [--per-device N]

The model, collator and Trainer are the ones `openseek-cpt train` builds: `setup.setup_run` and
`stage.build_trainer` on a recipe (so TrainingArguments, precision, the fused optimizer, the collator's
document resets and the stage's callbacks are exactly the stage's), then `trainer.train()`. Only
the inputs are synthetic: random packed rows (documents 64..seq/2 tokens) in a prepared-dataset
directory, and, when the recipe's model is not on disk, a random-init model of its architecture.

On a GPU: recipes/openseek/config.yaml (OpenSeek-Small-v1: deepseek_v3, 1.39B total / 0.40B
active, seq 4096, bf16-mixed); on CPU: recipes/tiny/config.yaml with the tiny model (the figures
then only show relative costs). Prints, for the recipe as is and the ablation rows measured in the
same run (stock stack -> bf16 experts -> fused CE -> flex/varlen attention -> torch.compile, each
adding one lever; see `ablation`): tokens/s per device, MFU (openseek_cpt.modeling.flops against the
device's bf16 peak), peak GPU memory and the ratio to the first row, plus the first row's step
breakdown (data + logging, forward, backward + clip, optimizer), timed by callbacks and forward
hooks on the stage's own Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from openseek_cpt.errors import first_line
from openseek_cpt.modeling import flops
from openseek_cpt.recipe.loader import load_recipe
from openseek_cpt.train.setup import setup_run
from openseek_cpt.train.stage import build_trainer

REPO = Path(__file__).resolve().parents[1]


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
    """BAAI/OpenSeek-Small-v1's architecture (DESIGN.md facts)."""
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


def measure(recipe_path: Path, overrides: list[str], args, label: str) -> dict:
    """Build the Trainer exactly as `openseek-cpt train` does and time `trainer.train()`."""
    recipe = load_recipe(recipe_path, overrides)
    setup = setup_run(recipe)
    trainer = build_trainer(recipe, setup)
    timer = StepTimer(args.warmup)
    timer.attach(trainer.model)
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    seq = setup.manifest["max_length"]
    tokens = timer.steps * recipe.train.global_batch_size * seq
    tps = tokens / timer.total
    peak, device = flops.device_peak_flops()
    config = trainer.accelerator.unwrap_model(trainer.model).config
    mfu = flops.training_flops_per_token(config, seq) * tps / peak if peak else float("nan")
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"label": label, "tps": tps, "mfu": mfu, "device": device, "peak_gib": peak_mem,
            **{k: v / timer.total for k, v in timer.parts.items()}}  # fmt: skip


def ablation(gpu: bool) -> list[tuple[list[str], str]]:
    """Issue 10's ablation, each row adding one lever to the previous: stock stack -> bf16 experts
    -> fused CE -> mask-free packed attention -> torch.compile. Rows whose kernel is not installed
    are left out (flash-attn, liger); on CPU only the rows that run there (no flex backward on CPU)."""
    import importlib.util

    stock = ["train.loss=hf", "train.experts_implementation=grouped_mm", "train.attn_implementation=sdpa"]
    rows = [(stock, "baseline: stock (fp32 experts, full logits, sdpa)")]
    bf16 = [
        "train.loss=hf",
        "train.experts_implementation=grouped_mm_autocast",
        "train.attn_implementation=sdpa",
    ]
    rows.append((bf16, "+ bf16 experts (grouped_mm_autocast)"))
    fused = ["train.loss=chunked", *bf16[1:]]
    rows.append((fused, "+ fused CE (chunked)"))
    if gpu and importlib.util.find_spec("liger_kernel"):
        rows.append((["train.loss=liger", *bf16[1:]], "+ fused CE (liger)"))
    attn = fused
    if gpu:
        attn = [*fused[:2], "train.attn_implementation=flex_attention"]
        rows.append((attn, "+ flex_attention (block mask)"))
        if importlib.util.find_spec("flash_attn"):
            attn = [*fused[:2], "train.attn_implementation=flash_attention_2"]
            rows.append((attn, "+ flash_attention_2 varlen"))
        rows.append(([*attn, "train.args.torch_compile=true"], "+ torch.compile"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=None, help="default: openseek (GPU) or tiny (CPU)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-device", type=int, default=None, help="sequences per step (default: the recipe's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the recipe's)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    recipe_path = Path(args.recipe or REPO / "recipes" / ("openseek" if gpu else "tiny") / "config.yaml")
    base = load_recipe(recipe_path)
    per_device = args.per_device or base.train.per_device_batch_size
    seq = args.seq or base.data.max_length
    print(f"{'GPU' if gpu else 'CPU'}: {recipe_path}, {per_device} x {seq} tokens per step, {args.steps} steps "
          f"after {args.warmup} warmup; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
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
        variants = ablation(gpu)  # the recipe's own defaults are the "+ fused CE (chunked)" row
        results = []
        for extra, label in variants:
            shutil.rmtree(work / "run", ignore_errors=True)
            try:
                results.append(measure(recipe_path, common + extra, args, label))
            except Exception as exc:  # a variant the device or version lacks: report, keep going
                print(f"{label}: skipped ({type(exc).__name__}: {first_line(exc)[:160]})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_r = results[0]
    print(f"device: {base_r['device']}; load average after {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<52} {'tokens/s/dev':>12} {'MFU':>6} {'peak GiB':>9}  vs first")
    for r in results:
        print(f"{r['label']:<52} {r['tps']:>12.0f} {r['mfu']:>6.3f} {r['peak_gib']:>9.1f}  "
              f"x{r['tps'] / base_r['tps']:.2f}")  # fmt: skip
    parts = ", ".join(f"{k} {base_r[k]:.0%}" for k in ("data+log", "forward", "backward+clip", "optimizer"))
    print(f"baseline step: {parts}")


if __name__ == "__main__":
    main()
