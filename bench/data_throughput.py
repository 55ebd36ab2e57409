"""Throughput of `openseek-cpt data` against the tokenizer's own ceiling, and its work scaling.

    python bench/data_throughput.py [--tokens 40e6] [--scale-tokens 8e6] [--num-proc N] [--repeats 3]
                                    [--workdir DIR]

Builds the tiny assets (no download) and a text corpus from the standard library's sources, then:
1. raw ceiling: the tokenizer's batch encoding of exactly the text the stage will read, Rust threads
   on every core, in tokens/s: `tokenizer(texts)` (the acceptance's ceiling) and, stricter, the Rust
   backend's `encode_batch_fast` (what the stage calls once it has checked that the ids are equal);
2. end-to-end: `openseek-cpt data` in a fresh interpreter (start, imports, tokenize, pack, sample,
   save, exit) on a one-source mix whose share needs the whole corpus, in tokens/s, and its ratio to
   the ceilings; "excluding start-up" divides by the stage's own time, measured inside that child
   after its imports (interpreter + imports + exit are the start-up, amortized by real mixes of
   billions of tokens);
3. work scaling: a mix over --scale-tokens, then the same mix with a source 10x larger than its
   share; the time ratio must stay < 1.5 (the stage tokenizes only what the share needs).
All figures are measured in the same run on the same machine, interleaved, best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# A fresh interpreter that runs `openseek-cpt data` and reports its start-up and stage times.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import datasets  # what the stage imports before its first token (transformers pulls torch)
from transformers import AutoTokenizer
from trl import pack_dataset
from openseek_cpt import data
from openseek_cpt.cli import main
t1 = time.perf_counter()
rc = main(["data", "--recipe", sys.argv[1]])
print(json.dumps({"imports": t1 - t0, "stage": time.perf_counter() - t1}), file=sys.stderr)
sys.exit(rc)
"""


def corpus(n_chars: int) -> list[str]:
    """Documents of 1-8k characters cut from the standard library's sources, repeated to n_chars."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    pieces = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        step = 1000 + (len(text) % 7000)
        pieces += [text[i : i + step] for i in range(0, len(text), step)]
    docs, total, i = [], 0, 0
    while total < n_chars:
        docs.append(pieces[i % len(pieces)] + f"\n# copy {i // len(pieces)}")
        total += len(docs[-1])
        i += 1
    return docs


def run_data(workdir: Path, recipe: dict, name: str) -> tuple[float, float, dict]:
    """(wall seconds of the child, seconds of the stage inside it, manifest)."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the stage's own default, not the ceiling's setting
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], cwd=workdir, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"openseek-cpt data failed:\n{r.stderr[-3000:]}")
    timing = json.loads(r.stderr.strip().splitlines()[-1])
    manifest = json.loads((workdir / recipe["data"]["output_dir"] / "manifest.json").read_text())
    return wall, timing["stage"], manifest


