"""The `plot` command: a run's (or several runs') metrics.jsonl and summary.json as PNGs (matplotlib, Agg).

layer_test_error.png  test error of each layer's classifier over epochs (the paper's figure); colour = layer,
                      line style = run
block_train_loss.png  each block's training loss over epochs (log scale: the output's loss is scaled by 1-beta)
stage_time.png        each stage's busy, waiting, blocked and sending fractions of its wall time (pipelines only)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError
from pipeline.run.resources import check_writable

LINE_STYLES = ["-", "--", ":", "-."]


@dataclass
class RunRecord:
    """What a plot needs of one run: its label, per-epoch records and summary (empty while a run is unfinished)."""

    label: str
    epochs: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def read_run(run_dir: str, label: str | None = None) -> RunRecord:
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            epochs = [json.loads(line) for line in f if line.strip()]
    except OSError as exc:
        raise ConfigError(f"{run_dir}: no readable metrics.jsonl ({exc.strerror or exc}): give a run's --out folder") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is damaged ({exc})") from None
    if not epochs or not all(isinstance(e, dict) and "layer_test_errors" in e for e in epochs):
        raise ConfigError(f"{path} has no epoch records of this project")
    summary: dict[str, Any] = {}
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        pass  # a run still going: curves, but no stage timings yet
    return RunRecord(label or describe(run_dir, summary), epochs, summary)


def describe(run_dir: str, summary: dict[str, Any]) -> str:
    """A legend label: the folder's name, the learning rule and the stage count."""
    name = os.path.basename(os.path.normpath(run_dir))
    config = summary.get("config", {})
    loss = config.get("loss", {}).get("loss")
    stages = summary.get("stages")
    details = ", ".join(x for x in (loss, f"K={stages}" if stages else None) if x)
    return f"{name} ({details})" if details else name


def _layer_name(index: int, count: int) -> str:
    return "output" if index == count - 1 else f"layer {index}"


def _curves(ax, runs: list[RunRecord], key: str) -> None:
    """One line per (run, layer): colour by layer, style by run; two legends, so both stay short."""
    import matplotlib.lines as mlines
    from matplotlib.ticker import MaxNLocator

    count = max(len(run.epochs[0][key]) for run in runs)
    colours = [ax._get_lines.get_next_color() for _ in range(count)]
    for r, run in enumerate(runs):
        style = LINE_STYLES[r % len(LINE_STYLES)]
        width = len(run.epochs[0][key])
        for layer in range(width):
            points = [(e["epoch"], e[key][layer]) for e in run.epochs if e[key][layer] is not None]
            if points:
                colour = colours[count - 1] if layer == width - 1 else colours[layer]
                ax.plot(*zip(*points), linestyle=style, color=colour, marker=".")
    layers = [mlines.Line2D([], [], color=colours[i], label=_layer_name(i, count)) for i in range(count)]
    legend = ax.legend(handles=layers, title="layer", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.add_artist(legend)
    if len(runs) > 1:
        styles = [mlines.Line2D([], [], color="black", linestyle=LINE_STYLES[r % len(LINE_STYLES)], label=run.label)
                  for r, run in enumerate(runs)]
        ax.legend(handles=styles, title="run", loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def plot_layer_errors(runs: list[RunRecord], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    _curves(ax, runs, "layer_test_errors")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error of each layer's classifier" + ("" if len(runs) > 1 else f": {runs[0].label}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_block_losses(runs: list[RunRecord], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    _curves(ax, runs, "layer_train_losses")
    ax.set_yscale("log")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("training loss of each block" + ("" if len(runs) > 1 else f": {runs[0].label}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


STAGE_PARTS = [("busy", ("compute_s",)), ("waiting for input", ("wait_s",)), ("waiting for DFA errors", ("error_wait_s",)),
               ("blocked on output", ("blocked_s",)), ("sending (own thread)", ("send_s",))]


def stage_fractions(stats: dict[str, Any]) -> list[float]:
    """Each of STAGE_PARTS as a fraction of the stage's wall time (sending overlaps the rest: its own thread)."""
    wall = stats.get("wall_s") or 0.0
    return [sum(stats.get(k) or 0.0 for k in keys) / wall if wall > 0 else 0.0 for _, keys in STAGE_PARTS]


def plot_stage_time(runs: list[RunRecord], path: str) -> bool:
    """Grouped bars per stage, one panel per pipelined run; False when no run has stage timings."""
    import matplotlib.pyplot as plt

    piped = [run for run in runs if run.summary.get("stage_stats")]
    if not piped:
        return False
    fig, axes = plt.subplots(len(piped), 1, figsize=(8, 2.6 + 2.4 * len(piped)), squeeze=False)
    width = 0.8 / len(STAGE_PARTS)
    for ax, run in zip(axes[:, 0], piped):
        stats = sorted(run.summary["stage_stats"], key=lambda s: s["stage"])
        for p, (name, _) in enumerate(STAGE_PARTS):
            values = [stage_fractions(s)[p] for s in stats]
            ax.bar([s["stage"] + (p - (len(STAGE_PARTS) - 1) / 2) * width for s in stats], values, width, label=name)
        ax.set_xticks([s["stage"] for s in stats],
                      [f"stage {s['stage']}\nblocks {','.join(map(str, s.get('blocks', [])))}" for s in stats])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction of wall time")
        ax.set_title(run.label)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> list[str]:
    """Write the PNGs for the runs into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    if labels and len(labels) != len(run_dirs):
        raise ConfigError(f"--labels has {len(labels)} names for {len(run_dirs)} runs")
    runs = [read_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if len({run.label for run in runs}) < len(runs):  # two folders of the same name: tell them apart by path
        runs = [RunRecord(f"{run.label} [{d}]", run.epochs, run.summary) for run, d in zip(runs, run_dirs)]

    check_writable("--out", out)
    written = []
    for name, draw in (("layer_test_error.png", plot_layer_errors), ("block_train_loss.png", plot_block_losses),
                       ("stage_time.png", plot_stage_time)):
        path = os.path.join(out, name)
        if draw(runs, path) is not False:
            written.append(path)
    return written
