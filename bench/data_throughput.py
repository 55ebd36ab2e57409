"""Throughput of `openseek-cpt data` against the tokenizer's own ceiling, and its work scaling.

    python bench/data_throughput.py [--tokens 8e6] [--num-proc N] [--repeats 3] [--workdir DIR]

Builds the tiny assets (no download) and a text corpus from the standard library's sources, then:
1. raw ceiling: the tokenizer's batch encoding (`tokenizer(texts)`, Rust threads on every core) of
   exactly the text the stage will read, in tokens/s;
2. end-to-end: `openseek-cpt data` as a subprocess (interpreter start, tokenize, pack, sample,
   save) on a one-source mix whose share needs the whole corpus, in tokens/s, and the ratio to 1.;
3. work scaling: the same mix with a source 10x larger than its share; the time ratio must stay
   < 1.5 (the stage tokenizes only what the share needs).
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
# What `openseek-cpt data` imports before its first token: a fixed cost, amortized by large mixes.
IMPORTS = (
    "import openseek_cpt.data, datasets; from transformers import AutoTokenizer; from trl import pack_dataset"
)


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


def run_data(workdir: Path, recipe: dict, name: str) -> tuple[float, dict]:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "openseek_cpt", "data", "--recipe", str(path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"openseek-cpt data failed:\n{r.stderr[-3000:]}")
    manifest = json.loads((workdir / recipe["data"]["output_dir"] / "manifest.json").read_text())
    return wall, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=8e6, help="approximate tokens in the corpus")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="data.num_proc (default: cores)")
    ap.add_argument("--max-length", type=int, default=256, help="<= the tiny model's 256 positions")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time counts")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
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
    chars_per_token = 3.0  # measured below; only sizes the corpus
    texts = corpus(int(args.tokens * chars_per_token))
    Dataset.from_dict({"text": texts}).save_to_disk(str(workdir / "corpus"))
    Dataset.from_dict({"text": texts * 10}).save_to_disk(str(workdir / "corpus10x"))

    # 1. raw ceiling: batch encoding of the same text, all cores (Rust threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    def raw_encode() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), 1000):
            n += sum(len(x) for x in tokenizer(texts[i : i + 1000])["input_ids"])
        return n, time.perf_counter() - t0

    # 2. end-to-end: the share needs the whole corpus (sized from its token count)
    n_tokens, _ = raw_encode()
    base = yaml.safe_load(tiny.read_text())
    rows = int((n_tokens + len(texts)) * 0.97 / args.max_length)
    base["data"] = {
        "output_dir": "datasets/bench",
        "max_length": args.max_length,
        "total_sample_size": rows,
        "eval_size": 0,
        "num_proc": args.num_proc,
        "read_margin": 0.05,
        "sources": [{"path": "corpus", "ratio": 1.0, "label": "corpus"}],
    }
    # 3. work scaling: same mix, source 10x larger than its share
    big = json.loads(json.dumps(base))
    big["data"]["sources"][0]["path"] = "corpus10x"
    big["data"]["output_dir"] = "datasets/bench10x"

    # Interleaved repeats, best time of each: the machine may be shared (min is the least noisy estimate).
    raw_times, walls, walls10, startups = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True)
        startups.append(time.perf_counter() - t0)
        raw_times.append(raw_encode()[1])
        wall, manifest = run_data(workdir, base, "e2e")
        walls.append(wall)
        wall10, manifest10 = run_data(workdir, big, "x10")
        walls10.append(wall10)
    raw_s, wall, wall10, startup = min(raw_times), min(walls), min(walls10), min(startups)
    raw = n_tokens / raw_s
    read = manifest["totals"]["tokens_read"]
    e2e = read / wall
    s10 = manifest10["sources"][0]

    def fmt(times: list[float]) -> str:
        return "/".join(f"{t:.1f}" for t in times)

    print(
        f"corpus: {len(texts)} documents, {n_tokens / 1e6:.2f} M tokens, {os.cpu_count()} cores, "
        f"num_proc {args.num_proc}, max_length {args.max_length}"
    )
    print(f"raw ceiling (tokenizer batch encode): {raw / 1e6:.3f} M tokens/s (best of {fmt(raw_times)} s)")
    print(
        f"openseek-cpt data end-to-end:         {e2e / 1e6:.3f} M tokens/s (best of {fmt(walls)} s for "
        f"{read / 1e6:.2f} M tokens read, {manifest['totals']['train_rows']} rows, "
        f"padding {manifest['padding_fraction']:.2%}; interpreter + imports (torch, transformers, datasets, trl) alone {startup:.1f} s)"
    )
    print(
        f"ratio end-to-end / raw: {e2e / raw:.2f} (target >= 0.8); excluding start-up: "
        f"{read / (wall - startup) / raw:.2f}"
    )
    print(
        f"work scaling: source 10x its share: {wall10:.1f} s (best of {fmt(walls10)}) vs {wall:.1f} s = {wall10 / wall:.2f}x "
        f"(target < 1.5x); read {s10['documents_read']} of {s10['documents_in_source']} documents"
    )


if __name__ == "__main__":
    main()
