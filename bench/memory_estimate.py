"""Peak training memory of OpenSeek-Small-v1 at per-device batch 4 x 4096, estimated on a CPU.

    python bench/memory_estimate.py [--seqs 256 512] [--batch 4] [--seq 4096]

No GPU needed: the parts that scale are *measured* on the real per-layer shapes (hidden 1280, MLA,
64 routed experts of 896 top-6 + 2 shared, dense first layer 7168, tied 151,851 x 1280 head) and
extrapolated; the fixed parts are counted exactly:
- activations kept for backward: every tensor autograd saves during a bf16-autocast forward with
  the stage's model setup (loss.install chunked, experts grouped_mm_autocast), counted once per
  storage by `saved_tensors_hooks`, at 1 and 2 MoE layers x two row lengths; fitted as
  c0 + c1*T + moe_layers*(d0 + d1*T) (T tokens per device), which separates the embedding/dense
  layer/head/loss from each MoE layer, then evaluated at 5 MoE layers and T = batch x seq;
- attention is measured through a probe with the saving behaviour of the mask-free GPU kernels
  (flash varlen / flex: q, k, v, out and a log-sum-exp per head and token, no S^2 tensor); the
  dense-mask sdpa path additionally keeps a (B,1,S,S) bool mask and a bf16 (B,1,S,S) bias per
  layer, added analytically;
- weights, gradients and AdamW state: fp32 (bf16-mixed), from the parameter count of the 6-layer
  model built on the meta device;
- DDP's gradient buckets: with `gradient_as_bucket_view=False` (the Trainer's default) DDP keeps
  its own flat fp32 copy of every gradient for the all-reduce, one more 4 bytes per parameter;
- the CUDA context, cuBLAS workspaces and NCCL's buffers: not tensors, counted as CONTEXT_GIB;
- transients (the larger counts, they do not overlap): the chunked loss's one chunk of fp32 logits,
  the full-size fp32 temporary `logsumexp` makes of it, and its bf16 gradient (loss.CHUNK_TOKENS) in
  forward; in backward, gradients of one MoE layer's activations (assumed as large as what the
  layer keeps).
The stock path's loss memory (full bf16 logits + fp32 copy + fp32 log-softmax) is printed for
comparison, and activation checkpointing's effect (keep each layer's input only; +1 forward of compute).
CPU autocast casts a few ops differently from CUDA autocast; the estimate is +-10%, not a measurement.
"""

from __future__ import annotations

import argparse
import os

import torch

from openseek_cpt.modeling import experts, loss
from openseek_cpt.testing.fixtures import real_shape_config

FULL_LAYERS = 6  # OpenSeek-Small-v1: 1 dense + 5 MoE layers

GIB = 2**30
# CUDA context + cuBLAS workspaces + NCCL buffers per process: 1-3 GiB on H100-class GPUs.
CONTEXT_GIB = 2.0
PROBE = "openseek_memory_probe"


