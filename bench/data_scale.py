"""`openseek-cpt data` at scale against Megatron-LM's preprocessing tools, on the same jsonl and ids.

    python bench/data_scale.py [--tokens 300e6] [--workdir DIR] [--num-proc N]
                               [--megatron-dir DIR --megatron-python PY] [--classic | --classic-tokens T]

Builds once (cached under --workdir, default /tmp/bench-data-scale):
- a jsonl of about --tokens Qwen tokens of real text: the CPython standard library's sources cut into
  1-8k character pieces (`data_throughput.corpus`), grouped into documents of 1 to 12 pieces (a few
  longer than max_length, which bfd_split cuts) and shuffled with a fixed seed;
- OpenSeek's kind of tokenizer (remote code over tiktoken, the Qwen ranks, 151,851 ids:
  `fixtures.write_qwen_tokenizer`) and, for Megatron, a `tokenizer.json` of the SAME ids made by
  transformers' `TikTokenConverter` from the Qwen ranks with the tokenizer's split pattern, its 208
  special tokens and an NFC normalizer (`fixtures.write_qwen_tokenizer_json`). Its ids are checked
  against tiktoken's on a sample of the corpus and on a few hard strings: the bench stops if one differs.

Then runs, one after another, each in a child with HOME (and TMPDIR) set to an empty directory of its
own and no HF_HOME / HF_DATASETS_CACHE, so every cache a tool writes by default is counted and seen:
(a) our stage, `openseek-cpt data`, treated as a black box: one source (the jsonl), ratio 1.0,
    max_length 4096, packing bfd_split, total_sample_size ~ the corpus' tokens / 4096 (the share
    needs the whole corpus), num_proc = cores;
(b) Megatron-LM's `tools/preprocess_data_fast.py` (GigaToken), `--tokenizer-type HuggingFaceTokenizer
    --use-gigatoken --append-eod` on the converted tokenizer directory, when --megatron-dir is given;
(c) with --classic (or --classic-tokens T: the first documents of the jsonl, about T tokens,
    extrapolated), Megatron's classic `tools/preprocess_data.py` with the same tokenizer,
    `--workers` = cores (~10x slower than (b)).
For each it prints wall s, CPU s (user+sys of the whole process tree: RUSAGE_CHILDREN delta, which
counts every descendant its parent waited for), tokens/s, peak anonymous RSS of the process tree
(RssAnon of /proc/<pid>/status summed over the tree, every 0.1 s), peak extra disk (the tool's run
directory: output, work files, its HOME with any datasets cache, its TMPDIR; walked every 0.2 s)
divided by the final output's size, the files left under its HOME, and the extrapolation to the real
job (30.7 B tokens: time, CPU, disk); then ours / Megatron-fast for CPU s and wall, and the tokens
each read (our manifest's totals.tokens_read vs the tokens in Megatron's .idx, eod included).

Megatron setup (not part of this project; nothing of it is committed here). Megatron-LM's tools need
Python 3.12 (`typing.override`) and import torch (and triton on some paths):

    python3.12 -m venv /work/megatron-venv    # e.g. /root/.pyenv/versions/3.12.1/bin/python
    /work/megatron-venv/bin/pip install gigatoken megatron-core transformers numpy torch triton
    git clone --depth 1 https://github.com/NVIDIA/Megatron-LM /work/megatron-lm   # or: git archive HEAD tools megatron
    python bench/data_scale.py --megatron-dir /work/megatron-lm --megatron-python /work/megatron-venv/bin/python

The bench puts the checkout's own `megatron/` first (PYTHONPATH: the tools only append it to
sys.path, after the pip `megatron-core`, whose 0.19.2 lacks `--use-gigatoken`); the pip package only
brings the dependencies (PyPI's newest for Python 3.11, 0.16.1, also lacks `add_documents`). Our side runs with this
interpreter (`PYTHONPATH=<checkout> /path/to/.venv/bin/python bench/data_scale.py ...`).
CPU seconds are the stable figure on a shared machine; wall time moves with the load printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/data_scale.py` from a checkout, nothing installed

from bench.data_throughput import corpus  # noqa: E402

REAL_JOB_TOKENS = 30.7e9  # OpenSeek-Pretrain-30B: 7.5 M rows x 4096 tokens
MAX_LENGTH = 4096
CHARS_PER_TOKEN = 4.1  # Qwen tokens on Python source; only sizes the corpus
FRESH_CHARS_PER_TOKEN = 2.3  # the same with its letters permuted (--fresh)
# Pieces per document, cycled over 40 documents: most are one 1-8k character piece (~1.1k tokens on
# average); one in 20 is 6 or 12 pieces (~7k / ~13k tokens, longer than max_length: bfd_split cuts
# them, Megatron keeps them whole) and holds ~a quarter of the tokens.
GROUPS = (1,) * 30 + (2,) * 5 + (3,) * 3 + (6, 12)
HARD_STRINGS = (
    "",
    "e\u0301t\u00e9 caf\u00e9 \u212b \uff21\uff22 \U0001f600\U0001f468\u200d\U0001f469",  # NFC changes some
    "   leading and trailing   \n\n\n\t\r\n  ",
    "12345678901234567890 3.14159 1e-10 0x7fffffff",
    "日本語のテキスト、中文文本，한국어 텍스트 العربية",
    "don't I'LL we've THEY'RE it's",
)
RUSAGE_KEYS = ("ru_utime", "ru_stime")


@dataclass
class Run:
    """What one tool did, as the bench measured it from outside."""

    name: str
    tokens: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    rss_peak: int = 0
    disk_peak: int = 0
    output: int = 0
    home_files: list[str] = field(default_factory=list)
    note: str = ""
    scale: float = 1.0  # corpus tokens / tokens this run read (classic on a prefix)


# ---------------------------------------------------------------- inputs


def fresh_copies(pieces: list[str]) -> list[str]:
    """Each repetition k >= 1 of the standard library with its lowercase letters permuted by its own
    seed: no word repeats across repetitions, as in a corpus whose vocabulary keeps growing (the worst
    case for a tokenizer that caches every pretoken it has seen)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tables: dict[int, dict] = {}
    out = []
    for piece in pieces:
        k = int(piece.rsplit("# copy ", 1)[1])
        if k and k not in tables:
            shuffled = random.Random(k).sample(letters, len(letters))
            tables[k] = str.maketrans(letters, "".join(shuffled))
        out.append(piece.translate(tables[k]) if k else piece)
    return out


