"""Causal-LM loss that never materialises the full-vocabulary logits (train and eval).

The stock `ForCausalLM.forward` computes `logits = lm_head(hidden)` for every token and the loss
then upcasts them: at 4 x 4096 tokens and OpenSeek's 151,851-token vocabulary that is ~4.6 GiB of
bf16 logits plus two ~9.3 GiB fp32 copies kept for backward, per device. `install(model, impl)`
replaces the model's forward (this instance only) so that, whenever `labels` are passed, the loss
comes from the final hidden states and the LM head weight directly:

- `chunked` (default, any device): `linear_cross_entropy` below. Tokens are processed in chunks
  of `CHUNK_TOKENS`; each chunk's logits (in the matmul dtype: bf16 under bf16 autocast, as the
  stock path computes them) are upcast to fp32, the loss and the gradients w.r.t. hidden states
  and weight are computed at once and the chunk's logits freed. Peak extra memory is one chunk of
  fp32 logits (2048 x V x 4 B = 1.2 GiB for OpenSeek) + an fp32 weight gradient, instead of three
  full-vocab tensors. Equality with the stock loss and gradients: tests/modeling/test_loss.py.
- `liger`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only; `pip install .[gpu]`).
- `hf`: the stock forward (full logits), kept as the reference and for A/B benchmarks.

Loss semantics are HF's (`ForCausalLMLoss`): labels are shifted inside (position i predicts
label i+1), -100 is ignored, and with `num_items_in_batch` (what Trainer passes under gradient
accumulation) the loss is sum / num_items_in_batch, otherwise the mean over scored tokens. The
forward then returns `logits=None`, so evaluation never gathers vocab-size logits either.
"""

from __future__ import annotations

import types
from typing import Any

import torch

IGNORE_INDEX = -100
# Tokens per chunk: big enough for an efficient GEMM (2048 x 1280 x 151851), small enough that
# its fp32 logits stay ~1.2 GiB.
CHUNK_TOKENS = 2048


def install(model: Any, implementation: str = "chunked", chunk_tokens: int = CHUNK_TOKENS) -> Any:
    """Make `model(..., labels=...)` compute its loss with `implementation`; returns the model."""
    if implementation == "hf":
        return model
    if implementation == "liger":
        check_liger()
    elif implementation != "chunked":
        raise ValueError(f"loss implementation {implementation!r} is not one of chunked, liger, hf")
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise ValueError(f"{type(model).__name__} has no lm_head/model: cannot fuse its loss")
    stock_forward = type(model).forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        if labels is None:  # generation / logits wanted: the stock path
            return stock_forward(
                self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs,
            )  # fmt: skip
        from transformers.modeling_outputs import CausalLMOutputWithPast

        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )  # fmt: skip
        loss = causal_lm_loss(
            outputs.last_hidden_state,
            self.lm_head.weight,
            labels,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            shift_labels=kwargs.get("shift_labels"),
            implementation=implementation,
            chunk_tokens=chunk_tokens,
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    model.forward = types.MethodType(forward, model)
    model.openseek_loss = implementation
    return model


def check_liger() -> None:
    """Liger's kernels are Triton: CUDA and the liger-kernel package, or a one-line UserError."""
    import importlib.util

    from openseek_cpt.errors import UserError

    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError(
            "train.loss='liger' but liger-kernel is not installed; pip install '.[gpu]' or use 'chunked'"
        )
    if not torch.cuda.is_available():
        raise UserError("train.loss='liger' needs a CUDA GPU (Triton kernels); use train.loss='chunked' here")


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    implementation: str = "chunked",
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """HF `ForCausalLMLoss` of `hidden @ weight.T` (shift, ignore -100, sum/num_items or mean)."""
    if shift_labels is None:
        assert labels is not None, "labels or shift_labels"
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    return linear_cross_entropy(flat, weight, targets, denominator, implementation, chunk_tokens)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denominator: torch.Tensor | float = 1.0,
    implementation: str = "chunked",
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """sum over scored tokens of CE(hidden @ weight.T, targets) / denominator, in fp32.

    Shapes (N, H), (V, H), (N,). denominator=1 gives the summed loss (evaluation).
    """
    dtype = matmul_dtype(hidden, weight)
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
    if implementation == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(
            ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
        )
        return lce(weight.to(dtype), hidden.to(dtype), targets).float() / denominator
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, denominator, chunk_tokens, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, h.shape[0], chunk_tokens):
            total += _chunk_loss(h[s : s + chunk_tokens], w, targets[s : s + chunk_tokens])[0]
    return total / denominator


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the stock `lm_head` matmul runs in: the autocast dtype if enabled, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """(summed loss, fp32 logits, log-sum-exp, scored mask, safe targets) of one chunk."""
    logits = (h @ w.T).float()
    scored = t != IGNORE_INDEX
    safe = torch.where(scored, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None])[:, 0]
    return ((lse - picked) * scored).sum(), logits, lse, scored, safe


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE / denominator; its gradients are computed chunk by chunk in the forward pass (as Liger)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator, chunk_tokens, dtype):
        device = hidden.device
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=device)
                if ctx.needs_input_grad[1]
                else None
            )
            total = torch.zeros((), dtype=torch.float32, device=device)
            for s in range(0, h.shape[0], chunk_tokens):
                hc = h[s : s + chunk_tokens]
                loss, logits, lse, scored, safe = _chunk_loss(hc, w, targets[s : s + chunk_tokens])
                total += loss
                # d(sum CE / denominator)/d logits = (softmax - onehot) / denominator on scored rows.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(grad.shape[0], device=device), safe] -= 1.0
                grad.mul_((scored.float() / denominator)[:, None])
                grad = grad.to(dtype)
                del logits
                if grad_h is not None:
                    grad_h[s : s + chunk_tokens] = grad @ w
                if grad_w is not None:
                    grad_w += (grad.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_output.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None
