"""Train stage pieces: document masking as trained, precision, MoE-safe resume, bad inputs, teardown."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, copy_workdir, run_cli
from safetensors.torch import load_file

from openseek_cpt import launcher
from openseek_cpt.artifacts.prepared import pad_token_id
from openseek_cpt.artifacts.provenance import directory_fingerprint
from openseek_cpt.config import load_recipe
from openseek_cpt.errors import UserError
from openseek_cpt.modeling import attention
from openseek_cpt.modeling.collator import PackedCollator
from openseek_cpt.train import config
from openseek_cpt.train.model import load_model
from openseek_cpt.train.setup import setup_run
from openseek_cpt.train.stage import build_trainer

ONE_STEP = ["--set", "train.args.max_steps=1", "--set", "train.args.eval_strategy='no'",
            "--set", "train.args.learning_rate=2.0e-5"]  # fmt: skip


def document_logits(t, rows, model):
    """(logits, per-token loss) of packed rows, with the model, collator and mode training uses.

    The model comes from `load_model` (config as trained: use_cache=False, training dtype), is kept
    in train mode, and runs under the same autocast the Trainer uses for `t.precision`.
    """
    model.train()
    batch = PackedCollator(
        pad_token_id=pad_token_id({}, model.config),
        varlen=attention.needs_varlen(t.attn_implementation),
    )(rows)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device_type)
    batch = {k: v.to(device_type) if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = t.precision == "bf16-mixed"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})  # + varlen fields if any
    logits = out.logits.float()
    shift_logits = logits[:, :-1]
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(shift_labels.shape)
    return logits, loss


@pytest.fixture(scope="module")
def prepared(tiny_prepared_dir, tmp_path_factory) -> Path:
    """A private copy of the tiny assets + prepared tiny dataset."""
    return copy_workdir(tiny_prepared_dir, tmp_path_factory, "train-units")


@pytest.fixture()
def in_prepared(prepared, monkeypatch) -> Path:
    monkeypatch.chdir(prepared)
    return prepared


def test_a_document_packed_after_others_gets_the_logits_it_gets_alone(in_prepared):
    recipe = load_recipe(TINY_RECIPE)
    model = load_model(
        recipe.train, recipe.train_model_dir
    )  # as training builds it: use_cache=False, fp32 weights, train mode
    assert model.config.use_cache is False
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(1, 1000, (37,), generator=g).tolist()
    other = torch.randint(1, 1000, (50,), generator=g).tolist()
    alone_logits, alone_loss = document_logits(recipe.train, [{"input_ids": doc, "seq_lengths": [37]}], model)
    packed = [{"input_ids": other + doc, "seq_lengths": [50, 37]}]
    packed_logits, packed_loss = document_logits(recipe.train, packed, model)
    # Same document, same kernels (bf16 autocast as in training): equal to float tolerance.
    torch.testing.assert_close(packed_logits[0, 50:], alone_logits[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(packed_loss[0, 50:], alone_loss[0], rtol=0, atol=1e-4)
    # The first token of the document is not a target of the previous document.
    assert packed_loss[0, 49] == 0
    # Controls that can fail: no position reset, or a KV cache, lets the document see the other one.
    unreset, _ = document_logits(recipe.train, [{"input_ids": other + doc, "seq_lengths": [87]}], model)
    assert (unreset[0, 50:] - alone_logits[0]).abs().max() > 1e-2
    model.config.use_cache = True
    leaked, _ = document_logits(recipe.train, packed, model)
    assert (leaked[0, 50:] - alone_logits[0]).abs().max() > 1e-2


def _changed_share(before: dict, after: dict) -> float:
    changed = total = 0
    for key, tensor in before.items():
        if "e_score_correction_bias" in key:  # a router buffer, not trained
            continue
        changed += int((after[key] != tensor).sum())
        total += tensor.numel()
    return changed / total


def _kept_fp32_by_transformers() -> set[str]:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3PreTrainedModel as cls

    return set(cls._keep_in_fp32_modules_strict or ())  # the non-strict list upcasts only under fp16


def _is_kept(key: str, kept: set[str]) -> bool:
    """transformers' own matching rule: a listed name is a dotted component of the key."""
    return any(f".{name}." in f".{key}." for name in kept)


