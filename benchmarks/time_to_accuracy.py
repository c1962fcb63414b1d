"""Time to accuracy on MNIST: wall time until 98% test accuracy, and accuracy against wall time, per contender.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --out benchmarks/results/time_to_accuracy

Contenders, each with the settings listed in SETTINGS (the best we know for each): the local-learning pipeline
at K=2 and K=4, the sequential local-learning trainer on all cores, global backprop in one process on all
cores, and GPipe at K=2 (global backprop, torch.distributed.pipelining). Test accuracy is measured after every
epoch; the time is wall time since training began (evaluation passes included). Writes tta.json and tta.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 98.0
LOCAL = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
         "--batch-size", "128", "--lr", "5e-4"]  # the reference recipe (Nokland & Eidnes)
BACKPROP = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
            "--batch-size", "128", "--lr", "1e-3", "--loss", "backprop"]
SETTINGS = {
    "pipeline K=2 (zmq)": ("ours", LOCAL + ["--stages", "2", "--transport", "zmq"]),
    "pipeline K=4 (zmq)": ("ours", LOCAL + ["--stages", "4", "--transport", "zmq"]),
    "sequential (all cores)": ("ours", LOCAL),
    "backprop (all cores)": ("ours", BACKPROP),
    "GPipe K=2": ("gpipe", ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1",
                            "--nonlin", "leakyrelu", "--batch-size", "128", "--lr", "1e-3", "--stages", "2",
                            "--schedule", "gpipe"]),
}


def run_ours(flags: list[str], data_dir: str, epochs: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pipeline", "train", "--dataset", "mnist", "--data-dir", data_dir,
                   "--no-download", "--epochs", str(epochs), "--no-progress", "--out", out, *flags]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=7200)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [{"epoch": r["epoch"], "wall_s": r["wall_s"], "test_accuracy": 100.0 - r["test_error"]}
                    for r in map(json.loads, f)]


def run_gpipe(flags: list[str], data_dir: str, epochs: int) -> list[dict]:
    command = [sys.executable, os.path.join(HERE, "gpipe.py"), "--dataset", "mnist", "--data-dir", data_dir,
               "--epochs", str(epochs), *flags]
    proc = subprocess.run(command, check=True, capture_output=True, text=True, timeout=7200)
    return json.loads(proc.stdout.strip().splitlines()[-1])["history"]


def first_reaching(history: list[dict], target: float) -> float | None:
    return next((h["wall_s"] for h in history if h["test_accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results/time_to_accuracy")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated contender names")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SETTINGS)
    results = {}
    for name in chosen:
        kind, flags = SETTINGS[name]
        history = (run_ours if kind == "ours" else run_gpipe)(flags, args.data_dir, args.epochs)
        results[name] = {"flags": flags, "history": history, "seconds_to_target": first_reaching(history, TARGET)}
        print(f"  {name}: " + ", ".join(f"epoch {h['epoch']} {h['test_accuracy']:.2f}% at {h['wall_s']:.0f} s" for h in history),
              file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tta.json"), "w") as f:
        json.dump({"target": TARGET, "results": results}, f, indent=1)
    print(f"| contender | seconds to {TARGET}% | accuracy per epoch |")
    print("|---|---|---|")
    for name, r in results.items():
        reached = f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] else f"not within {args.epochs} epochs"
        print(f"| {name} | {reached} | " + " / ".join(f"{h['test_accuracy']:.2f}" for h in r["history"]) + " |")
    plot(results, os.path.join(args.out, "tta.png"))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot([0] + [h["wall_s"] for h in r["history"]], [10] + [h["test_accuracy"] for h in r["history"]], marker="o", label=name)
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="wall time since training began (s)", ylabel="test accuracy (%)", ylim=(96, 99.2),
           title="MNIST, MLP 3x1024: test accuracy against time (2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
