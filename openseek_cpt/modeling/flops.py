"""Model FLOPs per token and peak FLOP/s, for MFU (model FLOPs utilisation).

MFU = (training FLOPs per token x tokens per second per device) / peak FLOP/s of the device.
Training FLOPs per token = 3 x forward (backward costs two forwards), with

    forward = 2 x N_active_matmul + attention
    attention (per layer, causal, averaged over positions) = 2 x heads x (d_qk + d_v) x seq / 2

so training = 6 x N_active x tokens + attention FLOPs, the usual "6N" count. N_active counts the
matmul weights a token really goes through: attention projections (MLA: q, kv_a, kv_b, o), the
dense MLPs of the first `first_k_dense_replace` layers, and in MoE layers the router, the shared
experts and only the top-k routed experts; the LM head counts (tied or not), the embedding lookup
does not (it is a gather). MLA attention scores use qk head dim = qk_nope + qk_rope (192 for
OpenSeek-Small-v1) and values v_head_dim (128). The attention term counts a dense causal kernel
over the whole packed row (what sdpa computes); a varlen kernel on document-masked rows does less.
Recomputation (gradient checkpointing) is not counted: MFU, not hardware utilisation.
"""

from __future__ import annotations

import os
from typing import Any

# Dense bf16 peak (no sparsity) per device, FLOP/s; the first key found in the device name wins,
# so board variants with a lower peak (PCIe, NVL) come before their SXM name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "A800": 312e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}
# Nominal CPU peak per core (FLOP/s): 2 FMA units x 16 fp32 lanes x 2 FLOP x ~1 GHz sustained under
# AVX-512. Only there so MFU is defined on CPU test runs (0 < MFU < 1); not a measured figure.
CPU_NOMINAL_PEAK_PER_CORE = 64e9


def active_matmul_params(config: Any) -> int:
    """Weights of the matmuls one token goes through in a forward pass (see module docstring)."""
    if getattr(config, "model_type", None) not in ("deepseek_v3", "deepseek_v2"):
        return _dense_params(config)
    h = config.hidden_size
    heads = config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    lora = config.q_lora_rank  # q_a_proj + q_b_proj when set, else one q_proj
    q = h * lora + lora * heads * qk if lora else h * heads * qk
    kv_a = h * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv_b = config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    o = heads * config.v_head_dim * h
    attn = q + kv_a + kv_b + o
    dense_mlp = 3 * h * config.intermediate_size
    moe_mlp = (
        h * config.n_routed_experts  # router
        + 3 * h * config.moe_intermediate_size * (config.n_shared_experts or 0)
        + 3 * h * config.moe_intermediate_size * config.num_experts_per_tok
    )
    n_dense = min(config.first_k_dense_replace, config.num_hidden_layers)
    n_moe = config.num_hidden_layers - n_dense
    lm_head = config.vocab_size * h
    return config.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe_mlp + lm_head


def _dense_params(config: Any) -> int:
    """Fallback for non-MoE llama-like configs: attention + gated MLP + LM head."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * d * 2 + h * kv * d * 2
    mlp = 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attn + mlp) + config.vocab_size * h


def attention_head_dims(config: Any) -> tuple[int, int, int]:
    """(heads, qk head dim, v head dim); MLA: qk = qk_nope + qk_rope."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", None) in ("deepseek_v3", "deepseek_v2"):
        return heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, d, d


def training_flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x N_active + 3 x causal attention forward (seq_len = row length)."""
    heads, d_qk, d_v = attention_head_dims(config)
    attention_fwd = config.num_hidden_layers * 2 * heads * (d_qk + d_v) * (seq_len / 2)
    return 6.0 * active_matmul_params(config) + 3.0 * attention_fwd


def device_peak_flops(device: Any = None, local_world_size: int = 1) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, its name); None when the GPU is not in the table."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_FLOPS.items():
            if key in name:
                return peak, name
        return None, name
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Processes on one host share its cores: each gets its share of the nominal peak.
    share = max(cores / max(local_world_size, 1), 1.0)
    return CPU_NOMINAL_PEAK_PER_CORE * share, f"cpu ({cores} cores, nominal)"