def test_one_step_at_lr_2e5_changes_almost_every_element_with_fp32_master_weights(prepared, tmp_path):
    base = load_file(prepared / "models" / "tiny-openseek" / "model.safetensors")
    shares = {}
    for precision in ("bf16-mixed", "bf16-pure"):
        out = f"runs/{precision}"
        r = run_cli("train", "--recipe", str(TINY_RECIPE), *ONE_STEP, "--set", f"train.precision={precision}",
                    "--set", f"train.output_dir={out}", cwd=prepared)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        after = load_file(prepared / out / "final" / "model.safetensors")
        if precision == "bf16-pure":
            # Every weight is bf16 except what transformers keeps fp32 on purpose (its
            # _keep_in_fp32_modules_strict: the router's correction bias in 5.23, the gate too in 5.24).
            kept = _kept_fp32_by_transformers()
            assert kept, "transformers names no fp32 module for DeepseekV3: the rule below tests nothing"
            wrong = {k: t.dtype for k, t in after.items() if (t.dtype == torch.bfloat16) == _is_kept(k, kept)}
            assert not wrong, f"bf16-pure weights with the wrong dtype (kept fp32: {kept}): {wrong}"
            base_cmp = {k: v.to(torch.bfloat16) for k, v in base.items()}
        else:
            assert all(t.dtype == torch.float32 for t in after.values())  # fp32 master weights
            base_cmp = base
        shares[precision] = _changed_share(base_cmp, after)
    print(f"elements changed by one step at lr 2e-5: {shares}; pure bf16 loses {1 - shares['bf16-pure']:.1%}")
    assert shares["bf16-mixed"] > 0.99
    assert shares["bf16-pure"] < 0.5 * shares["bf16-mixed"]


def test_resume_restores_the_fused_moe_experts_that_the_stock_trainer_path_leaves_random(
    prepared, monkeypatch
):
    from transformers import Trainer

    r = run_cli("train", "--recipe", str(TINY_RECIPE), *ONE_STEP, "--set", "train.args.save_steps=1",
                "--set", "train.args.learning_rate=1.0e-2", "--set", "train.output_dir=runs/moe", cwd=prepared)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = prepared / "runs" / "moe" / "checkpoint-1"
    recipe = load_recipe(TINY_RECIPE, ["train.args.eval_strategy='no'", "train.output_dir=runs/moe-check"])
    monkeypatch.chdir(prepared)
    trained = load_model(recipe.train, str(ckpt)).state_dict()
    trainer = build_trainer(setup_run(**recipe.stage_args("train")))
    Trainer._load_from_checkpoint(trainer, str(ckpt))  # the stock path
    stock = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._load_from_checkpoint(str(ckpt))  # ours
    ours = trainer.model.state_dict()
    experts = [k for k in trained if ".mlp.experts." in k]
    assert experts, "the tiny model has fused expert tensors"
    assert all(not torch.equal(stock[k], trained[k]) for k in experts)  # the trap, still there
    assert all(torch.equal(ours[k], trained[k]) for k in trained)  # every tensor restored