def build_corpus(path: Path, n_tokens: float, encoding, fresh: bool = False) -> dict:
    """The jsonl (built once): documents of 1-40 stdlib pieces, shuffled; its exact token count."""
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    pieces = corpus(int(n_tokens * (FRESH_CHARS_PER_TOKEN if fresh else CHARS_PER_TOKEN)))
    if fresh:
        pieces = fresh_copies(pieces)
    docs, i, k = [], 0, 0
    while i < len(pieces):
        n = GROUPS[k % len(GROUPS)]
        docs.append("\n".join(pieces[i : i + n]))
        i, k = i + n, k + 1
    del pieces
    random.Random(233).shuffle(docs)
    tokens, chars = 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for j in range(0, len(docs), 8192):
            batch = docs[j : j + 8192]
            tokens += sum(
                len(x)
                for x in encoding.encode_batch(
                    [unicodedata.normalize("NFC", t) for t in batch],
                    num_threads=os.cpu_count() or 1,
                    allowed_special="all",
                )
            )
            chars += sum(len(t) for t in batch)
            f.writelines(json.dumps({"text": t}) + "\n" for t in batch)
    tmp.replace(path)
    meta = {"documents": len(docs), "tokens": tokens, "chars": chars, "bytes": path.stat().st_size}
    meta_path.write_text(json.dumps(meta) + "\n")
    print(
        f"built {path}: {len(docs)} documents, {tokens / 1e6:.2f} M tokens (no eos), "
        f"{meta['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s"
    )
    return meta


def check_ids(tokenizer, hf_dir: Path, jsonl: Path, n_docs: int, n_sample: int = 2000) -> int:
    """Exit unless tokenizer.json's ids equal tiktoken's (NFC, specials as in the remote code)."""
    from tokenizers import Tokenizer

    encoding = tokenizer.tokenizer
    hf = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    if hf.get_vocab_size() != encoding.n_vocab:
        sys.exit(f"tokenizer.json has {hf.get_vocab_size()} ids, tiktoken {encoding.n_vocab}")
    for token, i in encoding._special_tokens.items():
        if hf.token_to_id(token) != i:
            sys.exit(f"special {token}: tokenizer.json id {hf.token_to_id(token)}, tiktoken {i}")
    step = max(1, n_docs // n_sample)
    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f) if i % step == 0]
    texts += list(HARD_STRINGS)
    texts += [t + "<|endoftext|>" + t[:100] for t in texts[:5]]  # a special in text: a control id in both
    ours = [encoding.encode(unicodedata.normalize("NFC", t), allowed_special="all") for t in texts]
    theirs = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    for t, a, b in zip(texts, ours, theirs, strict=True):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            sys.exit(
                f"tokenizer.json ids differ from tiktoken's at token {k} of {t[:80]!r}: "
                f"{b[k : k + 5]} vs {a[k : k + 5]}"
            )
    return len(texts)


