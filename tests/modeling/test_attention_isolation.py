"""Packed rows keep documents apart with every accepted attention implementation (CPU, batch 4).

Each test collates 4 packed rows exactly as training does (PackedCollator: per-document
position_ids, no attention_mask, `varlen` fields for flash kernels), runs the tiny deepseek_v3 in
train mode with use_cache=False (as load_model configures it), and compares every document's
logits with the same document run alone. Tolerance 1e-4 absolute on fp32 logits.

flash-attention has no CPU kernel: `standin_flash` replaces only the kernel functions (dense and
varlen, written with SDPA per segment) inside transformers' flash-attention module; the wiring
that decides dense vs varlen (transformers' `_flash_attention_forward`) is the real one. The
negative control shows the same wiring without the collator's cu_seq_lens mixes documents.
FlexAttention has no CPU backward in torch 2.13: forward only for flex; flash stand-in and sdpa
also check gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openseek_cpt.errors import UserError
from openseek_cpt.modeling import attention
from openseek_cpt.modeling.collator import PackedCollator

VOCAB = 300
# 4 rows of 48 tokens: several documents per row, one row of one document, one padded row.
ROWS = [[20, 18, 10], [48], [7, 30, 11], [25, 15]]
TOLERANCE = 1e-4


def tiny_model(attn: str):
    from transformers import DeepseekV3ForCausalLM

    from openseek_cpt.testing.fixtures import tiny_config

    torch.manual_seed(0)
    config = tiny_config(VOCAB, 2)
    config.use_cache = False  # as train.load_model sets it
    model = DeepseekV3ForCausalLM(config)
    model.config._attn_implementation = attn
    return model.train()


def packed_rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(3, VOCAB, (sum(lengths),), generator=g).tolist(), "seq_lengths": lengths}
        for lengths in ROWS
    ]


def worst_leak(model, varlen: bool) -> float:
    """max |logit(document in its packed row) - logit(document alone)| over all documents."""
    rows = packed_rows()
    batch = PackedCollator(pad_token_id=0, varlen=varlen)(rows)
    assert batch["input_ids"].shape == (4, 48)
    packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    worst = 0.0
    for r, row in enumerate(rows):
        start = 0
        for length in row["seq_lengths"]:
            alone = PackedCollator(pad_token_id=0, varlen=varlen)(
                [{"input_ids": row["input_ids"][start : start + length], "seq_lengths": [length]}]
            )
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits.detach()
            worst = max(worst, float((logits[0] - packed[r, start : start + length]).abs().max()))
            start += length
    return worst


# Slow (end-to-end tier): on a CPU, inductor compiles a C++ flex kernel per document length (minutes
# on a 2-core host); the GPU image runs this file whole (tests/cluster/test_image_gpu.py).
@pytest.mark.slow
def test_flex_attention_keeps_documents_of_a_batch_of_4_apart():
    model = tiny_model("flex_attention")
    with torch.no_grad():  # FlexAttention has no CPU backward
        assert worst_leak(model, varlen=False) < TOLERANCE


def test_sdpa_keeps_documents_apart_forward_and_backward():
    model = tiny_model("sdpa")
    assert worst_leak(model, varlen=False) < TOLERANCE
    assert_gradients_isolated(model, varlen=False)


def _segments(q, k, v, cu, causal, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=causal,
            scale=scale,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def standin_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                         dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):  # fmt: skip
    """flash_attn_varlen_func's contract: (total, heads, dim) tokens, causal within each cu_seqlens segment."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and isinstance(max_seqlen_q, int)
    return _segments(q, k, v, cu_seqlens_q, causal, softmax_scale)


def standin_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """flash_attn_func's contract: (batch, seq, heads, dim), causal over each whole row."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
    )
    return o.transpose(1, 2)


@pytest.fixture()
def standin_kernels(monkeypatch):
    """Load the CPU stand-in kernels where transformers keeps the imported flash-attn functions."""
    import transformers.modeling_flash_attention_utils as fa

    for name, value in {
        "_loaded_implementation": "flash_attention_2",
        "_flash_fn": standin_flash,
        "_flash_varlen_fn": standin_flash_varlen,
        "_flash_with_kvcache_fn": None,
        "_pad_fn": fa._pad_input,
        "_unpad_fn": fa._unpad_input,
        "_process_flash_kwargs_fn": fa._lazy_define_process_function(standin_flash_varlen),
        "_process_with_kvcache_kwargs_fn": dict,
    }.items():
        monkeypatch.setattr(fa, name, value, raising=False)


def test_flash_varlen_with_the_collators_cu_seq_lens_keeps_documents_apart(standin_kernels):
    model = tiny_model("flash_attention_2")
    assert attention.needs_varlen("flash_attention_2")
    assert worst_leak(model, varlen=True) < TOLERANCE
    assert_gradients_isolated(model, varlen=True)


def test_flash_without_cu_seq_lens_mixes_documents_so_the_check_can_fail(standin_kernels):
    model = tiny_model("flash_attention_2")
    with torch.no_grad():
        leak = worst_leak(model, varlen=False)
    print(f"flash at batch 4 without cu_seq_lens: logit difference {leak:.3g}")
    assert leak > 100 * TOLERANCE


def assert_gradients_isolated(model, varlen: bool) -> None:
    """The loss of row 0's first document has zero gradient w.r.t. the embeddings of its other documents."""
    rows = packed_rows()
    batch = PackedCollator(pad_token_id=0, varlen=varlen)(rows)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "input_ids")}
    logits = model(inputs_embeds=embeds, **inputs).logits
    first = ROWS[0][0]
    logits[0, :first].sum().backward()
    assert embeds.grad[0, :first].abs().sum() > 0
    assert float(embeds.grad[0, first:].abs().max()) == 0.0
    assert float(embeds.grad[1:].abs().max()) == 0.0


def test_varlen_fields_mark_every_document_and_padding_segment_of_the_flattened_batch():
    rows = [{"input_ids": [5] * 6, "seq_lengths": [2, 4]}, {"input_ids": [5] * 3, "seq_lengths": [3]}]
    batch = PackedCollator(pad_token_id=0, varlen=True)(rows)
    # row 0: docs of 2 and 4; row 1: doc of 3 then 3 padding tokens (their own segment)
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 6, 9, 12]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 4
    assert "cu_seq_lens_q" not in PackedCollator(pad_token_id=0)(rows)


@pytest.mark.parametrize(
    "name", ["flash_attention_4", "paged|sdpa", "kernels-community/flash-attn2", "sdpa_paged"]
)
def test_an_implementation_that_cannot_be_shown_to_isolate_documents_is_refused(name):
    with pytest.raises(UserError, match=r"train\.attn_implementation=.*packed documents") as exc:
        attention.check(name)
    assert "\n" not in str(exc.value)