def _fails_with_one_line(r, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("openseek-cpt train: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_inputs_stop_with_one_line_and_exit_2(prepared):
    def train_with(*sets: str):
        return run_cli("train", "--recipe", str(TINY_RECIPE), *[a for s in sets for a in ("--set", s)],
                       cwd=prepared)  # fmt: skip

    _fails_with_one_line(train_with("train.dataset_dir=datasets/nope"), "train.dataset_dir", "datasets/nope")
    _fails_with_one_line(train_with("train.global_batch_size=6"), "global_batch_size=6", "world_size=1",
                         "per_device_batch_size=4")  # fmt: skip
    _fails_with_one_line(train_with("train.args.learning_rat=0.1"), "learning_rat", "learning_rate")
    _fails_with_one_line(train_with("train.args.gradient_accumulation_steps=2"), "train.global_batch_size")
    # A dataset made with another tokenizer: its manifest records another vocabulary size.
    other = prepared / "datasets" / "other-vocab"
    shutil.copytree(prepared / "datasets" / "tiny-mix", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["vocab_size"] = 50_000
    (other / "manifest.json").write_text(json.dumps(manifest))
    _fails_with_one_line(train_with(f"train.dataset_dir={other}"), "50000", "1024")
    # Resume into a checkpoint made with another dataset (the data stage with another seed).
    r = run_cli("data", "--recipe", str(TINY_RECIPE), "--set", "seed=7", "--set",
                "data.output_dir=datasets/reseeded", cwd=prepared)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("train", "--recipe", str(TINY_RECIPE), *ONE_STEP, "--set", "train.args.save_steps=1",
                "--set", "train.output_dir=runs/fp", cwd=prepared)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    _fails_with_one_line(
        train_with(
            "train.output_dir=runs/fp", "train.dataset_dir=datasets/reseeded", "train.args.max_steps=2"
        ),
        "force_resume",
    )
    # overwrite_output_dir means: start over from the base model on the new dataset.
    r = train_with("train.output_dir=runs/fp", "train.dataset_dir=datasets/reseeded", "train.args.max_steps=1",
                   "train.args.overwrite_output_dir=true", "train.args.eval_strategy='no'")  # fmt: skip
    assert r.returncode == 0 and "resuming from" not in r.stderr, r.stderr[-2000:]
    prov = json.loads((prepared / "runs" / "fp" / "final" / "provenance.json").read_text())
    assert prov["global_step"] == 1
    assert prov["inputs"]["dataset"] == directory_fingerprint(prepared / "datasets" / "reseeded")


def test_bf16_on_a_device_without_it_is_an_error_naming_the_fp32_fix():
    with pytest.raises(UserError, match="train.precision=fp32"):
        config.precision_args("bf16-mixed", has_bf16=False)
    assert config.precision_args("fp32", has_bf16=False) == {"bf16": False, "fp16": False}
    assert config.precision_args("bf16-mixed", has_bf16=True)["bf16"] is True
    assert config.precision_args("bf16-pure", has_bf16=True)["bf16"] is False  # weights are bf16 already
    assert config.bf16_supported() is True  # CPU autocast runs bf16


def test_training_arguments_are_built_in_one_place_from_the_section_and_what_the_stage_derives():
    """The load-time check and the stage build TrainingArguments with one function; the check's
    build (on a CPU) leaves os.environ as it found it, so a GPU run never inherits its variables."""
    before = dict(os.environ)
    recipe = load_recipe(
        TINY_RECIPE, ["seed=7", "train.per_device_batch_size=2", "train.args.save_total_limit=3"]
    )
    assert dict(os.environ) == before
    args = config.training_arguments(recipe.train, config.RunFacts(seed=recipe.seed, grad_accum=2))
    assert (args.output_dir, args.seed, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        recipe.train.output_dir, 7, 2, 2)  # fmt: skip
    assert args.remove_unused_columns is False and args.ddp_find_unused_parameters is False
    assert args.save_total_limit is None and recipe.train.keep == 3  # the stage rotates, after its marker
    for key, (instead, _) in config.DERIVED_ARGS.items():
        with pytest.raises(
            UserError, match=f"train.args.{key} is set by the train stage; .*{re.escape(instead)}"
        ):
            load_recipe(TINY_RECIPE, [f"train.args.{key}=1"])


def test_gradient_accumulation_is_derived_from_the_world_size():
    assert config.gradient_accumulation(1024, 16, 4) == 16
    assert config.gradient_accumulation(8, 2, 4) == 1
    with pytest.raises(UserError, match="global_batch_size=1000.*world_size=16.*per_device_batch_size=4"):
        config.gradient_accumulation(1000, 16, 4)


TEARDOWN_RANK = """
import os, sys, time, torch
from openseek_cpt.rank_exit import leave_process_group
torch.distributed.init_process_group("gloo")
if torch.distributed.get_rank() == 1 and sys.argv[1] == "hang":
    time.sleep(120)  # never reaches the barrier: rank 0's teardown cannot complete
leave_process_group(exit_code=3, deadline_s=3)
print("left", torch.distributed.is_initialized(), flush=True)
"""


@pytest.mark.parametrize("peer", ["joins", "hang"])
def test_a_rank_whose_process_group_teardown_hangs_exits_with_its_code_after_the_deadline(peer, tmp_path):
    """The teardown runs after every output is complete: a stuck one (pytorch#75097) must not hold the job."""
    port = launcher._free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", TEARDOWN_RANK, peer],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    start = time.monotonic()
    try:
        out, err = ranks[0].communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        for p in ranks:
            p.kill()
    if peer == "joins":
        assert ranks[0].returncode == 0 and out.strip() == "left False", err[-2000:]
    else:
        assert ranks[0].returncode == 3, err[-2000:]
        assert "process-group teardown still running after 3 s" in err and "leave_process_group" in err
        assert "left" not in out and 3 <= took < 45, (took, err[-2000:])


def test_the_checkpointing_switch_is_named_as_the_installed_transformers_names_it():
    """transformers 5.17 (some GPU machines) has only gradient_checkpointing; 5.2x activation_checkpointing."""
    import dataclasses

    from transformers import TrainingArguments

    older = dataclasses.make_dataclass("Older", [("gradient_checkpointing", bool, False)])
    assert config.checkpointing_arg(older) == "gradient_checkpointing"
    assert config.checkpointing_arg(TrainingArguments) == "activation_checkpointing"
