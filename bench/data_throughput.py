"""Throughput of `openseek-cpt data` against GigaToken's own batch encoder, and its work scaling.

    python bench/data_throughput.py [--case tiny|tiktoken|tokenizer-json|qwen|megatron] [--tokens T]
                                    [--scale-tokens 8e6] [--num-proc N] [--repeats 3] [--workdir DIR]

The ceiling is the tokenizer the stage runs once it has checked the ids: GigaToken's `encode_batch`
(PyPI `gigatoken`, Rust BPE) over exactly the texts the stage reads, in batches of the stage's size
(`prepare.IN_PROCESS_BATCH` documents), on GigaToken's own thread pool, which the stage uses as it
is: every core (`RAYON_NUM_THREADS`, if set, sizes it in both). Tokens are counted without the eos
the stage appends, in every figure.

--case tiktoken / tokenizer-json / qwen (both, interleaved): a corpus of about --tokens (default
3e8) Qwen tokens of real text (the standard library's sources; built once under --workdir as a
`save_to_disk` directory), tokenized by OpenSeek's kind of tokenizer (remote code over tiktoken,
151,851 ids: `fixtures.write_qwen_tokenizer`) or by an HF `tokenizer.json` byte-level BPE of the same
ids (`fixtures.write_qwen_tokenizer_json`). For each, interleaved, best of --repeats:
1. ceiling: GigaToken's `encode_batch` of the same texts (`Tokenizer.from_tiktoken(ranks,
   pretokenizer="qwen2")`, resp. `Tokenizer(tokenizer.json)`: as a user of GigaToken loads them);
2. encode step: the stage's in-process encode call, `Encoder.documents` (text checks, NFC where the
   tokenizer normalizes, GigaToken, eos), on the same batches of rows as the stage takes them
   (`DatasetRows.take` of randomly chosen documents, joined into one buffer: that reading is left
   out, as the ceiling's texts are Python strings made beforehand);
3. end-to-end: `openseek-cpt data` in a fresh interpreter on a one-source mix whose share needs the
   whole corpus (max_length 4096, bfd_split), tokens/s of its wall time, its CPU-s, and "excluding
   start-up" (the stage's own time inside the child, after its imports);
and the ratios encode step / ceiling and end-to-end / ceiling (target >= 0.8), from the best times
and as the median of each repeat's own ratio; the path the stage took (its manifest) and its ids
against `tokenizer(texts)` on a sample.
--case tiny: the same ceiling and end-to-end on the tiny tokenizer (--tokens default 4e7), then the
work scaling: a mix over --scale-tokens, then the same mix with a source 10x larger than its share;
the time ratio must stay < 1.5 (the stage tokenizes only what the share needs).
--case megatron: a Megatron `.bin/.idx` shard of --shard-tokens (default 1e9) and one 10x smaller;
the mix takes --shares (default 50e6,200e6) tokens from the big one and the first share from the
small one. Prints time, peak RSS of the process tree and extra disk (work dir, datasets cache and
output, peak while running) for each: work and disk must follow the share, not the shard.
CPU seconds are the stable figure on a shared machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/data_throughput.py` from a checkout, nothing installed
# The Qwen cases' default size: the stage's fixed start-up (~5 s: interpreter, datasets +
# transformers imports, loading the tokenizer and GigaToken's twin of it, exit) is then a few % of
# the run, as it is (far less) in a real mix of billions of tokens; "excluding start-up" is printed too.
QWEN_TOKENS = 300e6
CHARS_PER_QWEN_TOKEN = 4.1  # on Python source; only sizes the corpus
# A fresh interpreter that runs `openseek-cpt data` and reports its start-up and stage times.
CHILD = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import datasets  # what the stage imports before its first token (transformers pulls torch)
from transformers import AutoTokenizer
from trl import pack_dataset
from openseek_cpt.data import stage as data
from openseek_cpt.cli import main
t1, c1 = time.perf_counter(), time.process_time()
rc = main(["data", "--recipe", sys.argv[1]])
timing = {"imports": t1 - t0, "stage": time.perf_counter() - t1, "stage_cpu": time.process_time() - c1}
print(json.dumps(timing), file=sys.stderr)
sys.exit(rc)
"""


