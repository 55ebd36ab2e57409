"""`openseek-cpt STAGE --recipe PATH [--set KEY=VALUE ...]`: the only module that knows every stage.

Exit codes: 0 success, 2 bad input (usage, recipe, data: one line, no traceback), 1 anything else.
Stages are imported lazily so `--help` and recipe errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from openseek_cpt import logs, rank_exit
from openseek_cpt.config import Recipe, load_recipe
from openseek_cpt.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError


def _recipe(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)


def _training_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe, its train.args also built into TrainingArguments (`TrainConfig.check_accepted`)."""
    recipe = _recipe(args)
    recipe.train.check_accepted()
    return recipe


def cmd_download(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from openseek_cpt import download

    download.run(**recipe.stage_args("download"))
    return EXIT_OK


def cmd_tiny_assets(args: argparse.Namespace) -> int:
    from openseek_cpt.testing import fixtures as tiny_assets

    hub = tiny_assets.build_tiny_hub(Path(args.out) / "hub" / "tiny-openseek", seed=args.seed)
    sources = tiny_assets.build_tiny_sources(Path(args.out) / "sources", hub)
    log = logs.get_logger("tiny-assets")
    log.info(f"model + tokenizer: {hub}")
    log.info(f"sources: {sources}")
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from openseek_cpt.data import stage as data

    data.run(**recipe.stage_args("data"))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _training_recipe(args)
    from openseek_cpt.train import stage as train

    train.run(**recipe.stage_args("train"))
    return EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    from openseek_cpt import launcher

    return launcher.launch_train(args.recipe, args.overrides, nproc=args.nproc)


def cmd_soup(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    # The merge makes no BLAS call; the OpenBLAS threads numpy starts at import poll for work on
    # the cores the merge keeps busy, taking CPU from it. Set before numpy's first import.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from openseek_cpt.soup import stage as soup

    soup.run(**recipe.stage_args("soup"))
    return EXIT_OK


def cmd_tiny(args: argparse.Namespace) -> int:
    from openseek_cpt import tiny

    tiny.run(args.recipe, args.overrides, workdir=args.workdir)
    return EXIT_OK


def cmd_recipe(args: argparse.Namespace) -> int:
    import yaml

    from openseek_cpt.recipe import keys

    if args.markdown:
        print(keys.keys_markdown(Recipe))
        return EXIT_OK
    loaded = _training_recipe(args) if args.recipe or args.overrides else None
    if args.keys:
        print(keys.keys_text(Recipe, loaded))
    else:
        print(yaml.safe_dump((loaded or load_recipe(None)).to_dict(), sort_keys=False), end="")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from openseek_cpt.artifacts import checkpoints, provenance

    damaged = False  # artifact or checkpoint alike: 1 = something differs, 2 = could not check
    for directory in args.dirs:
        verify_status = (
            checkpoints.verify_status
            if checkpoints.is_checkpoint_dir(directory)
            else provenance.verify_status
        )
        status, lines = verify_status(directory)
        print(f"{directory}: {status}")
        for line in lines:
            print(f"  {line}")
        damaged |= status == "DAMAGED"
    return EXIT_FAILURE if damaged else EXIT_OK


def cmd_export_megatron(args: argparse.Namespace) -> int:
    from openseek_cpt.export.megatron import export_megatron

    export_megatron(args.dataset_dir, args.prefix, split=args.split)
    return EXIT_OK


def cmd_export_mindrecord(args: argparse.Namespace) -> int:
    from openseek_cpt.export.mindrecord import export_mindrecord

    export_mindrecord(args.dataset_dir, args.path, split=args.split)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    recipe = _recipe(args) if args.recipe or args.overrides else None
    from openseek_cpt import doctor

    return doctor.run(recipe, allow_cpu=args.allow_cpu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openseek-cpt", description="Continued pretraining: download -> data -> train -> soup."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    def stage(name: str, func: Callable[[argparse.Namespace], int], help: str, recipe_required=True):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--recipe", required=recipe_required, help="recipe YAML (e.g. recipes/tiny/config.yaml)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe key, e.g. --set data.max_length=2048 (repeatable)",
        )
        p.set_defaults(func=func)
        return p

    stage("download", cmd_download, "save base model + tokenizer to assets.model_dir")
    stage("data", cmd_data, "mix, tokenize, pack and sample the sources into data.output_dir")
    stage("train", cmd_train, "train in this process (one rank); use `launch` or `make train` for many")
    p = stage("launch", cmd_launch, "start `train` under accelerate launch with the world size Slurm gives")
    p.add_argument("--nproc", type=int, default=None, help="processes on this node (default: GPUs, or 1)")
    stage("soup", cmd_soup, "average the base model and the checkpoints into soup.output_dir")
    p = stage("tiny", cmd_tiny, "run the whole pipeline on the tiny recipe on a CPU", recipe_required=False)
    p.add_argument("--workdir", default=".", help="directory for models/, datasets/, runs/ (default: .)")

    p = stage("recipe", cmd_recipe, "print a recipe as loaded (checked), or its keys", recipe_required=False)
    p.add_argument("--keys", action="store_true", help="every key: type, default (or value), doc")
    p.add_argument("--markdown", action="store_true", help="the keys as docs/recipe.md's markdown table")

    p = stage(
        "doctor",
        cmd_doctor,
        "check this node: GPU, driver vs CUDA 12, bf16, the recipe's kernels, NCCL (exit 0/1)",
        recipe_required=False,
    )
    p.add_argument("--allow-cpu", action="store_true", help="no GPU is a warning, not a failure")

    p = sub.add_parser("tiny-assets", help="build the tiny tokenizer, model and sources (no download)")
    p.add_argument("--out", default="models/tiny", help="output directory (default: models/tiny)")
    p.add_argument("--seed", type=int, default=233)
    p.set_defaults(func=cmd_tiny_assets)

    p = sub.add_parser("verify", help="recompute fingerprints of artifact and checkpoint directories")
    p.add_argument(
        "dirs", nargs="+", help="artifact directories (with provenance.json) or checkpoint-N directories"
    )
    p.set_defaults(func=cmd_verify)

    for name, func, target in (
        ("export-megatron", cmd_export_megatron, "prefix"),
        ("export-mindrecord", cmd_export_mindrecord, "path"),
    ):
        p = sub.add_parser(name, help=f"write a prepared dataset as {name.split('-')[1]} files")
        p.add_argument("dataset_dir", help="prepared dataset (output of `data`)")
        p.add_argument(
            target, help="output " + ("PREFIX (writes PREFIX.bin/.idx)" if target == "prefix" else "file")
        )
        p.add_argument("--split", default="train", help="split to export (default: train)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup()
    code = _run(args)
    if args.command == "train":
        rank_exit.end_distributed_rank(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or EXIT_OK)
    except BaseException as exc:
        close_progress_bars()  # else their last refresh prints after the error, at interpreter exit
        if isinstance(exc, UserError):
            return _fail(args, EXIT_USER_ERROR, f"error: {exc}")
        if isinstance(exc, Preempted):
            return _fail(args, EXIT_PREEMPTED, f"{exc}; requeue the job to resume")
        if isinstance(exc, KeyboardInterrupt):
            print(f"openseek-cpt {args.command}: interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, Exception) and is_disk_full(exc):
            return _fail(args, EXIT_USER_ERROR, f"error: {disk_full_message(exc, args)}")
        if isinstance(exc, Exception) and (lost := peer_lost(exc)):
            # Not left for the launcher: the rank that is gone is the cause, and the launcher names it.
            print(
                f"openseek-cpt {args.command}: error: another rank is gone ({lost}); stopping",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        raise


def close_progress_bars() -> None:
    """Close every open tqdm bar (the Trainer's, a writer's) so that nothing prints after our line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    """Print the one line; a rank under `launch` also leaves it for the launcher to print last."""
    line = f"openseek-cpt {args.command}: {message}"
    print(line, file=sys.stderr)
    rank_exit.leave_error(code, line)
    return code


# How a full disk or quota reaches us: an OSError from Python's own I/O, or only as text from the
# Rust and C++ writers (safetensors: "os error 28"; torch.save: "PytorchStreamWriter failed writing file").
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException | None) -> bool:
    """True when `exc` (or what it was raised from) says the disk or the quota is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# How gloo and NCCL report a collective whose peer died (killed, crashed): the peer is the story.
PEER_LOST_TEXT = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def peer_lost(exc: BaseException | None) -> str | None:
    """The words by which `exc` (or its cause) says another rank of this distributed run is gone."""
    if logs.rank_and_world()[1] <= 1:
        return None
    while exc is not None:
        if found := next((text for text in PEER_LOST_TEXT if text in str(exc)), None):
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def output_of(args: argparse.Namespace) -> Path | None:
    """Where the command writes: its output argument, or the recipe's output of its stage."""
    for name in ("out", "prefix", "path", "workdir"):
        if getattr(args, name, None):
            return Path(getattr(args, name))
    fields = {"download": "assets.model_dir", "data": "data.output_dir", "train": "train.output_dir",
              "launch": "train.output_dir", "soup": "soup.output_dir"}  # fmt: skip
    if args.command not in fields or not getattr(args, "recipe", None):
        return None
    try:
        section, key = fields[args.command].split(".")
        return Path(getattr(getattr(_recipe(args), section), key))
    except UserError:
        return None


def disk_full_message(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for a full disk or quota: the path, what is free there now, and the fix. The stage's
    work in progress keeps its temp name, so nothing half-written looks complete."""
    path = Path(getattr(exc, "filename", None) or output_of(args) or ".").absolute()
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    return (
        f"no space left on the device (or the quota) writing {path} ({free / 2**20:.0f} MiB free there "
        "now); free space or point the output elsewhere, then rerun (the stage sweeps its leftovers)"
    )


if __name__ == "__main__":
    sys.exit(main())
