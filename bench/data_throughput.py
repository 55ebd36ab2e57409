"""Throughput of `openseek-cpt data` against the tokenizer's own ceiling, and its work scaling.

    python bench/data_throughput.py [--case tiny|tiktoken|megatron] [--tokens 40e6] [--scale-tokens 8e6]
                                    [--num-proc N] [--repeats 3] [--workdir DIR]

--case tiktoken: the same end-to-end measurement with OpenSeek's kind of tokenizer (remote code
over tiktoken, 151,851 ids; fixtures.write_qwen_tokenizer); the ceiling is the tiktoken
`Encoding.encode_ordinary_batch` of the same texts on all cores (its threads), and the stage's ids
are checked against `tokenizer(texts)` on a sample of the corpus.
--case megatron: a Megatron `.bin/.idx` shard of --shard-tokens (default 1e9) and one 10x smaller;
the mix takes --shares (default 50e6,200e6) tokens from the big one and the first share from the
small one. Prints time, peak RSS of the process tree and extra disk (work dir, datasets cache and
output, peak while running) for each: work and disk must follow the share, not the shard.

Builds the tiny assets (no download) and a text corpus from the standard library's sources, then:
1. raw ceiling: the tokenizer's batch encoding of exactly the text the stage will read, Rust threads
   on every core, in tokens/s: `tokenizer(texts)` (the ceiling the stage is held to) and, stricter, the Rust
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
import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The tiktoken case's default size: the stage's fixed start-up (~4.5 s: interpreter, datasets +
# transformers + trl imports, exit) is then ~5% of the run, as it is (far less) in a real mix of
# billions of tokens; the ratio "excluding start-up" is printed for any size.
TIKTOKEN_TOKENS = 300e6
# Texts per call of the ceiling's batch encoder (the stage's own in-process batch size).
CEILING_BATCH = 8192
# A fresh interpreter that runs `openseek-cpt data` and reports its start-up and stage times.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import datasets  # what the stage imports before its first token (transformers pulls torch)
from transformers import AutoTokenizer
from trl import pack_dataset
from openseek_cpt.data import stage as data
from openseek_cpt.cli import main
t1 = time.perf_counter()
rc = main(["data", "--recipe", sys.argv[1]])
print(json.dumps({"imports": t1 - t0, "stage": time.perf_counter() - t1}), file=sys.stderr)
sys.exit(rc)
"""


def tiny_assets(workdir: Path) -> Path:
    """The tiny assets in `workdir` (built once, no download); returns the tiny recipe."""
    tiny = REPO / "recipes/tiny/config.yaml"
    if not (workdir / "models/tiny-openseek").is_dir():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for cmd in (["tiny-assets", "--out", "models/tiny"], ["download", "--recipe", str(tiny)]):
            subprocess.run(
                [sys.executable, "-m", "openseek_cpt", *cmd],
                cwd=workdir,
                env=env,
                check=True,
                capture_output=True,
            )
    return tiny


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
    ap.add_argument("--case", choices=("tiny", "tiktoken", "megatron"), default="tiny")
    ap.add_argument("--shard-tokens", type=float, default=1e9, help="megatron case: tokens of the big shard")
    ap.add_argument("--shares", default="50e6,200e6", help="megatron case: tokens the mix takes")
    ap.add_argument(
        "--tokens",
        type=float,
        default=None,
        help=f"approximate tokens in the throughput corpus (default 40e6; tiktoken case {TIKTOKEN_TOKENS:.0e})",
    )
    ap.add_argument("--scale-tokens", type=float, default=8e6, help="tokens in the work-scaling share")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="data.num_proc (default: cores)")
    ap.add_argument("--max-length", type=int, default=256, help="<= the tiny model's 256 positions")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time counts")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.case == "tiktoken":
        return tiktoken_case(args, workdir, load_before)
    if args.case == "megatron":
        return megatron_case(args, workdir, load_before)
    tiny = tiny_assets(workdir)

    import datasets
    from datasets import Dataset
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "models/tiny-openseek"))
    tokenizer.model_max_length = int(1e30)
    chars_per_token = 2.5  # about right for the tiny tokenizer on this text; only sizes the corpora
    texts = corpus(int((args.tokens or 40e6) * chars_per_token))
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