def threads() -> str:
    """GigaToken's thread pool (rayon's global pool) in this process and in the stage's."""
    cores = len(os.sched_getaffinity(0))
    return os.environ.get("RAYON_NUM_THREADS") or f"{cores} (every core)"


def ceiling(giga_tokenizer, batches: list[list[str]]) -> tuple[int, float, float]:
    """(tokens, wall s, CPU s of this process) of GigaToken's encode_batch over `batches`."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(giga_tokenizer.encode_batch(batch).layout.content) for batch in batches)
    return n, time.perf_counter() - t0, time.process_time() - c0


def encode_step(encoder, tables: list) -> tuple[int, float, float]:
    """(tokens without eos, wall s, CPU s) of the stage's in-process encode call over `tables`."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for table in tables:
        _, lengths, _, _ = encoder.documents(table, "text", "text", None)
        n += int(lengths.sum()) - len(lengths)  # one eos a document
    return n, time.perf_counter() - t0, time.process_time() - c0


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


def run_data(workdir: Path, recipe: dict, name: str) -> tuple[float, float, dict, float]:
    """(wall seconds of the child, seconds of the stage inside it, manifest, CPU seconds of the child)."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the stage's own default
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], cwd=workdir, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if r.returncode != 0:
        sys.exit(f"openseek-cpt data failed:\n{r.stderr[-3000:]}")
    timing = json.loads(r.stderr.strip().splitlines()[-1])
    manifest = json.loads((workdir / recipe["data"]["output_dir"] / "manifest.json").read_text())
    return wall, timing["stage"], manifest, cpu


def text_tokens(manifest: dict) -> int:
    """Tokens the stage read, without the eos it appended to each (non-empty) document."""
    t = manifest["totals"]
    return t["tokens_read"] - (t["documents_read"] - t["documents_empty"])


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
    ap.add_argument("--case", choices=("tiny", *QWEN_CASES, "megatron"), default="tiny")
    ap.add_argument("--shard-tokens", type=float, default=1e9, help="megatron case: tokens of the big shard")
    ap.add_argument("--shares", default="50e6,200e6", help="megatron case: tokens the mix takes")
    ap.add_argument(
        "--tokens",
        type=float,
        default=None,
        help=f"approximate tokens in the throughput corpus (default 40e6; Qwen cases {QWEN_TOKENS:.0e})",
    )
    ap.add_argument("--scale-tokens", type=float, default=8e6, help="tokens in the work-scaling share")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="data.num_proc (default: cores)")
    ap.add_argument("--max-length", type=int, default=256, help="<= the tiny model's 256 positions")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time counts")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.case in QWEN_CASES:
        return qwen_case(args, workdir, load_before, QWEN_CASES[args.case])
    if args.case == "megatron":
        return megatron_case(args, workdir, load_before[0])
    tiny = tiny_assets(workdir)

    import datasets
    import gigatoken
    from datasets import Dataset

    from openseek_cpt.data.prepare import IN_PROCESS_BATCH

    datasets.disable_progress_bars()
    giga_tokenizer = gigatoken.Tokenizer(str(workdir / "models/tiny-openseek/tokenizer.json"))
    chars_per_token = 2.5  # about right for the tiny tokenizer on this text; only sizes the corpora
    texts = corpus(int((args.tokens or 40e6) * chars_per_token))
    small = corpus(int(args.scale_tokens * chars_per_token))
    Dataset.from_dict({"text": texts}).save_to_disk(str(workdir / "corpus"))
    Dataset.from_dict({"text": small}).save_to_disk(str(workdir / "small"))
    Dataset.from_dict({"text": small * 10}).save_to_disk(str(workdir / "small10x"))
    batches = [texts[i : i + IN_PROCESS_BATCH] for i in range(0, len(texts), IN_PROCESS_BATCH)]
    n_tokens, first, first_cpu = ceiling(giga_tokenizer, batches)
    n_small = ceiling(giga_tokenizer, [small])[0]
    base = mix("corpus", "datasets/bench", n_tokens, len(texts), args, tiny)
    # 3. work scaling: the same small mix, then its source 10x larger than its share
    scale = mix("small", "datasets/bench-small", n_small, len(small), args, tiny)
    big = mix("small10x", "datasets/bench-small10x", n_small, len(small), args, tiny)
    big["data"]["total_sample_size"] = scale["data"]["total_sample_size"]

    # Interleaved repeats, best time of each: the machine may be shared (min is the least noisy estimate).
    ceilings, walls, stages, walls_s, walls10 = [first], [], [], [], []
    for k in range(args.repeats):
        if k:
            ceilings.append(ceiling(giga_tokenizer, batches)[1])
        wall, stage, manifest, _ = run_data(workdir, base, "e2e")
        walls.append(wall)
        stages.append(stage)
        walls_s.append(run_data(workdir, scale, "small")[0])
        wall10, _, manifest10, _ = run_data(workdir, big, "x10")
        walls10.append(wall10)
    raw = n_tokens / min(ceilings)
    wall, stage, wall_s, wall10 = min(walls), min(stages), min(walls_s), min(walls10)
    startup = walls[walls.index(wall)] - stages[walls.index(wall)]  # of the same (best) run
    read = text_tokens(manifest)
    e2e, inner = read / wall, read / stage
    s10 = manifest10["sources"][0]
    print(
        f"corpus: {len(texts)} documents, {n_tokens / 1e6:.2f} M tokens, {os.cpu_count()} cores, "
        f"num_proc {args.num_proc}, max_length {args.max_length}, GigaToken threads {threads()}, load "
        f"(1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    print(f"tokenizer path taken by the stage: {manifest['tokenizer_path']}")
    print(f"ceiling, GigaToken encode_batch: {raw / 1e6:.3f} M tokens/s (best of {fmt(ceilings)} s)")
    print(
        f"openseek-cpt data end-to-end:     {e2e / 1e6:.3f} M tokens/s (best of {fmt(walls)} s for "
        f"{read / 1e6:.2f} M tokens read, {manifest['totals']['train_rows']} rows, "
        f"padding {manifest['padding_fraction']:.2%}; start-up (interpreter, imports, exit) {startup:.1f} s)"
    )
    print(
        f"openseek-cpt data excluding start-up: {inner / 1e6:.3f} M tokens/s (stage alone, best of {fmt(stages)} s)"
    )
    print(
        f"ratio end-to-end / ceiling: {e2e / raw:.2f} (target >= 0.8); excluding start-up {inner / raw:.2f}"
    )
    print(
        f"work scaling ({n_small / 1e6:.2f} M token share): source 10x its share: {wall10:.1f} s "
        f"(best of {fmt(walls10)}) vs {wall_s:.1f} s (best of {fmt(walls_s)}) = {wall10 / wall_s:.2f}x "
        f"(target < 1.5x); read {s10['documents_read']} of {s10['documents_in_source']} documents"
    )


def fmt(times: list[float]) -> str:
    return "/".join(f"{t:.1f}" for t in times)


# The Qwen cases: which tokenizers of the same ids each runs.
QWEN_CASES = {
    "tiktoken": ("tiktoken",),
    "tokenizer-json": ("tokenizer-json",),
    "qwen": ("tiktoken", "tokenizer-json"),
}


def qwen_case(args: argparse.Namespace, workdir: Path, load_before: tuple, kinds: tuple[str, ...]) -> None:
    """Ceiling, encode step and end-to-end tokens/s with the Qwen ids' tokenizer(s), interleaved."""
    import datasets
    import gigatoken
    import numpy as np
    from datasets import Dataset
    from transformers import AutoTokenizer

    from openseek_cpt.data.encoder import Encoder
    from openseek_cpt.data.prepare import ESTIMATE_DOCS, IN_PROCESS_BATCH, SAMPLE_CHARS
    from openseek_cpt.data.rows import DatasetRows
    from openseek_cpt.testing.fixtures import write_qwen_tokenizer, write_qwen_tokenizer_json

    datasets.disable_progress_bars()
    tok_dir = workdir / "qwen"
    if not (tok_dir / "tokenizer_config.json").is_file():
        write_qwen_tokenizer(tok_dir)
    tiktoken_tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    json_dir = write_qwen_tokenizer_json(tiktoken_tokenizer, workdir / "qwen-hf")
    tokens = args.tokens or QWEN_TOKENS
    corpus_dir = workdir / f"corpus-qwen-{tokens:.0e}"
    if not (corpus_dir / "state.json").is_file():  # built once
        tmp = workdir / f"{corpus_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_dict({"text": corpus(int(tokens * CHARS_PER_QWEN_TOKEN))}).save_to_disk(str(tmp))
        tmp.replace(corpus_dir)
    # The batches of rows the stage's in-process encoding takes: IN_PROCESS_BATCH random documents each.
    rows = DatasetRows(datasets.load_from_disk(str(corpus_dir)))
    order = np.random.default_rng(0).permutation(len(rows))
    tables = [
        rows.take(order[i : i + IN_PROCESS_BATCH], ["text"]) for i in range(0, len(rows), IN_PROCESS_BATCH)
    ]
    batches = [table.column("text").to_pylist() for table in tables]
    sample = [t for batch in batches for t in batch][:: max(1, len(rows) // 500)]

    runs = {}
    for kind in kinds:
        if kind == "tiktoken":  # as GigaToken loads a tiktoken rank file (the scheme of the Qwen split)
            tokenizer, tokenizer_dir = tiktoken_tokenizer, tok_dir
            giga_tokenizer = gigatoken.Tokenizer.from_tiktoken(
                tokenizer.vocab_file, pretokenizer="qwen2", special_tokens={}
            )
        else:  # as Megatron's --use-gigatoken route loads a tokenizer.json
            tokenizer, tokenizer_dir = AutoTokenizer.from_pretrained(str(json_dir)), json_dir
            giga_tokenizer = gigatoken.Tokenizer(str(json_dir / "tokenizer.json"))
        encoder = Encoder(tokenizer)  # the stage's, checked on its estimate sample as the stage does
        encoder.choose_path([t[:SAMPLE_CHARS] for t in batches[0][:ESTIMATE_DOCS]])
        reference = tokenizer(sample)["input_ids"]
        same = encoder.encode(sample) == [ids + [tokenizer.eos_token_id] for ids in reference]
        runs[kind] = {
            "tokenizer": tokenizer,
            "dir": tokenizer_dir,
            "giga": giga_tokenizer,
            "encoder": encoder,
            "same": same,
            "ceiling": [],
            "step": [],
            "e2e": [],
        }

    for k in range(args.repeats):
        for kind, run in runs.items():
            n, wall, cpu = ceiling(run["giga"], batches)
            run["tokens"] = n
            run["ceiling"].append((wall, cpu))
            n_step, wall, cpu = encode_step(run["encoder"], tables)
            run["step_tokens"] = n_step
            run["step"].append((wall, cpu))
            recipe = {
                "assets": {"model_dir": "no-model", "tokenizer_trust_remote_code": kind == "tiktoken"},
                "data": {
                    "output_dir": f"datasets/bench-{kind}",
                    "tokenizer_dir": str(run["dir"]),
                    "max_length": 4096,
                    "packing": "bfd_split",
                    # the share needs the whole corpus: ~ its tokens (eos included) / 4096 rows
                    "total_sample_size": int((n + len(rows)) * 0.97 / 4096),
                    "eval_size": 0,
                    "num_proc": args.num_proc,
                    "read_margin": 0.05,
                    "sources": [{"path": corpus_dir.name, "ratio": 1.0, "label": "corpus"}],
                },
            }
            wall, stage, run["manifest"], cpu = run_data(workdir, recipe, f"bench-{kind}")
            run["e2e"].append((wall, cpu, stage))
            print(
                f"repeat {k + 1}/{args.repeats} {kind}: ceiling {run['ceiling'][-1][0]:.1f} s, encode step "
                f"{run['step'][-1][0]:.1f} s, end-to-end {wall:.1f} s",
                flush=True,
            )

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    print(
        f"\ncorpus {corpus_dir}: {len(rows):,} documents; {os.cpu_count()} cores ({cpu_model}); num_proc "
        f"{args.num_proc}; GigaToken threads {threads()} (bench process and stage alike); load 1/5/15 min "
        f"before {'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for kind, run in runs.items():
        manifest, n = run["manifest"], run["tokens"]
        read = text_tokens(manifest)
        work = {"ceiling": n, "step": run["step_tokens"], "e2e": read}
        best = {m: min(run[m], key=lambda x: x[0]) for m in work}
        rate = {m: work[m] / best[m][0] for m in work}
        per_cpu = {m: work[m] / min(x[1] for x in run[m]) for m in work}
        inner = read / min(x[2] for x in run["e2e"])

        def median_ratio(m: str, run=run, work=work) -> float:
            """The median over repeats of each one's tokens/s over its own ceiling's."""
            pairs = zip(run["ceiling"], run[m], strict=True)
            return statistics.median((work[m] / x[0]) / (work["ceiling"] / c[0]) for c, x in pairs)

        print(f"\n[{kind}] {run['dir']}: {n / 1e6:.2f} M tokens (without eos)")
        print(
            f"  stage's tokenizer path: {manifest['tokenizer_path']} ({manifest['tokenizer_path_note']})"
            + ("" if manifest["tokenizer_path"] == "gigatoken" else "  <-- NOT GIGATOKEN")
        )
        print(
            f"  tokens: ceiling {n:,}, encode step {run['step_tokens']:,}"
            + ("" if n == run["step_tokens"] else "  <-- DIFFER")
            + f"; end-to-end read {read:,} ({read / n:.2%}: the documents its share needed)"
        )
        print(f"  ids == tokenizer(texts) + eos on {len(sample)} sampled documents: {run['same']}")
        for m, label in (
            ("ceiling", "ceiling, GigaToken encode_batch"),
            ("step", "encode step, Encoder.documents"),
            ("e2e", "end-to-end, openseek-cpt data"),
        ):
            print(
                f"  {label:33s} {rate[m] / 1e6:7.3f} M tokens/s, {per_cpu[m] / 1e6:7.3f} M tokens per CPU-s "
                f"(wall {fmt([x[0] for x in run[m]])} s, CPU {fmt([x[1] for x in run[m]])} s)"
            )
        print(f"  end-to-end excluding start-up (the stage inside the child): {inner / 1e6:.3f} M tokens/s")
        print(
            f"  encode step / ceiling: {rate['step'] / rate['ceiling']:.2f} tokens/s (median of repeats "
            f"{median_ratio('step'):.2f}), {per_cpu['step'] / per_cpu['ceiling']:.2f} per CPU-s (target >= 0.8)"
        )
        print(
            f"  end-to-end / ceiling:  {rate['e2e'] / rate['ceiling']:.2f} tokens/s (median of repeats "
            f"{median_ratio('e2e'):.2f}), {per_cpu['e2e'] / per_cpu['ceiling']:.2f} per CPU-s, excluding "
            f"start-up {inner / rate['ceiling']:.2f} (target >= 0.8)"
        )


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
