"""The chunked linear cross-entropy equals transformers' own causal-LM loss, without full logits.

Reference: the same tiny deepseek_v3 with its stock forward (lm_head logits -> ForCausalLMLoss).
Tolerances: fp32 loss 1e-6 relative, fp32 gradients 1e-5 (norm of the difference / norm);
under bf16 autocast both paths round the logits matmul to bf16 the same way, but the weight
gradient is summed over chunks in fp32 instead of one bf16 GEMM output: loss 1e-4, gradients 1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openseek_cpt.modeling import loss

VOCAB = 320


def tiny_pair(chunk_tokens: int = 37):
    from transformers import DeepseekV3ForCausalLM

    from openseek_cpt.testing.fixtures import tiny_config

    torch.manual_seed(0)
    config = tiny_config(VOCAB, 2)
    config.use_cache = False
    reference = DeepseekV3ForCausalLM(config).train()
    fused = loss.install(copy.deepcopy(reference), "chunked", chunk_tokens=chunk_tokens)
    return reference, fused


def batch(seed: int = 0, rows: int = 3, width: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    labels[0, 10] = -100
    labels[1, : width // 2] = -100  # rows score different numbers of tokens
    return ids, labels


def grad_gap(a, b) -> float:
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        worst = max(worst, float((pa.grad - pb.grad).norm() / pa.grad.norm().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize(("autocast", "loss_tol", "grad_tol"), [(False, 1e-6, 1e-5), (True, 1e-4, 1e-2)])
def test_chunked_loss_and_gradients_equal_the_stock_loss(autocast, loss_tol, grad_tol):
    reference, fused = tiny_pair()
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = reference(input_ids=ids, labels=labels).loss
        got = fused(input_ids=ids, labels=labels)
    assert got.logits is None
    assert float(got.loss.detach()) == pytest.approx(float(expected.detach()), rel=loss_tol)
    expected.backward()
    got.loss.backward()
    gap = grad_gap(reference, fused)
    print(f"autocast={autocast}: loss {float(expected):.6f} vs {float(got.loss):.6f}, gradient gap {gap:.2e}")
    assert gap < grad_tol


def test_gradient_accumulation_normalises_by_the_tokens_of_the_whole_step():
    """Two micro-batches with num_items_in_batch = scored tokens of both: the sum is the step's mean."""
    reference, fused = tiny_pair()
    micro = [batch(seed) for seed in (1, 2)]
    micro[1][1][2, 5:] = -100  # unequal token counts per micro-batch
    total = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
    for model in (reference, fused):
        for ids, labels in micro:
            model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(total)).loss.backward()
    whole_ids = torch.cat([ids for ids, _ in micro])
    whole_labels = torch.cat([labels for _, labels in micro])
    step_mean = fused(input_ids=whole_ids, labels=whole_labels).loss  # mean over scored tokens
    accumulated = sum(
        float(fused(input_ids=ids, labels=labels, num_items_in_batch=total).loss) for ids, labels in micro
    )
    assert accumulated == pytest.approx(float(step_mean), rel=1e-6)
    assert grad_gap(reference, fused) < 1e-5


def test_evaluation_without_grad_gives_the_same_loss_and_no_logits():
    reference, fused = tiny_pair()
    ids, labels = batch(3)
    reference.eval(), fused.eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=labels).loss
        got = fused(input_ids=ids, labels=labels)
        plain = fused(input_ids=ids)  # no labels: the stock forward, logits as usual
    assert got.logits is None and float(got.loss) == pytest.approx(float(expected), rel=1e-6)
    assert plain.logits.shape == (*ids.shape, VOCAB)


class LogitRows(TorchDispatchMode):
    """The most rows (tokens) of any tensor an op allocated with a vocabulary-sized last dimension."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # views (e.g. weight.T) and in-place results allocate nothing
            if t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.most = max(self.most, t.numel() // VOCAB)
        return out


def test_no_tensor_of_full_vocabulary_logits_is_ever_made():
    chunk = 16
    reference, fused = tiny_pair(chunk_tokens=chunk)
    ids, labels = batch(4, rows=4, width=64)
    tokens = ids.numel()
    assert reference.config.hidden_size != VOCAB  # weight-shaped tensors are not counted as logits
    with LogitRows() as seen_ref:
        reference(input_ids=ids, labels=labels).loss.backward()
    with LogitRows() as seen:
        fused(input_ids=ids, labels=labels).loss.backward()
    assert seen_ref.most == tokens  # the check sees the stock path's full logits
    assert seen.most == chunk  # the chunked path: one chunk of logits at a time, forward and backward


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="not one of"):
        loss.install(object(), "fast")


def test_every_loss_the_recipe_offers_is_one_install_knows():
    from openseek_cpt.errors import UserError
    from openseek_cpt.train.config import LOSSES

    for name in LOSSES:
        try:
            loss.install(object(), name)
        except ValueError as exc:  # chunked: no lm_head on this object, but a known name
            assert "not one of" not in str(exc), name
        except UserError:  # liger: its package or a GPU is missing here
            pass


def test_eval_loss_of_the_evaluation_module_equals_the_stock_logits_loss(tmp_path):
    """evaluation.eval_loss (chunked, like training) == cross-entropy of the stock full logits."""
    from datasets import Dataset, DatasetDict

    from openseek_cpt.evaluation import eval_loss
    from openseek_cpt.modeling.collator import PackedCollator

    reference, _ = tiny_pair()
    reference.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(7)
    rows = {"input_ids": [torch.randint(3, VOCAB, (40,), generator=g).tolist() for _ in range(3)],
            "seq_lengths": [[12, 28], [40], [5, 20, 15]]}  # fmt: skip
    DatasetDict({"eval": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    got = eval_loss(tmp_path / "model", tmp_path / "data", batch_size=2)
    batch = PackedCollator(pad_token_id=0)(
        [dict(zip(rows, r, strict=True)) for r in zip(*rows.values(), strict=True)]
    )
    reference.eval()
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    labels = batch["labels"][:, 1:]
    expected = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        / (labels != -100).sum()
    )
    assert got["tokens"] == int((labels != -100).sum())
    assert got["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_liger_without_its_package_or_a_gpu_is_a_one_line_user_error():
    from openseek_cpt.errors import UserError

    _, model = tiny_pair()
    with pytest.raises(UserError, match=r"train\.loss='liger'") as exc:
        loss.install(model, "liger")
    assert "\n" not in str(exc.value)
