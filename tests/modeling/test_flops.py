"""FLOPs per trained token: the active (routed) matmul parameters and MLA attention."""

from __future__ import annotations

import pytest

from openseek_cpt.modeling import flops


def test_flops_count_openseek_small_active_parameters_and_mla_attention():
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=151851, hidden_size=1280, intermediate_size=7168, moe_intermediate_size=896,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=10, num_key_value_heads=10,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    active = flops.active_matmul_params(cfg)
    assert 0.38e9 < active < 0.42e9  # OpenSeek-Small-v1: ~0.40B active of ~1.39B
    assert flops.attention_head_dims(cfg) == (10, 192, 128)
    attention = flops.training_flops_per_token(cfg, 4096) - 6 * active
    assert attention == pytest.approx(3 * 6 * 2 * 10 * (192 + 128) * 2048)