# ---------------------------------------------------------------- measuring a child


def tree_pids(root: int) -> list[int]:
    """root and its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return pids


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def du(path: Path) -> int:
    """Allocated bytes under path (a file or a directory), files vanishing meanwhile ignored."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def run_tool(name: str, cmd: list[str], run_dir: Path, env_extra: dict | None = None) -> Run:
    """Run cmd in run_dir (fresh) with HOME and TMPDIR inside it; measure from outside."""
    shutil.rmtree(run_dir, ignore_errors=True)
    home, tmp = run_dir / "home", run_dir / "tmp"
    home.mkdir(parents=True)
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "TRANSFORMERS_"))}
    env.pop("TOKENIZERS_PARALLELISM", None)
    env.update({"HOME": str(home), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", **(env_extra or {})})
    log = open(run_dir.parent / f"{name}.log", "w")  # noqa: SIM115 - closed below
    before = [getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) for k in RUSAGE_KEYS]
    run = Run(name)
    peak = {"disk": 0}
    done = threading.Event()

    def watch_disk() -> None:
        while not done.is_set():
            peak["disk"] = max(peak["disk"], du(run_dir))
            done.wait(0.2)

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    watcher = threading.Thread(target=watch_disk, daemon=True)
    watcher.start()
    while proc.poll() is None:
        run.rss_peak = max(run.rss_peak, sum(rss_anon(p) for p in tree_pids(proc.pid)))
        time.sleep(0.1)
    run.wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    log.close()
    after = [getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) for k in RUSAGE_KEYS]
    run.cpu = sum(after) - sum(before)
    run.disk_peak = max(peak["disk"], du(run_dir))
    run.home_files = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{name}.log").read_text()[-3000:]
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{tail}")
    print(  # as it finishes: a later tool's failure keeps this
        f"{name}: wall {run.wall:.1f} s, CPU {run.cpu:.1f} s, peak anon RSS {run.rss_peak / 2**30:.2f} GiB, "
        f"peak extra disk {run.disk_peak / 2**30:.2f} GiB, {len(run.home_files)} files under HOME",
        flush=True,
    )
    return run


# ---------------------------------------------------------------- the tools


def ours(workdir: Path, jsonl: Path, tok_dir: Path, meta: dict, num_proc: int) -> tuple[Run, dict]:
    run_dir = workdir / "runs/openseek-cpt"
    recipe = {
        "assets": {"model_dir": "no-model", "tokenizer_trust_remote_code": True},
        "data": {
            "output_dir": "out",
            "tokenizer_dir": str(tok_dir),
            "max_length": MAX_LENGTH,
            "packing": "bfd_split",
            # the share needs the whole corpus: ~ its tokens (eos included) / 4096 rows
            "total_sample_size": int((meta["tokens"] + meta["documents"]) * 0.97 / MAX_LENGTH),
            "eval_size": 0,
            "num_proc": num_proc,
            "read_margin": 0.05,
            "sources": [{"path": str(jsonl), "ratio": 1.0, "label": "corpus"}],
        },
    }
    recipe_path = workdir / "scale-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "openseek_cpt", "data", "--recipe", str(recipe_path)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # the recipe's relative output_dir resolves against the working directory: the run directory
    run = run_tool("openseek-cpt", cmd, run_dir, env)
    manifest = json.loads((run_dir / "out/manifest.json").read_text())
    run.tokens = manifest["totals"]["tokens_read"]
    run.output = du(run_dir / "out")
    src = manifest["sources"][0]
    run.note = (
        f"{manifest['totals']['train_rows']} rows, {src['documents_read']} of {src['documents_in_source']} "
        f"documents read, tokenizer path {manifest.get('tokenizer_path')}"
    )
    return run, manifest