class _FlashLikeAttention(torch.autograd.Function):
    """Forward of causal attention per document that saves what flash/flex save (q, k, v, out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale):
        outs, lses = [], []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qd, kd, vd = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]
            scores = (qd @ kd.transpose(-1, -2)).float() * scale
            scores += torch.full(scores.shape[-2:], float("-inf")).triu(1)
            lses.append(scores.logsumexp(-1))
            outs.append(scores.softmax(-1).to(vd.dtype) @ vd)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # the estimate only needs what the forward keeps
        raise NotImplementedError


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    position_ids = kwargs["position_ids"][0]
    starts = (position_ids == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([position_ids.numel()])])
    out = _FlashLikeAttention.apply(query, key, value, cu, scaling)
    return out.transpose(1, 2).contiguous(), None


def saved_bytes(moe_layers: int, tokens: int, loss_impl: str = "chunked") -> int:
    """Bytes of the tensors autograd keeps after one bf16-autocast forward (batch 1 x tokens)."""
    from transformers import AttentionInterface, DeepseekV3ForCausalLM

    AttentionInterface.register(PROBE, probe_attention)
    config = real_shape_config(num_layers=1 + moe_layers)
    config._attn_implementation = PROBE
    config._experts_implementation = experts.resolve(None, "bf16-mixed")
    torch.manual_seed(0)
    model = loss.install(DeepseekV3ForCausalLM(config).train(), loss_impl)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=g)
    lengths, left = [], tokens
    while left > 0:  # documents of 64..tokens/2 tokens, as packed rows hold them
        lengths.append(min(left, int(torch.randint(64, max(tokens // 2, 65), (1,), generator=g))))
        left -= lengths[-1]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        out = model(input_ids=ids, position_ids=position_ids, labels=ids)
    del out, model
    return sum(seen.values())


def fit(seqs: tuple[int, int]) -> dict[str, float]:
    """c0 + c1*T + L*(d0 + d1*T) from 4 measurements (L in {1, 2} MoE layers, T in seqs)."""
    m = {(layers, t): saved_bytes(layers, t) for layers in (1, 2) for t in seqs}
    for (layers, t), b in sorted(m.items()):
        print(f"  measured: {layers} MoE layer(s), {t} tokens: {b / 2**20:9.1f} MiB saved for backward")
    t1, t2 = seqs
    per_layer = {t: m[(2, t)] - m[(1, t)] for t in seqs}
    d1 = (per_layer[t2] - per_layer[t1]) / (t2 - t1)
    d0 = per_layer[t1] - d1 * t1
    rest = {t: m[(1, t)] - per_layer[t] for t in seqs}
    c1 = (rest[t2] - rest[t1]) / (t2 - t1)
    c0 = rest[t1] - c1 * t1
    return {"c0": c0, "c1": c1, "d0": d0, "d1": d1}


def parameter_count() -> int:
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(real_shape_config(num_layers=FULL_LAYERS))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs=2, default=[256, 512], help="row lengths measured")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--budget-gib", type=float, default=80.0)
    args = p.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    config = real_shape_config(num_layers=FULL_LAYERS)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    tokens = args.batch * args.seq
    print(f"OpenSeek-Small-v1 shapes, {args.batch} x {args.seq} = {tokens} tokens per device, bf16-mixed; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    f = fit(tuple(args.seqs))
    acts = f["c0"] + f["c1"] * tokens + moe_layers * (f["d0"] + f["d1"] * tokens)
    n = parameter_count()
    states = {"fp32 weights": 4 * n, "fp32 gradients": 4 * n, "AdamW exp_avg + exp_avg_sq": 8 * n}
    buckets = 4 * n
    context = CONTEXT_GIB * GIB
    chunk = loss.CHUNK_TOKENS * config.vocab_size * (4 + 4 + 2)  # logits, logsumexp's temporary, grad
    backward_work = f["d1"] * tokens  # gradients of one MoE layer's activations, alive while it runs
    mask = args.batch * args.seq * args.seq  # bool (B,1,S,S)
    sdpa_extra = mask + config.num_hidden_layers * 2 * mask  # + a bf16 bias per layer kept for backward
    stock_loss = tokens * config.vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 copy, fp32 log-softmax
    layer_input = tokens * config.hidden_size * 4
    ckpt_acts = (
        f["c0"] + f["c1"] * tokens + config.num_hidden_layers * layer_input + f["d0"] + f["d1"] * tokens
    )

    def row(name: str, b: float) -> None:
        print(f"  {name:<58} {b / GIB:8.2f} GiB")

    print(f"fit: per token {f['c1'] / 1024:.1f} KiB outside MoE layers + {f['d1'] / 1024:.1f} KiB per MoE layer; "
          f"fixed {f['c0'] / GIB:.2f} GiB + {f['d0'] / GIB:.3f} GiB per MoE layer")  # fmt: skip
    print(f"parameters: {n / 1e9:.3f} B")
    for k, v in states.items():
        row(k, v)
    row(f"activations kept for backward ({moe_layers} MoE layers, mask-free attention)", acts)
    row("DDP gradient buckets (a flat fp32 copy of the gradients)", buckets)
    row(f"CUDA context, cuBLAS workspaces, NCCL buffers (counted as {CONTEXT_GIB:g} GiB)", context)
    row(
        f"chunked-loss transient (one {loss.CHUNK_TOKENS}-token chunk: fp32, logsumexp temp, bf16 grad)",
        chunk,
    )
    row("backward working set (one MoE layer's activation gradients)", backward_work)
    total = sum(states.values()) + buckets + context + acts + max(chunk, backward_work)
    row("TOTAL, DDP, flash varlen / flex_attention", total)
    row("TOTAL, sdpa (+ dense mask + a bf16 bias per layer)", total + sdpa_extra)
    row("for comparison: the stock loss's logits (bf16 + fp32 copy + fp32 log-softmax)", stock_loss)
    row(
        "TOTAL, stock loss (train.loss: hf), flash/flex",
        total - max(chunk, backward_work) + stock_loss + backward_work,
    )
    row("TOTAL, activation checkpointing (+1 forward of compute), flash/flex", total - acts + ckpt_acts)
    verdict = "fits" if total <= args.budget_gib * GIB else "does NOT fit"
    print(f"verdict: {verdict} in {args.budget_gib:g} GiB with DDP, the chunked loss and mask-free attention "
          "(allocator fragmentation takes a few GiB more of reserved memory on a GPU)")  # fmt: skip


if __name__ == "__main__":
    main()
