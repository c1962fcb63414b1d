"""Throughput, round-robin: every K=2 contender at its best setting, runs interleaved, windows of 10 s or more.

    python benchmarks/throughput.py --out benchmarks/results/throughput

MLP 3x1024 on synthetic MNIST-shaped batches of 128 (the network of run.py --quick). Two phases:
  1. pilot: one short run of every setting; GPipe, 1F1B and zero bubble (ZBV) over micro-batch counts, each
     keeping its fastest (as a user tuning it would); every contender's rate sets its steps so that its timed
     window lasts --window seconds or more.
  2. race: --repeats rounds; each round runs every contender once, in one order (so the machine's drift hits
     all alike). Reports per contender the median and range of samples/s.
Ours runs with --partition auto (the placement it picks is in the JSON) with the reference's heads and with
--sim-dim 256 (Cheaper heads: the same test error after 3 epochs). Each of ours is set beside its own ceilings:
its sequential run on one core (speedup), two of those side by side, one per core (the machine's ceiling), and
the auto profile's balance bound. Equal-hardware ratios: ours (2 processes, a core each) against backprop on 2
cores and against each 2-process pipeline peer. Writes throughput.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import CORES, MLP, _cpu_name, _gpipe, _ours, _profile, _side_by_side  # noqa: E402

CHEAP = ["--sim-dim", "256"]
OURS = ["--stages", "2", "--transport", "dist", "--partition", "auto"]
PEERS = {"GPipe K=2": ("gpipe", (1, 2, 4, 8)), "1F1B K=2": ("1f1b", (2, 4, 8)), "zero bubble (ZBV) K=2": ("zbv", (2, 4, 8))}


def contenders() -> dict[str, dict]:
    """name: how to run it; `base` names the contender its speedup is taken against, `ceiling` its side-by-side."""
    entries = {
        "sequential, 1 core": {"ours": MLP + ["--threads", "1"], "one_core": True},
        "2 sequential side by side, 1 core each": {"ours": MLP + ["--threads", "1"], "side_by_side": True},
        "sequential, 1 core, --sim-dim 256": {"ours": MLP + CHEAP + ["--threads", "1"], "one_core": True},
        "2 sequential side by side, --sim-dim 256": {"ours": MLP + CHEAP + ["--threads", "1"], "side_by_side": True},
        "backprop, 1 core": {"ours": MLP + ["--loss", "backprop", "--threads", "1"], "one_core": True},
        "backprop, 2 cores": {"ours": MLP + ["--loss", "backprop", "--threads", "2"]},
        "ours K=2, the reference's heads": {"ours": MLP + OURS, "base": "sequential, 1 core",
                                             "ceiling": "2 sequential side by side, 1 core each"},
        "ours K=2, --sim-dim 256": {"ours": MLP + CHEAP + OURS, "base": "sequential, 1 core, --sim-dim 256",
                                    "ceiling": "2 sequential side by side, --sim-dim 256"},
    }
    for name, (schedule, counts) in PEERS.items():
        for m in counts:
            entries[f"{name}, M={m}"] = {"gpipe": schedule, "microbatches": m, "peer": name}
    return entries


def run_once(spec: dict, steps: int, warmup: int) -> dict:
    if "gpipe" in spec:
        result = _gpipe(spec["gpipe"], 2, steps, warmup, MLP, spec["microbatches"])
        return {"samples_per_s": result["samples_per_s"]}
    if spec.get("side_by_side"):
        return {"samples_per_s": _side_by_side(spec["ours"], steps, warmup)["train_samples_per_s"]}
    summary = _ours(spec["ours"], steps, warmup, spec.get("one_core", False))
    return {"samples_per_s": summary["train_samples_per_s"], "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/throughput")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=float, default=10.0, help="seconds of timed steps per run, at least")
    parser.add_argument("--pilot-steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    started = time.time()
    specs = contenders()
    pilot = {}
    for name, spec in specs.items():
        try:
            pilot[name] = run_once(spec, args.pilot_steps, args.warmup)["samples_per_s"]
        except RuntimeError as exc:  # a schedule that refuses this micro-batch count
            if "peer" not in spec:
                raise
            pilot[name] = None
            print(f"  pilot {name}: refused ({str(exc).strip().splitlines()[-1][:200]})", file=sys.stderr, flush=True)
            continue
        print(f"  pilot {name}: {pilot[name]:.0f} samples/s", file=sys.stderr, flush=True)
    best_m = {peer: max((n for n in specs if specs[n].get("peer") == peer and pilot[n]), key=pilot.get) for peer in PEERS}
    chosen = {n: s for n, s in specs.items() if "peer" not in s or best_m[s["peer"]] == n}
    steps = {n: max(args.pilot_steps, math.ceil(args.window * pilot[n] / 128)) for n in chosen}
    runs: dict[str, list[dict]] = {n: [] for n in chosen}
    for round_ in range(args.repeats):
        for name, spec in chosen.items():
            runs[name].append(run_once(spec, steps[name], args.warmup))
            print(f"  round {round_ + 1} {name}: {runs[name][-1]['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
    report = summarise(chosen, runs, pilot, steps)
    report.update(machine={"cores": len(CORES), "cpu": _cpu_name()}, repeats=args.repeats, window_s=args.window,
                  minutes=(time.time() - started) / 60)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))


def summarise(chosen: dict, runs: dict, pilot: dict, steps: dict) -> dict:
    rows = {}
    for name, spec in chosen.items():
        rates = [r["samples_per_s"] for r in runs[name]]
        rows[name] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates,
                      "steps": steps[name]}
        summaries = [r["summary"] for r in runs[name] if "summary" in r]
        if summaries and "base" in spec:
            profile = _profile({"detail": summaries[0]})
            rows[name]["placement"] = summaries[0].get("partition")
            if profile:
                total = sum(profile["compute_ms"])
                rows[name]["balance_ceiling"] = total / max(profile["chosen_stage_ms"])
    for name, spec in chosen.items():
        if "base" in spec:
            base = rows[spec["base"]]["median"]
            rows[name]["speedup_vs_sequential"] = rows[name]["median"] / base
            rows[name]["speedup_range"] = [rows[name]["min"] / base, rows[name]["max"] / base]
            rows[name]["machine_ceiling"] = rows[spec["ceiling"]]["median"] / base
            rows[name]["equal_hardware"] = {other: rows[name]["median"] / rows[other]["median"] for other in rows
                                            if other.startswith(("backprop, 2", "GPipe", "1F1B", "zero bubble"))}
    return {"rows": rows, "pilot": pilot}


def table(report: dict) -> str:
    rows = report["rows"]
    lines = [f"| contender | steps per run | samples/s, median [range] of {report['repeats']} |", "|---|---|---|"]
    lines += [f"| {n} | {r['steps']} | {r['median']:.0f} [{r['min']:.0f}, {r['max']:.0f}] |" for n, r in rows.items()]
    for name, r in rows.items():
        if "speedup_vs_sequential" in r:
            lo, hi = r["speedup_range"]
            lines.append(f"\n**{name}** (placement {r.get('placement')}): {r['speedup_vs_sequential']:.2f}x its sequential "
                         f"run [{lo:.2f}, {hi:.2f}], ceilings: machine {r['machine_ceiling']:.2f}, balance "
                         f"{r.get('balance_ceiling', float('nan')):.2f}; on equal hardware: "
                         + ", ".join(f"{v:.2f}x {o}" for o, v in r["equal_hardware"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
