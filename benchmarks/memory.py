"""Memory per device at equal batch: ours against single-process backprop and GPipe / 1F1B, one accounting for all.

    python benchmarks/memory.py --out benchmarks/results/memory                       # vgg8b x1 and resnet18, K = 1, 4
    python benchmarks/memory.py --models mlp vgg8b-x0.5 --stages 1 2 4 --out DIR

Every contender trains the same network on the same synthetic batches (batch 128; CIFAR-10 shapes, MNIST's for
the MLP) for a few steps, and reports what pipeline/observe/memory.py counts in each process ([Note: memory accounting]):
the bytes autograd saved for backward (by storage; the peak), parameters and buffers, the gradients alive at once,
the optimizer state and the messages in flight. Ours runs as `python -m pipeline train` (its stage_stats), at K = 1
as the sequential trainer; the peers (GPipe, 1F1B and the V-shaped zero-bubble schedule) run benchmarks/gpipe.py,
whose stage modules get the same meter around each schedule step, at every micro-batch count swept (their samples/s over these few steps ride along, to name the
fastest count; it is a rough figure: benchmarks/run.py measures throughput). Ours: whole blocks (even split) in
the default (overlap) order and in the lean order, with the reference's heads and with cheaper ones (--sim-pool). Writes results.json,
table.md and memory.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2 ** 20
MODELS = {
    "mlp": ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu"],
    "vgg8b-x0.5": ["--model", "vgg8b", "--feat-mult", "0.5", "--dropout", "0.1", "--synthetic-like", "cifar10"],
    "vgg8b-x1": ["--model", "vgg8b", "--feat-mult", "1", "--dropout", "0.1", "--synthetic-like", "cifar10"],
    "resnet18": ["--model", "resnet18", "--dropout", "0.1", "--synthetic-like", "cifar10"],
}
OURS = {"ours": [], "ours, --sim-pool 2": ["--sim-pool", "2"], "ours, --sim-pool 4": ["--sim-pool", "4"],
        "ours lean": ["--stage-order", "lean"], "ours lean, --sim-pool 4": ["--stage-order", "lean", "--sim-pool", "4"]}
KEYS = ("saved_peak_bytes", "saved_peak_layer_bytes", "saved_peak_heads_bytes", "parameter_bytes", "gradient_peak_bytes",
        "optimizer_bytes", "messages_peak_bytes", "activations_peak_bytes", "accounted_peak_bytes")


def _ours(model: list[str], stages: int, extra: list[str], batch: int, steps: int) -> list[dict]:
    """Each stage's memory report (one entry at K=1: the sequential trainer's)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--batch-size", str(batch),
                   "--synthetic-train-size", str(batch * steps), "--synthetic-test-size", str(batch),
                   "--limit-eval-batches", "1", "--epochs", "1", "--no-progress", "--stages", str(stages),
                   "--transport", "dist", "--out", out, *model, *extra]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    if stages == 1:
        return [summary["memory"]]
    return [s["memory"] for s in sorted(summary["stage_stats"], key=lambda s: s["stage"])]