def megatron(
    name: str, script: str, args: argparse.Namespace, workdir: Path, jsonl: Path, hf_dir: Path
) -> Run:
    from openseek_cpt.artifacts import megatron_format

    run_dir = workdir / "runs" / name
    cmd = [
        args.megatron_python,
        str(Path(args.megatron_dir) / "tools" / script),
        *("--input", str(jsonl), "--output-prefix", "out", "--json-keys", "text"),
        *("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir), "--append-eod"),
    ]
    cmd += ["--use-gigatoken"] if script == "preprocess_data_fast.py" else ["--workers", str(args.num_proc)]
    # the checkout's megatron/ first: the tools only append it to sys.path, after the pip megatron-core
    run = run_tool(name, cmd, run_dir, {"PYTHONPATH": str(Path(args.megatron_dir).resolve())})
    prefix = run_dir / "out_text_document"
    index = megatron_format.read_index(prefix)
    run.tokens = int(index.sequence_lengths.sum(dtype="int64"))
    run.output = du(Path(f"{prefix}.bin")) + du(Path(f"{prefix}.idx"))
    run.note = f"{len(index.sequence_lengths)} documents, {index.dtype.__name__} ids"
    return run


def head_jsonl(jsonl: Path, out: Path, fraction: float) -> Path:
    """The first `fraction` of the jsonl's lines (classic on a prefix, extrapolated)."""
    if not out.is_file():
        with open(jsonl, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        with open(jsonl, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if i >= max(1, int(n * fraction)):
                    break
                g.write(line)
    return out


def check_bin_ids(prefix: Path, jsonl: Path, encoding, eod: int, n_sample: int = 500) -> str:
    """Documents of Megatron's .bin (a strided sample) against tiktoken's ids + eod of the same lines."""
    import numpy as np

    from openseek_cpt.artifacts import megatron_format

    index = megatron_format.read_index(prefix)
    tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
    n = len(index.sequence_lengths)
    step, bad, seen = max(1, n // n_sample), 0, 0
    with open(jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % step or i >= n:
                continue
            start = int(index.sequence_pointers[i]) // np.dtype(index.dtype).itemsize
            got = tokens[start : start + int(index.sequence_lengths[i])].tolist()
            text = unicodedata.normalize("NFC", json.loads(line)["text"])
            bad += got != [*encoding.encode(text, allowed_special="all"), eod]
            seen += 1
    return f"{seen - bad} of {seen} sampled documents" + ("" if not bad else f" ({bad} DIFFER)")


# ---------------------------------------------------------------- report


def table(runs: list[Run], corpus_tokens: int) -> str:
    gib = 2**30
    lines = [
        "| tool | tokens read | wall s | CPU s | M tokens/s (wall) | peak anon RSS GiB | peak extra disk GiB "
        "/ output GiB = x | at 30.7 B tokens: wall h, CPU h, peak disk TB | new files under $HOME |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = REAL_JOB_TOKENS / r.tokens
        tops: dict[str, int] = {}
        for f in r.home_files:  # by directory, 3 levels deep: .cache/huggingface/datasets
            top = "/".join(Path(f).parts[:3])
            tops[top] = tops.get(top, 0) + 1
        home = ", ".join(f"{d} ({n} files)" for d, n in sorted(tops.items()))
        label = r.name + (f" (on {r.tokens / 1e6:.1f} M tokens, extrapolated)" if r.scale != 1.0 else "")
        lines.append(
            f"| {label} | {r.tokens:,} | {r.wall:.1f} | {r.cpu:.1f} | {r.tokens / r.wall / 1e6:.3f} | "
            f"{r.rss_peak / gib:.2f} | {r.disk_peak / gib:.2f} / {r.output / gib:.2f} = "
            f"{r.disk_peak / max(r.output, 1):.2f}x | {r.wall * s / 3600:.1f}, {r.cpu * s / 3600:.1f}, "
            f"{r.disk_peak * s / 1e12:.2f} | {home if r.home_files else 'none'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=300e6, help="approximate Qwen tokens in the corpus")
    ap.add_argument("--workdir", default="/tmp/bench-data-scale", help="corpus, tokenizers, runs (kept)")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="data.num_proc / --workers")
    ap.add_argument("--megatron-dir", default=None, help="a Megatron-LM checkout (its tools/ and megatron/)")
    ap.add_argument(
        "--megatron-python", default=None, help="a Python 3.12 with gigatoken, torch, transformers"
    )
    ap.add_argument("--classic", action="store_true", help="also run the classic preprocess_data.py (slow)")
    ap.add_argument(
        "--classic-tokens", type=float, default=None, help="run classic on ~this many tokens, extrapolated"
    )
    ap.add_argument("--skip-ours", action="store_true", help="only the Megatron tools (debugging the setup)")
    ap.add_argument(
        "--fresh", action="store_true", help="no word repeats across the corpus' repetitions (fresh_copies)"
    )
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from openseek_cpt.testing.fixtures import write_qwen_tokenizer, write_qwen_tokenizer_json

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    tok_dir = workdir / "qwen"
    if not (tok_dir / "tokenizer_config.json").is_file():
        write_qwen_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=True)
    encoding, eod = tokenizer.tokenizer, tokenizer.eos_token_id
    jsonl = workdir / f"corpus-{'fresh-' if args.fresh else ''}{args.tokens:.0e}.jsonl"
    meta = build_corpus(jsonl, args.tokens, tokenizer.tokenizer, fresh=args.fresh)
    hf_dir = write_qwen_tokenizer_json(tokenizer, workdir / "qwen-hf")
    checked = check_ids(tokenizer, hf_dir, jsonl, meta["documents"])
    print(f"tokenizer.json ({hf_dir}) ids == tiktoken's on {checked} texts (corpus sample + hard strings)")
    del tokenizer

    runs: list[Run] = []
    manifest = None
    if not args.skip_ours:
        run, manifest = ours(workdir, jsonl, tok_dir, meta, args.num_proc)
        runs.append(run)
    have_megatron = bool(
        args.megatron_dir
        and args.megatron_python
        and (Path(args.megatron_dir) / "tools/preprocess_data_fast.py").is_file()
        and shutil.which(args.megatron_python)
    )
    if not have_megatron:
        print("Megatron-LM not given or not found (--megatron-dir, --megatron-python): skipping (b) and (c)")
    else:
        runs.append(megatron("megatron-fast", "preprocess_data_fast.py", args, workdir, jsonl, hf_dir))
        prefix = workdir / "runs/megatron-fast/out_text_document"
        runs[-1].note += f"; ids == tiktoken's + eod on {check_bin_ids(prefix, jsonl, encoding, eod)}"
        if args.classic or args.classic_tokens:
            fraction = min(1.0, (args.classic_tokens or meta["tokens"]) / meta["tokens"])
            src = (
                jsonl
                if fraction >= 1.0
                else head_jsonl(jsonl, workdir / f"classic-{fraction:.4f}.jsonl", fraction)
            )
            run = megatron("megatron-classic", "preprocess_data.py", args, workdir, src, hf_dir)
            run.scale = 1.0 if fraction >= 1.0 else meta["tokens"] / run.tokens
            prefix = workdir / "runs/megatron-classic/out_text_document"
            run.note += f"; ids == tiktoken's + eod on {check_bin_ids(prefix, src, encoding, eod)}"
            runs.append(run)
    if not runs:
        return

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu_model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    print(
        f"\ncorpus {jsonl}: {meta['documents']:,} documents, {meta['tokens'] / 1e6:.2f} M tokens (without eos), "
        f"{meta['bytes'] / 2**30:.2f} GiB; {os.cpu_count()} cores ({cpu_model}), num_proc/workers "
        f"{args.num_proc}; load 1/5/15 min before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(table(runs, meta["tokens"]))
    if meta["tokens"] < 100e6:
        print("(below ~100 M tokens the start-up, 5-30 s per tool, weighs on the rates and extrapolations)")
    for r in runs:
        print(f"- {r.name}: {r.note}; log {workdir / 'runs' / (r.name + '.log')}")
    by = {r.name: r for r in runs}
    if "openseek-cpt" in by and "megatron-fast" in by:
        a, b = by["openseek-cpt"], by["megatron-fast"]
        print(
            f"\nours / Megatron-fast: CPU s {a.cpu / b.cpu:.2f}x, wall {a.wall / b.wall:.2f}x, "
            f"peak anon RSS {a.rss_peak / b.rss_peak:.2f}x, peak extra disk {a.disk_peak / b.disk_peak:.2f}x"
        )
        same = "equal" if a.tokens == b.tokens else f"DIFFER by {a.tokens - b.tokens:+,}"
        print(
            f"tokens read: ours (manifest totals.tokens_read) {a.tokens:,}; Megatron-fast (.idx, eod "
            f"included) {b.tokens:,}: {same}"
        )
    if "megatron-classic" in by and "megatron-fast" in by:
        c, b = by["megatron-classic"], by["megatron-fast"]
        rate = (c.cpu / c.tokens) / (b.cpu / b.tokens)
        print(f"Megatron classic / fast: CPU s per token {rate:.2f}x; classic read {c.tokens:,} tokens")
    if manifest is not None:
        print(f"ours, tokenizer path note: {manifest.get('tokenizer_path_note')}")


if __name__ == "__main__":
    main()
