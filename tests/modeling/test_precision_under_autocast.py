"""What reaches the attention kernel and the router under bf16 autocast, the training default.

The tiny deepseek_v3 runs in train mode under CPU bf16 autocast (the dtype rules of autocast are
the same on CPU and CUDA for these ops). Flex: the tensors transformers hands the flex kernel are
recorded; they must share the autocast dtype (torch 2.10 refuses mixed dtypes in the forward, 2.11
in the backward). Router: its logits must be fp32 and its top-k choice the fp32 router's.
"""

from __future__ import annotations

import pytest
import torch

from openseek_cpt.modeling import attention, router_precision
from openseek_cpt.modeling.collator import PackedCollator

VOCAB = 300


def tiny_model(attn: str = "sdpa"):
    from transformers import DeepseekV3ForCausalLM

    from openseek_cpt.testing.fixtures import tiny_config

    torch.manual_seed(0)
    config = tiny_config(VOCAB, 2)
    config.use_cache = False
    config._attn_implementation = attn
    return DeepseekV3ForCausalLM(config).train()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, VOCAB, (48,), generator=g).tolist(), "seq_lengths": [30, 18]}] * 2
    return {k: v for k, v in PackedCollator(pad_token_id=0)(rows).items() if k != "labels"}


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles flex afresh: torch 2.10's CPU inductor fails to build a bf16 flex kernel
    recompiled after an fp32 one in the same process (a C++ compile error; not the GPU path)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def flex_kernel_dtypes(monkeypatch):
    """Records (q, k, v) dtypes at transformers' call of the flex kernel, then calls it."""
    from transformers.integrations import flex_attention as hf_flex

    seen: list[tuple[torch.dtype, ...]] = []
    kernel = hf_flex.compile_friendly_flex_attention

    def recording(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return kernel(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", recording)
    return seen


@pytest.mark.slow  # a CPU inductor compile of flex per test: the end-to-end tier
def test_flex_gets_query_key_and_value_in_the_autocast_dtype(flex_kernel_dtypes):
    attention.prepare("flex_attention")
    model = tiny_model("flex_attention")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # CPU flex has no backward
        logits = model(**batch()).logits
    assert torch.isfinite(logits).all()
    assert flex_kernel_dtypes, "the flex kernel was never called"
    assert set(flex_kernel_dtypes) == {(torch.bfloat16,) * 3}, flex_kernel_dtypes


@pytest.mark.slow  # a CPU inductor compile of flex per test: the end-to-end tier
def test_flex_without_autocast_keeps_fp32():
    attention.prepare("flex_attention")
    with torch.no_grad():
        assert tiny_model("flex_attention")(**batch()).logits.dtype == torch.float32


def router_outputs(model) -> list[tuple]:
    seen = []
    for module in model.modules():
        if router_precision.is_router(module):
            module.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch())
    return seen


def test_the_router_computes_its_logits_and_weights_in_fp32_under_autocast():
    model = tiny_model()
    assert router_precision.keep_routers_fp32(model) >= 1
    outputs = router_outputs(model)
    assert outputs and all(o[0].dtype == torch.float32 and o[1].dtype == torch.float32 for o in outputs)


def test_without_the_fix_autocast_computes_router_logits_in_bf16():
    """The defect the fix removes, shown on the stock module: the test above can fail."""
    outputs = router_outputs(tiny_model())
    assert outputs and outputs[0][0].dtype == torch.bfloat16


def test_the_fp32_router_chooses_what_an_fp32_router_chooses_on_the_same_input():
    model = tiny_model()
    router = next(m for m in model.modules() if router_precision.is_router(m))
    hidden = torch.randn(4096, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = router(hidden)[2].sort(-1).values
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stock = router(hidden)[2].sort(-1).values
        router_precision.keep_routers_fp32(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = router(hidden)[2].sort(-1).values
    stock_differs = int((stock != want).any(-1).sum())
    print(f"tokens routed differently under autocast: stock {stock_differs}/4096, fp32 router 0")
    assert torch.equal(ours, want)
