"""Cheaper local heads: each head setting's cost per block, saved bytes and test error, in one table.

    python benchmarks/cheap_heads.py --data-dir ../shared/data --out benchmarks/results/cheap_heads    # ~35 minutes

Real MNIST, 2 threads: MLP 3x1024 for 3 epochs and vgg8b x0.25 for 1 epoch (the README's recipes), once with the
reference's heads and once per cheaper setting (--sim-pool, --sim-dim, --dim-in-decoder). A setting's training run
is kept in DIR/<name>/ and not run again when its summary.json is there. Per setting: the test error after each
epoch (output classifier) and the best hidden layer's, samples/s, the bytes autograd saved at the peak (layers and
heads, pipeline/observe/memory.py), and each block's layer and heads times per step (pipeline/engine/profile.py, medians on one
thread, measured here for every setting one after another). Writes results.json, table.md and cheap_heads.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MLP = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
       "--epochs", "3"]
VGG = ["--model", "vgg8b", "--feat-mult", "0.25", "--num-layers", "1", "--epochs", "1"]
SETTINGS = [
    ("mlp-ref", MLP, []), ("mlp-simdim256", MLP, ["--sim-dim", "256"]), ("mlp-simdim64", MLP, ["--sim-dim", "64"]),
    ("vgg8b-ref", VGG, []), ("vgg8b-simpool2", VGG, ["--sim-pool", "2"]), ("vgg8b-simpool4", VGG, ["--sim-pool", "4"]),
    ("vgg8b-simdim32", VGG, ["--sim-dim", "32"]),
    ("vgg8b-simpool4-dec1024", VGG, ["--sim-pool", "4", "--dim-in-decoder", "1024"]),
]
MIB = 2 ** 20


def train(name: str, flags: list[str], data_dir: str, out: str) -> dict:
    folder = os.path.join(out, name)
    if not os.path.exists(os.path.join(folder, "summary.json")):
        command = [sys.executable, "-m", "pipeline", "train", *flags, "--dataset", "mnist", "--data-dir", data_dir,
                   "--threads", "2", "--no-progress", "--out", folder]
        with open(os.path.join(out, f"{name}.log"), "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=7200)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    return {"test_error_per_epoch": [e["test_error"] for e in epochs],
            "best_layer_error": min(e for e in summary["layer_test_errors"] if e is not None),
            "samples_per_s": summary["train_samples_per_s"], "wall_s": summary["wall_s"], "memory": summary["memory"]}


def costs(flags: list[str], data_dir: str) -> dict:
    import torch

    from pipeline.cli import build_parser, config_from_args
    from pipeline.engine.profile import block_costs

    torch.set_num_threads(1)
    cfg = config_from_args(build_parser().parse_args(["train", *flags, "--dataset", "mnist", "--data-dir", data_dir]))
    measured = block_costs(cfg, torch.device("cpu"))
    return {"layer_ms": [1e3 * t for t in measured.layer], "heads_ms": [1e3 * t for t in measured.heads]}


def table(rows: list[dict]) -> str:
    lines = ["| setting | test error per epoch (output) | best layer | samples/s | saved at the peak: layers + heads | "
             "heads / layers per step (sum over blocks) |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        lines.append(f"| {r['name']} {' '.join(r['flags']) or '(reference)'} | "
                     f"{' / '.join(f'{e:.2f}' for e in r['test_error_per_epoch'])} | {r['best_layer_error']:.2f} | "
                     f"{r['samples_per_s']:.0f} | {m['saved_peak_layer_bytes'] / MIB:.1f} + {m['saved_peak_heads_bytes'] / MIB:.1f} MiB | "
                     f"{sum(r['heads_ms']):.1f} / {sum(r['layer_ms']):.1f} ms |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix in zip(axes, ("mlp", "vgg8b")):
        chosen = [r for r in rows if r["name"].startswith(prefix)]
        for r in chosen:
            ax.scatter(sum(r["heads_ms"]), r["test_error_per_epoch"][-1])
            ax.annotate(r["name"].split("-", 1)[1], (sum(r["heads_ms"]), r["test_error_per_epoch"][-1]), fontsize=8)
        ax.set_xlabel("heads, ms per step (all blocks, one thread)")
        ax.set_ylabel("test error after the last epoch (%)")
        ax.set_title(prefix)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = [{"name": name, "flags": extra, **train(name, flags + extra, args.data_dir, args.out)}
            for name, flags, extra in SETTINGS]
    for row, (_, flags, extra) in zip(rows, SETTINGS):  # timed after the training runs, one setting after another
        row.update(costs(flags + extra, args.data_dir))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "cheap_heads.png"))
    print(text)


if __name__ == "__main__":
    main()
