"""Time to accuracy on MNIST: wall time until 98% test accuracy, and accuracy against wall time, per contender.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --out benchmarks/results/time_to_accuracy

Contenders, in one run, one after the other: our best K=2 configuration (block 1's heads on stage 1, dist) and
the whole-block K=2 split, with the reference's recipe; and each baseline at its best setting, as its users would
tune it: single-process backprop on all cores over learning rates LRS; GPipe and 1F1B at K=2
(torch.distributed.pipelining, global backprop) over micro-batch counts 1, 2, 4, 8 (1F1B needs at least K) at
the best backprop learning rate. Each tuned baseline reports its best setting (the earliest to the target,
else the most accurate), the whole sweep kept in the JSON. Test accuracy is measured after every epoch; the time
is wall time since training began (evaluation passes included). Writes tta.json and tta.png.
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
MLP = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
       "--batch-size", "128"]
LOCAL = MLP + ["--lr", "5e-4"]  # the reference recipe (Nokland & Eidnes)
LRS = ("5e-4", "1e-3", "2e-3")
MICROBATCHES = (1, 2, 4, 8)
SETTINGS = {
    "pipeline K=2, split heads 1.5,2.5 (dist)": ("ours", [LOCAL + ["--stages", "2", "--transport", "dist", "--partition", "1.5,2.5"]]),
    "pipeline K=2, whole blocks 2,2 (dist)": ("ours", [LOCAL + ["--stages", "2", "--transport", "dist"]]),
    "backprop, 1 process (all cores)": ("ours", [MLP + ["--loss", "backprop", "--lr", lr] for lr in LRS]),
    "GPipe K=2": ("gpipe", [MLP + ["--stages", "2", "--schedule", "gpipe", "--microbatches", str(m)] for m in MICROBATCHES]),
    "1F1B K=2": ("gpipe", [MLP + ["--stages", "2", "--schedule", "1f1b", "--microbatches", str(m)] for m in MICROBATCHES if m >= 2]),
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


def _rank(result: dict) -> tuple:
    """Earliest to the target first, then the most accurate at the end."""
    reached = result["seconds_to_target"]
    return (reached is None, reached or 0.0, -result["history"][-1]["test_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results/time_to_accuracy")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated contender names")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SETTINGS)
    results, best_lr = {}, None
    for name in chosen:
        kind, variants = SETTINGS[name]
        if kind == "gpipe" and best_lr:  # the pipelines of backprop at backprop's best learning rate
            variants = [flags + ["--lr", best_lr] for flags in variants]
        sweep = []
        for flags in variants:
            history = (run_ours if kind == "ours" else run_gpipe)(flags, args.data_dir, args.epochs)
            sweep.append({"flags": flags, "history": history, "seconds_to_target": first_reaching(history, TARGET)})
            print(f"  {name} {' '.join(flags[len(MLP):])}: " + ", ".join(
                f"epoch {h['epoch']} {h['test_accuracy']:.2f}% at {h['wall_s']:.0f} s" for h in history), file=sys.stderr, flush=True)
        best = min(sweep, key=_rank)
        results[name] = {**best, "sweep": sweep if len(sweep) > 1 else None}
        if name.startswith("backprop"):
            best_lr = best["flags"][best["flags"].index("--lr") + 1]
    ranking = sorted(results, key=lambda n: _rank(results[n]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tta.json"), "w") as f:
        json.dump({"target": TARGET, "epochs": args.epochs, "results": results, "ranking": ranking}, f, indent=1)
    print(f"| rank | contender (best setting) | seconds to {TARGET}% | accuracy per epoch |")
    print("|---|---|---|---|")
    for place, name in enumerate(ranking, 1):
        r = results[name]
        reached = f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] else f"not within {args.epochs} epochs"
        setting = " ".join(r["flags"][len(MLP):])
        print(f"| {place} | {name} ({setting}) | {reached} | " + " / ".join(f"{h['test_accuracy']:.2f}" for h in r["history"]) + " |")
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
