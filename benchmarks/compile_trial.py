"""torch.compile on this CPU: one training step of MLP 3x1024, eager against compiled, for ours and for backprop.

    python benchmarks/compile_trial.py --out benchmarks/results/compile_trial

One process, one thread, batch 128 of synthetic MNIST-shaped data. Compiled: each hidden block's activation (layer,
batch norm, nonlinearity, dropout) and each block's local heads (their loss included) with torch.compile
(inductor, default mode); the optimizer steps stay eager. Backprop compiles the same activations (it has no
heads). Eager and compiled alternate --rounds times after a warm-up that includes compilation; reports the
median ms per step of each and the ratio. Writes compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from pipeline.cli import build_parser, config_from_args
from pipeline.sequential import SequentialTrainer

MLP = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
       "--batch-size", "128", "--dataset", "synthetic", "--synthetic-train-size", "4096", "--threads", "1", "--no-progress"]
SETTINGS = {"ours, the reference's heads": [], "ours, --sim-dim 256": ["--sim-dim", "256"], "backprop": ["--loss", "backprop"]}


def trainer(flags: list[str], compiled: bool) -> SequentialTrainer:
    t = SequentialTrainer(config_from_args(build_parser().parse_args(["train", *MLP, *flags])))
    if compiled:
        for block in t.blocks:
            if hasattr(block, "activation"):  # the hidden blocks (the output block is one linear map)
                block.activation = torch.compile(block.activation)
            if getattr(block, "heads", None) is not None:
                block.heads.compile()
    return t


def ms_per_step(t: SequentialTrainer, steps: int) -> float:
    batches = list(t.source.train_batches(1))[:steps]
    began = time.perf_counter()
    for b in batches:
        t.train_batch(b.x, b.y)
    return 1000 * (time.perf_counter() - began) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/compile_trial")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    for name, flags in SETTINGS.items():
        eager, compiled = trainer(flags, False), trainer(flags, True)
        began = time.perf_counter()
        ms_per_step(compiled, 3)  # compiles (and recompiles for train/eval shapes) here
        compile_s = time.perf_counter() - began
        ms_per_step(eager, 3)
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            times["eager"].append(ms_per_step(eager, args.steps))
            times["compiled"].append(ms_per_step(compiled, args.steps))
        report[name] = {k: {"median_ms": statistics.median(v), "runs_ms": v} for k, v in times.items()}
        report[name]["compiled_over_eager"] = report[name]["compiled"]["median_ms"] / report[name]["eager"]["median_ms"]
        report[name]["compile_s"] = compile_s
        print(f"  {name}: eager {report[name]['eager']['median_ms']:.1f} ms, compiled "
              f"{report[name]['compiled']['median_ms']:.1f} ms ({report[name]['compiled_over_eager']:.2f}x; "
              f"compiling took {compile_s:.0f} s)", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": 1, "rounds": args.rounds, "steps": args.steps, **report}, f, indent=1)
    print("| setting | eager ms/step | compiled ms/step | compiled / eager | compile time (s) |\n|---|---|---|---|---|")
    for name, r in report.items():
        print(f"| {name} | {r['eager']['median_ms']:.1f} [{min(r['eager']['runs_ms']):.1f}, {max(r['eager']['runs_ms']):.1f}] | "
              f"{r['compiled']['median_ms']:.1f} [{min(r['compiled']['runs_ms']):.1f}, {max(r['compiled']['runs_ms']):.1f}] | "
              f"{r['compiled_over_eager']:.2f} | {r['compile_s']:.0f} |")


if __name__ == "__main__":
    main()