def tiktoken_case(args: argparse.Namespace, workdir: Path, load_before: float) -> None:
    """End-to-end tokens/s with the tiktoken remote-code tokenizer vs its Encoding's batch encoder."""
    import datasets
    from datasets import Dataset
    from transformers import AutoTokenizer

    from openseek_cpt.data.encoder import Encoder
    from openseek_cpt.testing.fixtures import write_qwen_tokenizer

    datasets.disable_progress_bars()
    tok_dir = write_qwen_tokenizer(workdir / "qwen")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    encoding = Encoder(tokenizer).encoding
    tokens = args.tokens or TIKTOKEN_TOKENS
    texts = corpus(int(tokens * 4.1))  # ~4.1 characters per Qwen token on Python source
    Dataset.from_dict({"text": texts}).save_to_disk(str(workdir / "corpus-qwen"))
    cores = os.cpu_count() or 1

    def ceiling() -> tuple[int, float]:
        # In batches of the stage's size: one call over 10^8 tokens would hold them as Python ints (GBs).
        t0, n = time.perf_counter(), 0
        for i in range(0, len(texts), CEILING_BATCH):
            batch = texts[i : i + CEILING_BATCH]
            n += sum(len(x) for x in encoding.encode_ordinary_batch(batch, num_threads=cores))
        return n, time.perf_counter() - t0

    n_tokens, first = ceiling()
    sample = texts[:: max(1, len(texts) // 500)]
    t0 = time.perf_counter()
    reference = tokenizer(sample)["input_ids"]
    call_rate = sum(len(x) for x in reference) / (time.perf_counter() - t0)
    recipe = {
        "assets": {"model_dir": "no-model", "tokenizer_trust_remote_code": True},
        "data": {
            "output_dir": "datasets/bench-qwen",
            "tokenizer_dir": str(tok_dir),
            "max_length": 4096,
            "total_sample_size": int((n_tokens + len(texts)) * 0.97 / 4096),
            "eval_size": 0,
            "num_proc": args.num_proc,
            "read_margin": 0.05,
            "sources": [{"path": "corpus-qwen", "ratio": 1.0, "label": "corpus"}],
        },
    }
    ceilings, walls, stages = [first], [], []
    for k in range(args.repeats):
        if k:
            ceilings.append(ceiling()[1])
        wall, stage, manifest = run_data(workdir, recipe, "qwen")
        walls.append(wall)
        stages.append(stage)
    # the stage's ids are the tokenizer's: each sampled text's ids + eos is a document segment of the rows
    encoder = Encoder(tokenizer)
    encoder.choose_path(sample)
    same = encoder.encode(sample) == [ids + [tokenizer.eos_token_id] for ids in reference]
    raw = n_tokens / min(ceilings)
    read = manifest["totals"]["tokens_read"]
    e2e, inner = read / min(walls), read / min(stages)
    print(
        f"corpus: {len(texts)} documents, {n_tokens / 1e6:.2f} M Qwen tokens, {cores} cores, num_proc "
        f"{args.num_proc}, load (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    print(
        f"tokenizer path taken by the stage: {manifest['tokenizer_path']} ({manifest['tokenizer_path_note']})"
    )
    print(f"tokenizer(texts), one core (sample of {len(sample)}): {call_rate / 1e6:.3f} M tokens/s")
    print(
        f"ceiling, Encoding.encode_ordinary_batch, {cores} threads: {raw / 1e6:.3f} M tokens/s "
        f"(best of {'/'.join(f'{t:.1f}' for t in ceilings)} s)"
    )
    print(
        f"openseek-cpt data end-to-end: {e2e / 1e6:.3f} M tokens/s (best of "
        f"{'/'.join(f'{t:.1f}' for t in walls)} s for {read / 1e6:.2f} M tokens read); "
        f"excluding start-up {inner / 1e6:.3f} M tokens/s"
    )
    print(
        f"ratio end-to-end / ceiling: {e2e / raw:.2f} (target >= 0.8); excluding start-up {inner / raw:.2f}"
    )
    print(f"ids identical to tokenizer(texts) on {len(sample)} sampled documents: {same}")


def megatron_case(args: argparse.Namespace, workdir: Path, load_before: float) -> None:
    """Time, peak RSS and extra disk of a share taken from a big and a 10x smaller Megatron shard."""

    from openseek_cpt.artifacts import megatron_format

    tiny_assets(workdir)
    big_tokens = int(args.shard_tokens)
    shards = {"big": big_tokens, "small": big_tokens // 10}
    (workdir / "shards").mkdir(exist_ok=True)
    for name, n in shards.items():
        prefix = workdir / "shards" / f"{name}_text_document"
        if not Path(f"{prefix}.idx").is_file():
            t0 = time.perf_counter()
            megatron_format.write_sequences(prefix, _random_sequences(n, seed=len(name)), vocab_size=1024)
            print(
                f"wrote {prefix}: {n / 1e6:.0f} M tokens, "
                f"{Path(f'{prefix}.bin').stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s"
            )
    shares = [float(x) for x in args.shares.split(",")]
    cases = [("big", shares[0]), ("small", shares[0])] + [("big", s) for s in shares[1:]]
    results = []
    for shard, share in cases:
        recipe = {
            "assets": {"model_dir": "no-model", "tokenizer_trust_remote_code": False},
            "data": {
                "output_dir": f"datasets/meg-{shard}-{int(share)}",
                "tokenizer_dir": "models/tiny-openseek",
                "max_length": 4096,
                "total_sample_size": int(share / 4096),
                "eval_size": 0,
                "num_proc": args.num_proc,
                "sources": [{"path": f"shards/{shard}_text_document", "ratio": 1.0}],
            },
        }
        results.append((shard, share, *measure_data(workdir, recipe, f"meg-{shard}-{int(share)}")))
    print(
        f"{os.cpu_count()} cores, num_proc {args.num_proc}, load (1 min) before {load_before:.2f}, "
        f"after {os.getloadavg()[0]:.2f}"
    )
    for shard, share, wall, rss, disk_peak, disk_left, manifest in results:
        s = manifest["sources"][0]
        print(
            f"share {share / 1e6:.0f} M tokens of the {shards[shard] / 1e6:.0f} M-token shard: {wall:.1f} s, "
            f"peak RSS {rss / 2**20:.0f} MiB, extra disk peak {disk_peak / 2**20:.0f} MiB, left "
            f"{disk_left / 2**20:.0f} MiB (output + cache), read {s['documents_read']} of "
            f"{s['documents_in_source']} documents"
        )
    (_, _, w_big, r_big, d_big, _, _), (_, _, w_small, r_small, d_small, _, _) = results[:2]
    print(
        f"big / small shard, same {shares[0] / 1e6:.0f} M share: time {w_big / w_small:.2f}x, peak RSS "
        f"{r_big / r_small:.2f}x, extra disk {d_big / d_small:.2f}x (targets <= 1.5x, flat)"
    )
    if len(results) > 2:
        print(
            f"share {shares[1] / 1e6:.0f} M / {shares[0] / 1e6:.0f} M from the big shard: time "
            f"{results[2][2] / w_big:.2f}x, extra disk {results[2][4] / d_big:.2f}x"
        )


def _random_sequences(n_tokens: int, seed: int):
    """Chunks of random token ids (tiny vocab) in documents of 64..2048 tokens, n_tokens in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    done = 0
    while done < n_tokens:
        lengths = rng.integers(64, 2048, size=8192)
        lengths = (
            lengths[np.cumsum(lengths) <= n_tokens - done] if lengths.sum() > n_tokens - done else lengths
        )
        if not len(lengths):
            return
        yield rng.integers(0, 1023, size=int(lengths.sum()), dtype=np.int32), lengths
        done += int(lengths.sum())


def measure_data(workdir: Path, recipe: dict, name: str) -> tuple[float, int, int, int, dict]:
    """(wall s, peak RSS of the process tree, peak extra disk, disk left, manifest) of one data run.

    Extra disk = everything under the workdir except the shards and assets, plus a private datasets
    cache (HF_DATASETS_CACHE in the workdir), polled every 0.2 s while the stage runs.
    """
    import psutil

    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cache = workdir / "hf-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    shutil.rmtree(workdir / recipe["data"]["output_dir"], ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    skip = {workdir / "shards", workdir / "models"}

    def extra_disk() -> int:
        total = 0
        for root, dirs, files in os.walk(workdir):
            dirs[:] = [d for d in dirs if Path(root, d) not in skip]
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
        return total

    before = extra_disk()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openseek_cpt", "data", "--recipe", str(path)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = psutil.Process(proc.pid)
    peak_rss, peak_disk = 0, 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak_rss, peak_disk = max(peak_rss, rss), max(peak_disk, extra_disk() - before)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"openseek-cpt data failed:\n{err[-3000:]}")
    left = extra_disk() - before
    manifest = json.loads((workdir / recipe["data"]["output_dir"] / "manifest.json").read_text())
    shutil.rmtree(workdir / recipe["data"]["output_dir"], ignore_errors=True)
    return wall, peak_rss, max(peak_disk, left), left, manifest


if __name__ == "__main__":
    main()