def _peer(model: list[str], schedule: str, stages: int, microbatches: int, batch: int, steps: int) -> dict:
    command = [sys.executable, os.path.join(HERE, "gpipe.py"), "--schedule", schedule, "--stages", str(stages),
               "--microbatches", str(microbatches), "--steps", str(steps), "--warmup", "1", "--batch-size", str(batch),
               "--synthetic-train-size", str(batch * (steps + 2)), *_gpipe_flags(model)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gpipe_flags(model: list[str]) -> list[str]:
    """gpipe.py takes the model flags it knows; the rest (nonlinearity and layer counts have its defaults) go."""
    known = {"--model", "--num-layers", "--num-hidden", "--feat-mult", "--dropout", "--nonlin", "--synthetic-like"}
    flags, i = [], 0
    while i < len(model):
        if model[i] in known:
            flags += model[i:i + 2]
        i += 2
    return flags


def split_heads_partition(blocks: int, stages: int) -> str:
    """The even split with its first cut moved half a block down: the first stage's last block's layer stays, its
    heads go to the second stage (every stage keeps at least a half block)."""
    small, extra = divmod(blocks, stages)
    sizes = [float(small + (k < extra)) for k in range(stages)]
    sizes[0] -= 0.5
    sizes[1] += 0.5
    return ",".join(f"{s:g}" for s in sizes)


def _block_count(model: list[str]) -> int:
    from pipeline.cli import build_parser, config_from_args
    from pipeline.model.factories import count_blocks

    return count_blocks(config_from_args(build_parser().parse_args(["train", "--dataset", "synthetic", *model])))


def _row(name: str, model: str, stages: int, reports: list[dict], **extra) -> dict:
    worst = max(reports, key=lambda r: r["accounted_peak_bytes"])
    return {"contender": name, "model": model, "stages": stages, "per_stage": reports,
            "max_stage": {k: worst.get(k, 0) for k in KEYS}, **extra}


def measure(models: list[str], stage_counts: list[int], batch: int, steps: int, microbatches: list[int],
            schedules: tuple[str, ...] = ("gpipe", "1f1b", "zbv"), ours: bool = True) -> list[dict]:
    rows = []
    for model in models:
        flags = MODELS[model]
        for stages in stage_counts:
            for name, extra in OURS.items() if ours else ():
                if stages == 1 and "lean" in name:
                    continue  # one process learns block by block anyway
                rows.append(_row(name, model, stages, _ours(flags, stages, extra, batch, steps)))
                print(json.dumps(rows[-1]["max_stage"]), name, model, stages, file=sys.stderr, flush=True)
            if ours and stages > 1:  # split heads: the first stage's last block's heads on the next stage
                sizes = split_heads_partition(_block_count(flags), stages)
                rows.append(_row("ours, split heads", model, stages,
                                 _ours(flags, stages, ["--partition", sizes], batch, steps), partition=sizes))
                print(json.dumps(rows[-1]["max_stage"]), "ours, split heads", sizes, model, stages, file=sys.stderr, flush=True)
            if stages == 1:
                if ours:
                    rows.append(_row("backprop", model, 1, _ours(flags, 1, ["--loss", "backprop"], batch, steps)))
                continue
            for schedule in schedules:
                for m in microbatches:
                    if schedule == "1f1b" and m < stages:
                        continue  # torch.distributed.pipelining's 1F1B needs at least K micro-batches
                    try:
                        result = _peer(flags, schedule, stages, m, batch, steps)
                    except RuntimeError as exc:  # a schedule that refuses this count: say so, go on
                        print(f"{schedule} M={m} {model} K={stages} failed: {str(exc).splitlines()[-1]}", file=sys.stderr)
                        continue
                    rows.append(_row(f"{schedule} M={m}", model, stages, result["memory"], samples_per_s=result["samples_per_s"]))
                    print(json.dumps(rows[-1]["max_stage"]), schedule, m, model, stages, file=sys.stderr, flush=True)
    return rows


def largest_batches(rows: list[dict], measured: int, model: str, budget: int, stages: int, contenders: list[str],
                    steps: int) -> list[dict]:
    """The largest batch each contender trains within `budget` accounted bytes per device: predicted from its row
    at the measured batch (what does not grow with the batch, parameters, gradients and optimizer state, plus the
    rest in proportion to the batch), then confirmed by a real run at that batch."""
    flags, found = MODELS[model], []
    for name in contenders:
        k = 1 if name in ("backprop", "ours") or name.startswith("ours, ") else stages
        row = next(r for r in rows if r["model"] == model and r["stages"] == k and r["contender"] == name)
        m = row["max_stage"]
        fixed = m["parameter_bytes"] + m["gradient_peak_bytes"] + m["optimizer_bytes"]
        per_sample = (m["accounted_peak_bytes"] - fixed) / measured
        micro = int(name.split("M=")[1]) if "M=" in name else 1
        batch = int((budget - fixed) / per_sample) // micro * micro  # whole micro-batches
        if name.startswith("ours") or name == "backprop":
            extra = OURS.get(name, ["--loss", "backprop"] if name == "backprop" else [])
            reports = _ours(flags, k, extra, batch, steps)
        else:
            schedule = name.split()[0]
            reports = _peer(flags, schedule, k, micro, batch, steps)["memory"]
        peak = max(r["accounted_peak_bytes"] for r in reports)
        found.append({"model": model, "contender": name, "stages": k, "predicted_batch": batch,
                      "accounted_at_that_batch_mib": peak / MIB, "within_budget": peak <= budget})
        print(json.dumps(found[-1]), file=sys.stderr, flush=True)
    return found


def table(rows: list[dict]) -> str:
    lines = ["| model | K | contender | largest stage: accounted | saved for backward (layer + heads) | parameters | gradients | optimizer | messages (not also saved) | vs backprop saved |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    backprop = {r["model"]: r["max_stage"]["saved_peak_bytes"] for r in rows if r["contender"] == "backprop"}
    for r in rows:
        m = r["max_stage"]
        ratio = m["saved_peak_bytes"] / backprop[r["model"]] if backprop.get(r["model"]) else None
        lines.append(f"| {r['model']} | {r['stages']} | {r['contender']} | {m['accounted_peak_bytes'] / MIB:.0f} MiB | "
                     f"{m['saved_peak_bytes'] / MIB:.0f} ({m['saved_peak_layer_bytes'] / MIB:.0f} + {m['saved_peak_heads_bytes'] / MIB:.0f}) MiB | "
                     f"{m['parameter_bytes'] / MIB:.0f} MiB | {m['gradient_peak_bytes'] / MIB:.0f} MiB | {m['optimizer_bytes'] / MIB:.0f} MiB | "
                     f"{_messages_beyond_saved(m) / MIB:.1f} MiB | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def _messages_beyond_saved(m: dict) -> int:
    """What the messages add to the saved tensors at their joint peak (a stage's input that its first layer saves is
    counted once); older results without the joint peak: the messages' own peak."""
    return m["activations_peak_bytes"] - m["saved_peak_bytes"] if "activations_peak_bytes" in m else m["messages_peak_bytes"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["stages"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
    for ax, (model, stages) in zip(axes[0], groups):
        chosen = [r for r in rows if (r["model"], r["stages"]) == (model, stages)]
        names = [r["contender"] for r in chosen]
        bottom = [0.0] * len(chosen)
        for key, label in (("saved_peak_layer_bytes", "saved: layers"), ("saved_peak_heads_bytes", "saved: heads"),
                           ("parameter_bytes", "parameters"), ("gradient_peak_bytes", "gradients"),
                           ("optimizer_bytes", "optimizer"), ("messages", "messages (not also saved)")):
            values = [_messages_beyond_saved(r["max_stage"]) / MIB if key == "messages" else r["max_stage"][key] / MIB
                      for r in chosen]
            ax.barh(names, values, left=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{model}, K={stages}: the largest stage")
        ax.set_xlabel("MiB (accounted)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg8b-x1", "resnet18"], choices=list(MODELS))
    p.add_argument("--stages", nargs="+", type=int, default=[1, 4])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--microbatches", nargs="+", type=int, default=[1, 4, 8, 32])
    p.add_argument("--schedules", nargs="*", default=["gpipe", "1f1b", "zbv"], help="the peers (benchmarks/gpipe.py)")
    p.add_argument("--peers-only", action="store_true", help="only the peers")
    p.add_argument("--merge", action="store_true",
                   help="into --out's results.json: the rows measured now replace those of the same model, K and contender")
    p.add_argument("--budget-mib", type=int, default=None,
                   help="instead: the largest batch within this budget per device, from --out's results.json, confirmed")
    p.add_argument("--budget-contenders", nargs="+", default=["backprop", "ours, --sim-pool 4", "ours lean",
                                                              "ours lean, --sim-pool 4", "gpipe M=8", "1f1b M=8", "zbv M=8"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.budget_mib:
        with open(os.path.join(args.out, "results.json")) as f:
            measured = json.load(f)
        found = [row for model in args.models for row in largest_batches(
            measured["rows"], measured["batch_size"], model, args.budget_mib * MIB, max(args.stages),
            args.budget_contenders, args.steps)]
        with open(os.path.join(args.out, f"budget_{args.budget_mib}mib.json"), "w") as f:
            json.dump({"budget_mib": args.budget_mib, "steps": args.steps, "rows": found}, f, indent=1)
        print(f"| model | K | contender | largest batch within {args.budget_mib} MiB | accounted at that batch (MiB) |\n|---|---|---|---|---|")
        for r in found:
            print(f"| {r['model']} | {r['stages']} | {r['contender']} | {r['predicted_batch']} | "
                  f"{r['accounted_at_that_batch_mib']:.0f}{'' if r['within_budget'] else ' (over)'} |")
        return
    rows = measure(args.models, args.stages, args.batch_size, args.steps, args.microbatches, tuple(args.schedules),
                   ours=not args.peers_only)
    existing = os.path.join(args.out, "results.json")
    if args.merge and os.path.exists(existing):
        with open(existing) as f:
            new = {(r["model"], r["stages"], r["contender"]): r for r in rows}
            old = json.load(f)["rows"]
            rows = [new.pop((r["model"], r["stages"], r["contender"]), r) for r in old] + list(new.values())
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"batch_size": args.batch_size, "steps": args.steps, "rows": rows}, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "memory.png"))
    print(text)


if __name__ == "__main__":
    main()
