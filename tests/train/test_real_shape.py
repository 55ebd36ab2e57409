"""The real-shape fixture through every stage: download -> data -> train -> soup.

A local "hub" repo shaped like BAAI/OpenSeek-Small-v1 (fixtures.build_real_shape_hub): its kind
of tokenizer (remote code over tiktoken, 151,851 ids, eos `<|extra_204|>`, pad `<|endoftext|>`)
and a random deepseek_v3 with the real per-layer shapes (hidden 1280, MLA, 64 experts of 896 top-6
+ 2 shared, dense first layer 7168, tied 151,851 x 1280 embedding) at 2 layers so a CPU trains it.
Each stage runs as its own `openseek-cpt` process, as on the cluster: an end-to-end test (`e2e`, left
out of `make test-fast`). It trains in fp32: what it proves is the shapes, the tokenizer and the
formats, and bf16 matmuls on a CPU without AVX-512 bf16 take minutes per step at this vocabulary (the
chunked loss's bf16 `grad.T @ hc`); the bf16-mixed paths are proven at small shapes in
tests/modeling (test_loss, test_experts, test_precision_under_autocast) and by the tiny pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

from openseek_cpt.artifacts import megatron_format
from openseek_cpt.testing import megatron_files
from openseek_cpt.testing.fixtures import REAL_VOCAB, build_real_shape_hub, stdlib_docstrings

pytestmark = pytest.mark.e2e

SPECIAL_DOC = "Quoted in a page: <|endoftext|> then <|extra_204|>, both as plain text."


def _recipe(work: Path) -> Path:
    raw = {
        "seed": 233,
        "assets": {
            "base_model": "hub/OpenSeek-Small-v1-2layers",
            "model_dir": "models/real",
            "tokenizer_trust_remote_code": True,
            "model_trust_remote_code": False,
        },
        "data": {
            "output_dir": "datasets/real",
            "max_length": 64,
            "total_sample_size": 8,
            "eval_size": 2,
            "num_proc": 1,
            "read_margin": 50.0,  # reads every (short) document: the special one included
            "megatron_prefix": "export/real_text_document",
            "sources": [
                {"path": "sources/web.jsonl", "ratio": 0.5, "label": "web"},
                {"path": "sources/code_text_document", "ratio": 0.5, "label": "code"},
            ],
        },
        "train": {
            "output_dir": "runs/real",
            "global_batch_size": 2,
            "per_device_batch_size": 1,
            "precision": "fp32",  # see the module's doc
            "attn_implementation": "sdpa",
            "args": {
                "learning_rate": 1.0e-4,
                "optim": "sgd",  # no AdamW moments: ~4 GB less peak memory for a shape test on CI
                "lr_scheduler_type": "constant",
                "max_steps": 2,
                "save_steps": 1,
                "save_only_model": True,
                "logging_steps": 1,
                "report_to": [],
                "dataloader_num_workers": 0,
            },
        },
        "soup": {
            "checkpoints": ["runs/real/checkpoint-*"],
            "output_dir": "models/real-soup",
            "evaluate": False,
        },
    }
    path = work / "real.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Build the fixture hub and sources, then run download, data, train and soup once."""
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("real-shape")
    hub = build_real_shape_hub(work / "hub" / "OpenSeek-Small-v1-2layers")
    tok = AutoTokenizer.from_pretrained(str(hub), trust_remote_code=True)
    (work / "sources").mkdir()
    docs = stdlib_docstrings(max_files=40)[:60]
    with open(work / "sources" / "web.jsonl", "w") as f:
        for t in [*docs[:30], SPECIAL_DOC, *docs[30:]]:
            f.write(json.dumps({"text": t}) + "\n")
    code = [np.asarray(tok(t)["input_ids"] + [tok.eos_token_id]) for t in docs[::-1]]
    megatron_files.write_documents(work / "sources" / "code_text_document", code, vocab_size=len(tok))
    recipe = _recipe(work)
    logs = {}
    for stage in ("download", "data", "train", "soup"):
        r = run_cli(stage, "--recipe", str(recipe), cwd=work, timeout=900)
        assert r.returncode == 0, f"{stage}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        logs[stage] = r.stdout
    return work, logs


def test_download_loads_remote_code_tokenizer_and_native_model_strictly(real_run):
    work, logs = real_run
    assert "strict load of DeepseekV3ForCausalLM" in logs["download"]
    model_dir = work / "models/real"
    assert (model_dir / "tokenization_qwen_tiktoken.py").is_file()  # the remote code travels with it
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert (config["vocab_size"], config["n_routed_experts"], config["hidden_size"]) == (REAL_VOCAB, 64, 1280)


def test_data_uses_the_gigatoken_path_counts_special_text_and_exports_int32(real_run):
    work, logs = real_run
    manifest = json.loads((work / "datasets/real/manifest.json").read_text())
    assert manifest["tokenizer_path"] == "gigatoken" and "[data] tokenizer path: gigatoken" in logs["data"]
    assert manifest["vocab_size"] == REAL_VOCAB and manifest["eos_token_id"] == 151850
    assert manifest["pad_token_id"] == 151643
    by_label = {s["label"]: s for s in manifest["sources"]}
    assert by_label["web"]["documents_with_special_text"] == 1 and by_label["code"]["kind"] == "megatron"
    index = megatron_format.read_index(work / "export/real_text_document")
    assert index.dtype is np.int32  # 151,851 ids do not fit Megatron's uint16
    exported = megatron_files.read_documents(work / "export/real_text_document")
    ids = np.concatenate([np.asarray(x) for x in exported["input_ids"]])
    assert ids.min() >= 0 and ids.max() < REAL_VOCAB and set(ids[ids >= 151643].tolist()) == {151850}


def test_train_and_soup_keep_the_real_tensor_shapes(real_run):
    from safetensors import safe_open

    work, logs = real_run
    checkpoints = sorted((work / "runs/real").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    soup = work / "models/real-soup"
    shapes = {}
    for shard in sorted(soup.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    assert shapes["model.embed_tokens.weight"] == (REAL_VOCAB, 1280)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (7168, 1280)  # the dense first layer
    experts = [k for k in shapes if k.startswith("model.layers.1.mlp.experts.")]
    assert experts and shapes["model.layers.1.mlp.gate.weight"] == (64, 1280)
    assert shapes["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (512 + 64, 1280)
    merge_info = json.loads((soup / "merge_info.json").read_text())
    assert len(merge_info["inputs"]) == 3  # base + 2 checkpoints
