"""Under bf16-mixed the routed experts' grouped_mm runs in bf16 and still matches fp32.

transformers' grouped_mm path casts the input to the weight dtype (fp32 master weights -> fp32
GEMMs). With `experts.resolve(None, "bf16-mixed")` the model loads with grouped_mm_autocast; a
dispatch recorder sees the dtypes aten._grouped_mm really receives. Tolerance vs the fp32 model:
2e-2 relative on the loss; the experts module alone on fixed routing: 2e-2 relative (norm) on its
output and gradients (bf16 keeps 8 mantissa bits, ~4e-3 per rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openseek_cpt.modeling import experts

VOCAB = 300


class GroupedMMDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "grouped_mm" in str(func):
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from transformers import DeepseekV3ForCausalLM

    from openseek_cpt.testing.fixtures import tiny_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-moe")
    DeepseekV3ForCausalLM(tiny_config(VOCAB, 2)).save_pretrained(path)
    return path


def load(path, implementation):
    from transformers import AutoModelForCausalLM

    kwargs = {"experts_implementation": implementation} if implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).train()


def run(model, autocast: bool):
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with GroupedMMDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids).loss
        out.backward()
    return float(out), rec.seen


def test_bf16_mixed_resolves_to_the_autocast_grouped_mm_unless_an_implementation_is_named():
    assert experts.resolve(None, "bf16-mixed") == experts.AUTOCAST_GROUPED_MM
    assert experts.resolve("grouped_mm", "bf16-mixed") == "grouped_mm"  # stock: the ablation's baseline
    assert experts.resolve("grouped_mm_autocast", "bf16-mixed") == experts.AUTOCAST_GROUPED_MM
    assert experts.resolve(None, "fp32") is None
    assert experts.resolve(None, "bf16-pure") is None  # weights are bf16 already
    assert experts.resolve("eager", "bf16-mixed") == "eager"


def test_stock_grouped_mm_runs_fp32_under_autocast_ours_runs_bf16_and_matches_fp32(saved_tiny):
    stock = load(saved_tiny, experts.resolve("grouped_mm", "bf16-mixed"))
    _, stock_seen = run(stock, autocast=True)
    assert stock_seen and all(d == (torch.float32, torch.float32) for d in stock_seen)  # the problem

    ours = load(saved_tiny, experts.resolve(None, "bf16-mixed"))
    loss_bf16, seen = run(ours, autocast=True)
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen

    assert loss_bf16 == pytest.approx(run(load(saved_tiny, "grouped_mm"), autocast=False)[0], rel=2e-2)


def test_autocast_experts_match_fp32_experts_on_the_same_routing(saved_tiny):
    """The experts module alone (fixed tokens, routing and weights): bf16 autocast vs fp32."""
    ours = load(saved_tiny, experts.resolve(None, "bf16-mixed")).model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, ours.hidden_dim, generator=g)
    top_k = torch.stack([torch.randperm(ours.num_experts, generator=g)[:2] for _ in range(64)])
    weights = torch.rand(64, 2, generator=g)
    results = {}
    for autocast in (False, True):
        ours.zero_grad()
        x = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ours(x, top_k, weights)
        assert out.dtype == torch.float32  # same dtype out as in, like the stock path
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results[autocast] = (
            out.detach(),
            x.grad,
            ours.gate_up_proj.grad.clone(),
            ours.down_proj.grad.clone(),
        )
    for name, ref, got in zip(
        ("output", "input grad", "gate_up grad", "down grad"), results[False], results[True], strict=True
    ):
        gap = float((got - ref).norm() / ref.norm())
        print(f"{name}: bf16 vs fp32 relative gap {gap:.2e}")
        assert gap < 2e-2, name
