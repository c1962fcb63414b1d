"""Bottleneck experiment (Launay, Poli, Krzakala 2019): DFA alignment and test error as one hidden layer narrows.

An MLP 784-800-b-800-10 (tanh, no batch norm) is trained with DFA for each width b of its middle layer; after
training, each hidden layer's angle to the backprop gradient is measured on held-out batches. Prints a markdown
table and writes bottleneck.json and bottleneck.png under --out.

    python benchmarks/bottleneck.py --data-dir ../shared/data --out benchmarks/results/bottleneck
    python benchmarks/bottleneck.py --quick ...     # fewer widths, one epoch
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pipeline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig
from pipeline.sequential import SequentialTrainer

WIDTHS = [1, 3, 5, 8, 11, 18, 28, 46, 73, 118, 191, 308, 496, 800]  # as in the paper's code
QUICK_WIDTHS = [1, 3, 10, 30, 100, 800]
CLASSES = 10


def run_width(width: int, args: argparse.Namespace) -> dict:
    """Train one network with a middle layer of `width` units; its test error and final angles."""
    cfg = Config(
        model=ModelConfig(hidden_sizes=(800, width, 800), nonlin="tanh", batch_norm=False),
        loss=LossConfig(loss="dfa"),
        optim=OptimConfig(lr=args.lr),
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, augment=False, download=False,
                        limit_train_batches=args.limit_train_batches),
        # an interval longer than the run: only the end-of-epoch measurements are taken
        run=RunConfig(epochs=args.epochs, seed=args.seed, progress=False, log_alignment=10**9, alignment_batches=4),
    )
    started = time.perf_counter()
    trainer = SequentialTrainer(cfg)
    summary = trainer.run()
    final = trainer.alignment.records[-1]
    return {"width": width, "test_error": summary["test_error"], "angles": final["angles"],
            "layers": final["layers"], "seconds": time.perf_counter() - started}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [r["width"] for r in results]
    fig, (angles_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for position, name in enumerate(["layer 1 (800)", "layer 2 (b)", "layer 3 (800)"]):
        angles_ax.plot(widths, [r["angles"][position] for r in results], marker="o", label=name)
    angles_ax.axhline(90, color="grey", linestyle="--", linewidth=1, label="random direction")
    angles_ax.set(xscale="log", xlabel="width b of the middle layer", ylabel="angle to backprop gradient (degrees)",
                  ylim=(0, 100), title="DFA alignment")
    error_ax.plot(widths, [r["test_error"] for r in results], marker="o", color="black")
    error_ax.set(xscale="log", yscale="log", xlabel="width b of the middle layer", ylabel="test error (%)", title="test error")
    for ax in (angles_ax, error_ax):
        ax.axvline(CLASSES, color="red", linestyle=":", linewidth=1, label=f"{CLASSES} classes")
    angles_ax.legend(fontsize=8)
    fig.suptitle("MLP 784-800-b-800-10, tanh, trained with DFA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results/bottleneck")
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help=f"widths {QUICK_WIDTHS}, one epoch")
    args = parser.parse_args()
    widths = args.widths or (QUICK_WIDTHS if args.quick else WIDTHS)
    if args.quick:
        args.epochs = 1
    os.makedirs(args.out, exist_ok=True)
    results = []
    print("| width b | test error (%) | angle layer 1 | angle layer 2 (b) | angle layer 3 | seconds |")
    print("|---|---|---|---|---|---|")
    for width in widths:
        r = run_width(width, args)
        results.append(r)
        a = r["angles"]
        print(f"| {width} | {r['test_error']:.2f} | {a[0]:.1f} | {a[1]:.1f} | {a[2]:.1f} | {r['seconds']:.0f} |", flush=True)
    with open(os.path.join(args.out, "bottleneck.json"), "w") as f:
        json.dump({"epochs": args.epochs, "dataset": args.dataset, "lr": args.lr, "results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "bottleneck.png"))
    print(f"wrote {args.out}/bottleneck.json and bottleneck.png")


if __name__ == "__main__":
    main()
