"""Training throughput (tokens/s) and MFU of one device, OpenSeek-Small-v1 sizes, random init.

    python bench/train_throughput.py [--steps 6] [--batch 1] [--seq 4096]

On a GPU: the real OpenSeek-Small-v1 configuration (deepseek_v3, 1.39B total / 0.40B active,
seq 4096), bf16-mixed as the train stage runs it (fp32 master weights, bf16 autocast, fused AdamW),
packed rows with document-reset position_ids, sdpa. On CPU it runs a scaled-down config of the same
family (and says so): the figures then only show relative costs.

Prints, for the baseline (the train stage's defaults) and variants measured in the same run:
tokens/s, MFU (openseek_cpt.flops: 6 x N_active + MLA attention, against the device's bf16 peak)
and the ratio to the baseline, plus where one baseline step goes (forward, backward, optimizer).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from openseek_cpt import flops
from openseek_cpt.collator import PackedCollator


def openseek_small_config(**over) -> DeepseekV3Config:
    """BAAI/OpenSeek-Small-v1's architecture (DESIGN.md facts)."""
    cfg = dict(
        vocab_size=151851, hidden_size=1280, intermediate_size=7168, moe_intermediate_size=896,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=10, num_key_value_heads=10,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        max_position_embeddings=4096, tie_word_embeddings=True, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )  # fmt: skip
    cfg.update(over)
    return DeepseekV3Config(**cfg)


def cpu_scaled_config() -> DeepseekV3Config:
    """Same family, ~1/20 of the width, so a CPU step takes seconds."""
    return openseek_small_config(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, kv_lora_rank=64, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024,
    )  # fmt: skip


def packed_batch(batch: int, seq: int, vocab: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of random documents (lengths 64..seq/2) packed back to back, collated as in training."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, left = [], seq
        while left > 0:
            n = min(left, int(torch.randint(64, max(seq // 2, 65), (1,), generator=g)))
            lengths.append(n)
            left -= n
        rows.append(
            {"input_ids": torch.randint(1, vocab, (seq,), generator=g).tolist(), "seq_lengths": lengths}
        )
    return {k: v.to(device) for k, v in PackedCollator(pad_token_id=0)(rows).items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(config, args, device: str, experts: str | None, label: str) -> dict[str, float]:
    torch.manual_seed(0)
    if experts:
        config._experts_implementation = experts
    model = DeepseekV3ForCausalLM(config).to(device)  # fp32 master weights
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.01, fused=device == "cuda"
    )
    batch = packed_batch(args.batch, args.seq, config.vocab_size, device)
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    total = 0.0
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if step >= args.warmup:
            parts["forward"] += t1 - t0
            parts["backward"] += t2 - t1
            parts["optimizer"] += t3 - t2
            total += t3 - t0
    tokens = args.batch * args.seq * args.steps
    peak, name = flops.device_peak_flops()
    tps = tokens / total
    mfu = flops.training_flops_per_token(config, args.seq) * tps / peak if peak else float("nan")
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "label": label,
        "tps": tps,
        "mfu": mfu,
        "device": name,
        **{k: v / total for k, v in parts.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 1 GPU, 2 CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 4096 GPU, 512 CPU)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        config = openseek_small_config()
        args.batch, args.seq = args.batch or 1, args.seq or 4096
        print("GPU: OpenSeek-Small-v1 configuration (random init, real sizes), bf16-mixed")
    else:
        config = cpu_scaled_config()
        args.batch, args.seq = args.batch or 2, args.seq or 512
        print(
            "CPU: no GPU here, running a SCALED-DOWN deepseek_v3 config (hidden 256, 3 layers, 16 experts);"
        )
        print("     absolute figures are not OpenSeek-Small-v1's; MFU is against a nominal CPU peak")
    n_active = flops.active_matmul_params(config)
    print(
        f"active matmul params {n_active / 1e6:.1f}M, batch {args.batch} x seq {args.seq}, {args.steps} steps"
    )
    variants = [(None, "baseline (model default experts)")]
    for impl in ("batched_mm", "grouped_mm"):
        variants.append((impl, f"experts_implementation={impl}"))
    results = []
    for experts, label in variants:
        try:
            results.append(measure(openseek_small_config() if device == "cuda" else cpu_scaled_config(),
                                   args, device, experts, label))  # fmt: skip
        except Exception as exc:  # a variant the device or version lacks: report, keep going
            print(f"{label}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    base = results[0]
    print(f"device: {base['device']}")
    for r in results:
        print(
            f"{r['label']:<40} {r['tps']:>10.0f} tokens/s  MFU {r['mfu']:.3f}  x{r['tps'] / base['tps']:.2f} vs baseline"
        )
    print(
        f"baseline step: forward {base['forward']:.0%}, backward+clip {base['backward']:.0%}, "
        f"optimizer {base['optimizer']:.0%}"
    )


if __name__ == "__main__":
    main()
