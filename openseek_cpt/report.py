"""A run report from the artifacts on disk: loss curves, throughput, the mix, the soup's gain.

Reads only files the stages wrote (TensorBoard event files of the run, the dataset's
manifest.json, the soup's merge_info.json), so it can be re-made at any time and never needs
the stages' code. Writes `report.md` and PNGs next to the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.fileio import read_json
from openseek_cpt.errors import UserError
from openseek_cpt.evaluation import eval_rows, format_eval_table


def write_report(run_dir: str | Path, dataset_dir: str | Path, soup_dir: str | Path | None) -> Path:
    """Write `run_dir/report.md` (+ loss_curves.png, throughput.png); returns the report path."""
    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    scalars = read_scalars(run_dir)
    manifest = read_json(dataset_dir / "manifest.json") or {}
    merge_info = (read_json(Path(soup_dir) / "merge_info.json") or {}) if soup_dir else {}
    evals = {row["name"]: row["loss"] for row in eval_rows(merge_info.get("evaluation") or [])}
    loss_png = plot_losses(scalars, evals, run_dir / "loss_curves.png")
    speed_png = plot_throughput(scalars, run_dir / "throughput.png")
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += _mix_section(manifest)
    lines += _training_section(scalars, loss_png, speed_png)
    lines += _soup_section(merge_info)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard event files, as tag -> [(step, value)], read with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"))
    if not files:
        raise UserError(
            f"report: no TensorBoard event files under {run_dir}; train with report_to: [tensorboard]"
        )
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value  # a resumed run re-logs: last wins
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def plot_losses(
    scalars: dict[str, list[tuple[int, float]]], evals: dict[str, float | None], out: Path
) -> Path:
    """Train and eval loss per step; the base model's eval loss at step 0 and the soup's as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if "train/loss" in scalars:
        ax.plot(*zip(*scalars["train/loss"], strict=True), label="train loss")
    eval_points = list(scalars.get("eval/loss", []))
    if (base := evals.get("base")) is not None:
        eval_points = [(0, base), *eval_points]
    if eval_points:
        ax.plot(*zip(*eval_points, strict=True), marker="o", markersize=4, label="eval loss")
    if evals.get("soup") is not None:
        ax.axhline(
            evals["soup"], linestyle="--", color="tab:green", label=f"soup eval loss ({evals['soup']:.3f})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_throughput(scalars: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    """Global tokens/s per logged step (the first steps include warm-up)."""
    tag = next((t for t in scalars if t.endswith("tokens_per_second")), None)
    if tag is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    ax.plot(*zip(*scalars[tag], strict=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens/s (all processes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _mix_section(manifest: dict[str, Any]) -> list[str]:
    sources = manifest.get("sources", [])
    lines = ["## Data mix (requested vs realized, in sequences)", ""]
    lines += [
        "| source | requested | realized | documents | tokens | dropped | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sources:
        lines.append(
            f"| {s.get('label')} | {_num(s.get('requested_ratio'))} | {_num(s.get('realized_ratio'))} | "
            f"{s.get('documents')} | {s.get('tokens_used')} | {s.get('tokens_dropped')} | {_num(s.get('times_repeated'))} |"
        )
    if "padding_fraction" in manifest:
        lines += ["", f"Padding fraction: {_num(manifest['padding_fraction'])}"]
    return lines + [""]


def _training_section(
    scalars: dict[str, list[tuple[int, float]]], loss_png: Path, speed_png: Path | None
) -> list[str]:
    lines = ["## Training", "", f"![loss curves]({loss_png.name})", ""]
    if speed_png is not None:
        lines += [f"![tokens per second]({speed_png.name})", ""]
    for tag in sorted(scalars):
        points = scalars[tag]
        if any(word in tag for word in ("loss", "tokens_per_s", "mfu", "perplexity", "grad_norm")):
            lines.append(
                f"- `{tag}`: first {_num(points[0][1])} (step {points[0][0]}), last {_num(points[-1][1])} "
                f"(step {points[-1][0]}), {len(points)} points"
            )
    return lines + [""]


def _soup_section(merge_info: dict[str, Any]) -> list[str]:
    evals = merge_info.get("evaluation")
    if not evals:
        return ["## Soup", "", "No evaluation recorded (set soup.evaluate: true)."]
    return [
        "## Soup: eval loss of base, checkpoints and soup",
        "",
        format_eval_table(evals, markdown=True),
        "",
    ]


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)