def mix(path: str, out: str, n_tokens: int, n_docs: int, args: argparse.Namespace, tiny: Path) -> dict:
    """A one-source recipe whose share needs (nearly) all of a corpus of n_tokens in n_docs documents."""
    recipe = yaml.safe_load(tiny.read_text())
    recipe["data"] = {
        "output_dir": out,
        "max_length": args.max_length,
        "total_sample_size": int((n_tokens + n_docs) * 0.97 / args.max_length),
        "eval_size": 0,
        "num_proc": args.num_proc,
        "read_margin": 0.05,
        "sources": [{"path": path, "ratio": 1.0, "label": "corpus"}],
    }
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=40e6, help="approximate tokens in the throughput corpus")
    ap.add_argument("--scale-tokens", type=float, default=8e6, help="tokens in the work-scaling share")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="data.num_proc (default: cores)")
    ap.add_argument("--max-length", type=int, default=256, help="<= the tiny model's 256 positions")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time counts")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tiny = REPO / "recipes/tiny/config.yaml"
    if not (workdir / "models/tiny-openseek").is_dir():
        for cmd in (["tiny-assets", "--out", "models/tiny"], ["download", "--recipe", str(tiny)]):
            subprocess.run(
                [sys.executable, "-m", "openseek_cpt", *cmd],
                cwd=workdir,
                env=env,
                check=True,
                capture_output=True,
            )

    import datasets
    from datasets import Dataset
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "models/tiny-openseek"))
    tokenizer.model_max_length = int(1e30)
    chars_per_token = 2.5  # about right for the tiny tokenizer on this text; only sizes the corpora
    texts = corpus(int(args.tokens * chars_per_token))
    small = corpus(int(args.scale_tokens * chars_per_token))
    Dataset.from_dict({"text": texts}).save_to_disk(str(workdir / "corpus"))
    Dataset.from_dict({"text": small}).save_to_disk(str(workdir / "small"))
    Dataset.from_dict({"text": small * 10}).save_to_disk(str(workdir / "small10x"))

    # 1. raw ceilings: batch encoding of the same text, all cores (Rust threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    backend = tokenizer._tokenizer

    def encode_call(batch: list[str]) -> int:
        return sum(len(x) for x in tokenizer(batch)["input_ids"])

    def encode_fast(batch: list[str]) -> int:
        return sum(len(e.ids) for e in backend.encode_batch_fast(batch))

    def raw(encode) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(encode(texts[i : i + 1000]) for i in range(0, len(texts), 1000))
        return n, time.perf_counter() - t0

    n_tokens, first = raw(encode_call)
    n_small = sum(len(e.ids) for e in backend.encode_batch_fast(small))
    base = mix("corpus", "datasets/bench", n_tokens, len(texts), args, tiny)
    # 3. work scaling: the same small mix, then its source 10x larger than its share
    scale = mix("small", "datasets/bench-small", n_small, len(small), args, tiny)
    big = mix("small10x", "datasets/bench-small10x", n_small, len(small), args, tiny)
    big["data"]["total_sample_size"] = scale["data"]["total_sample_size"]

    # Interleaved repeats, best time of each: the machine may be shared (min is the least noisy estimate).
    call_times, fast_times, walls, stages, walls_s, walls10 = [first], [], [], [], [], []
    for k in range(args.repeats):
        if k:
            call_times.append(raw(encode_call)[1])
        fast_times.append(raw(encode_fast)[1])
        wall, stage, manifest = run_data(workdir, base, "e2e")
        walls.append(wall)
        stages.append(stage)
        walls_s.append(run_data(workdir, scale, "small")[0])
        wall10, _, manifest10 = run_data(workdir, big, "x10")
        walls10.append(wall10)
    raw_call, raw_fast = n_tokens / min(call_times), n_tokens / min(fast_times)
    wall, stage, wall_s, wall10 = min(walls), min(stages), min(walls_s), min(walls10)
    startup = walls[walls.index(wall)] - stages[walls.index(wall)]  # of the same (best) run
    read = manifest["totals"]["tokens_read"]
    e2e, inner = read / wall, read / stage
    s10 = manifest10["sources"][0]

    def fmt(times: list[float]) -> str:
        return "/".join(f"{t:.1f}" for t in times)

    print(
        f"corpus: {len(texts)} documents, {n_tokens / 1e6:.2f} M tokens, {os.cpu_count()} cores, "
        f"num_proc {args.num_proc}, max_length {args.max_length}, load (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    print(
        f"raw ceiling, tokenizer(texts):        {raw_call / 1e6:.3f} M tokens/s (best of {fmt(call_times)} s)"
    )
    print(
        f"raw ceiling, backend encode_batch_fast: {raw_fast / 1e6:.3f} M tokens/s (best of {fmt(fast_times)} s)"
    )
    print(
        f"openseek-cpt data end-to-end:         {e2e / 1e6:.3f} M tokens/s (best of {fmt(walls)} s for "
        f"{read / 1e6:.2f} M tokens read, {manifest['totals']['train_rows']} rows, "
        f"padding {manifest['padding_fraction']:.2%}; start-up (interpreter, imports, exit) {startup:.1f} s)"
    )
    print(
        f"openseek-cpt data excluding start-up: {inner / 1e6:.3f} M tokens/s (stage alone, best of {fmt(stages)} s)"
    )
    print(
        f"ratio end-to-end / tokenizer(texts): {e2e / raw_call:.2f} (target >= 0.8); "
        f"/ encode_batch_fast: {e2e / raw_fast:.2f}"
    )
    print(
        f"ratio excluding start-up / tokenizer(texts): {inner / raw_call:.2f}; "
        f"/ encode_batch_fast: {inner / raw_fast:.2f}"
    )
    print(
        f"work scaling ({n_small / 1e6:.2f} M token share): source 10x its share: {wall10:.1f} s "
        f"(best of {fmt(walls10)}) vs {wall_s:.1f} s (best of {fmt(walls_s)}) = {wall10 / wall_s:.2f}x "
        f"(target < 1.5x); read {s10['documents_read']} of {s10['documents_in_source']} documents"
    )


if __name__ == "__main__":
    main()
