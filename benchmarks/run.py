"""Throughput benchmark: this pipeline against sequential local learning, global backprop and GPipe / 1F1B.

    python benchmarks/run.py --quick --out benchmarks/results/quick     # a few minutes on a 2-core CPU
    python benchmarks/run.py --out benchmarks/results/full               # K = 1, 2, 4, every transport, auto partition
    python benchmarks/run.py --vgg-only --steps 30 --out benchmarks/results/vgg_split_heads   # vgg8b x0.25, K = 2, 4

Every contender trains the same network (MLP 3x1024, predsim; backprop for the global-loss contenders) on the
same synthetic MNIST-shaped batches for --steps steps after --warmup steps, in a fresh process; the median of
--repeats runs is reported. On CPU every pipeline process gets its own core and one intra-op thread; the
single-process contenders run once on one core with one thread and once on all cores.
GPipe and 1F1B run at their best micro-batch count of 1, 2, 4 and 8 (each swept, the sweep in the JSON; 1F1B needs
at least K), as a user tuning the baseline would. At K=2 ours also runs with split heads (block 1's layer on
stage 0 and its heads on stage 1, 1.5,2.5; or its heads on stage 0 and its layer on stage 1, 1.5h,2.5);
speedup_vs_sequential is the best K=2 configuration, reported beside the
machine ceiling and the balance ceilings of whole-block and split-heads placements. Writes results.json, a
markdown table on stdout, and PNGs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _without(flags: list[str], name: str) -> list[str]:
    """The flags without `name` and its value."""
    if name not in flags:
        return list(flags)
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


HERE = os.path.dirname(os.path.abspath(__file__))
MLP = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--dropout", "0.1", "--nonlin", "leakyrelu",
       "--batch-size", "128"]
# the same MLP with 4 hidden blocks: two equal halves, so K=2 can be balanced (3 blocks cannot: the slowest stage
# holds 2 of 3 equal blocks, which caps the K=2 speedup near 1.5)
MLP4 = _without(MLP, "--num-layers") + ["--num-layers", "4"]
VGG = ["--model", "vgg8b", "--feat-mult", "0.25", "--num-layers", "1", "--num-hidden", "256", "--dropout", "0.1",
       "--nonlin", "leakyrelu", "--batch-size", "32", "--dim-in-decoder", "1024"]
CORES = sorted(os.sched_getaffinity(0))
SIDE_BY_SIDE = f"{len(CORES)} sequential side by side, 1 core each"


def _command(args: list[str], steps: int, warmup: int, out: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--synthetic-train-size",
            str(64 * (steps + warmup + 1) * 2), "--limit-train-batches", str(steps + warmup),
            "--limit-eval-batches", "1", "--epochs", "1", "--warmup-batches", str(warmup), "--no-progress",
            "--out", out, *args]


def _summary(returncode: int, stderr: str, command: list[str], out: str) -> dict:
    if returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _ours(args: list[str], steps: int, warmup: int, one_core: bool = False) -> dict:
    """One run of `python -m pipeline train` on synthetic data; its summary."""
    with tempfile.TemporaryDirectory() as out:
        command = _command(args, steps, warmup, out)
        pin = (lambda: os.sched_setaffinity(0, CORES[:1])) if one_core else None
        proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=pin, timeout=1800)
        return _summary(proc.returncode, proc.stderr, command, out)


def _side_by_side(args: list[str], steps: int, warmup: int) -> dict:
    """One single-process run per core, all at once, each pinned to its core: their summed samples/s is what
    this machine gives any scheme of that many one-core processes (perfect balance, no communication)."""
    with tempfile.TemporaryDirectory() as root:
        runs = []
        for core in CORES:
            out = os.path.join(root, str(core))
            command = _command(args, steps, warmup, out)
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda core=core: os.sched_setaffinity(0, [core]))
            runs.append((proc, command, out))
        rates = []
        for proc, command, out in runs:
            stderr = proc.communicate(timeout=1800)[1]
            rates.append(_summary(proc.returncode, stderr, command, out)["train_samples_per_s"])
    return {"train_samples_per_s": sum(rates)}


MICROBATCHES = (1, 2, 4, 8)  # GPipe / 1F1B run at the best of these, as a user tuning the baseline would


def _gpipe(schedule: str, stages: int, steps: int, warmup: int, model: list[str], microbatches: int) -> dict:
    flags = _without(model, "--dim-in-decoder")  # no local heads under backprop
    command = [sys.executable, os.path.join(HERE, "gpipe.py"), "--schedule", schedule, "--stages", str(stages),
               "--microbatches", str(microbatches), "--steps", str(steps), "--warmup", str(warmup),
               "--synthetic-train-size", str(128 * (steps + warmup + 2)), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def contenders(quick: bool) -> list[tuple[str, dict]]:
    """(name, how to run it) for every contender of the mode."""
    ks = [2] if quick else [1, 2, 4]
    transports = ["dist", "zmq", "local"]
    entries = [
        ("sequential, 1 core", {"ours": MLP + ["--threads", "1"], "one_core": True}),
        (SIDE_BY_SIDE, {"ours": MLP + ["--threads", "1"], "side_by_side": True}),
        (f"sequential, {len(CORES)} cores", {"ours": MLP + ["--threads", str(len(CORES))]}),
        ("backprop, 1 core", {"ours": MLP + ["--loss", "backprop", "--threads", "1"], "one_core": True}),
        (f"backprop, {len(CORES)} cores", {"ours": MLP + ["--loss", "backprop", "--threads", str(len(CORES))]}),
    ]
    for k in ks:
        for transport in transports if k > 1 else ["dist"]:
            entries.append((f"pipeline K={k} {transport}", {"ours": MLP + ["--stages", str(k), "--transport", transport], "k": k}))
        if k == 2:  # split heads: block 1's layer on stage 0 and its heads on stage 1 (1.5,2.5), or its heads on
            # stage 0 and its layer on stage 1 (1.5h,2.5: the placement auto picks for this MLP)
            for partition in ("1.5,2.5", "1.5h,2.5"):
                for transport in ("dist", "zmq"):
                    entries.append((f"pipeline K=2 {transport}, split heads {partition}",
                                    {"ours": MLP + ["--stages", "2", "--transport", transport, "--partition", partition], "k": 2}))
        if k > 1:
            entries.append((f"pipeline K={k} zmq, auto partition",
                            {"ours": MLP + ["--stages", str(k), "--transport", "zmq", "--partition", "auto"], "k": k}))
            entries.append((f"GPipe K={k}", {"gpipe": "gpipe", "k": k}))
            entries.append((f"1F1B K={k}", {"gpipe": "1f1b", "k": k}))
    entries += [("sequential, 1 core, MLP 4x1024", {"ours": MLP4 + ["--threads", "1"], "one_core": True}),
                ("pipeline K=2 zmq, MLP 4x1024", {"ours": MLP4 + ["--stages", "2", "--transport", "zmq", "--partition", "auto"], "k": 2})]
    return entries


def measure(spec: dict, steps: int, warmup: int, repeats: int, model: list[str] = MLP) -> dict:
    if "gpipe" in spec and "microbatches" not in spec:  # the baseline at its best micro-batch count
        counts = [m for m in MICROBATCHES if spec["gpipe"] == "gpipe" or m >= spec["k"]]  # 1F1B needs M >= K
        sweep = {m: measure({**spec, "microbatches": m}, steps, warmup, repeats, model) for m in counts}
        best = max(sweep, key=lambda m: sweep[m]["samples_per_s"])
        return {**sweep[best], "microbatches": best,
                "microbatch_sweep": {str(m): r["samples_per_s"] for m, r in sweep.items()}}
    runs = []
    for _ in range(repeats):
        if "gpipe" in spec:
            result = _gpipe(spec["gpipe"], spec["k"], steps, warmup, model, spec["microbatches"])
            runs.append({"samples_per_s": result["samples_per_s"], "peak_rss_mib": result["peak_rss_mib"]})
        else:
            summary = (_side_by_side(spec["ours"], steps, warmup) if spec.get("side_by_side")
                       else _ours(spec["ours"], steps, warmup, spec.get("one_core", False)))
            runs.append({"samples_per_s": summary["train_samples_per_s"], "stage_stats": summary.get("stage_stats")})
    rates = [r["samples_per_s"] for r in runs]
    typical = rates.index(statistics.median_low(rates))  # the run whose stage details are reported
    return {"samples_per_s": statistics.median(rates), "runs": rates, "detail": runs[typical]}


def balance_ceilings(result: dict) -> tuple[float | None, float | None]:
    """Speedup bounds of K=2 placements from the auto profile's measured costs: all of them over the slowest stage's,
    for the best whole-block split and for the best placement with split heads."""
    profile = _profile(result)
    if not profile:
        return None, None
    total = sum(profile["compute_ms"])
    return total / max(profile["whole_blocks_stage_ms"]), total / max(profile["chosen_stage_ms"])


def stage_profile(results: dict) -> list[dict]:
    """Per-stage busy / waiting / blocked / sending fractions and peak memory of the pipeline runs, and GPipe's memory."""
    rows = []
    for name, result in results.items():
        detail = result["detail"]
        for stage in detail.get("stage_stats") or []:
            wall = stage["wall_s"]
            rows.append({"contender": name, "stage": stage["stage"], "busy": stage["busy_fraction"],
                         "waiting_for_input": stage["wait_s"] / wall, "blocked_sending": stage["blocked_s"] / wall,
                         "send_thread": stage["send_s"] / wall, "peak_rss_mib": stage["peak_rss_mib"]})
        for stage, rss in enumerate(detail.get("peak_rss_mib") or []):
            rows.append({"contender": name, "stage": stage, "peak_rss_mib": rss})
    return rows


def even_splits(blocks: int, k: int) -> list[list[int]]:
    """Every contiguous split into k stages whose sizes differ by at most one block."""
    small, extra = divmod(blocks, k)
    return [list(sizes) for sizes in sorted(set(itertools.permutations([small + 1] * extra + [small] * (k - extra))))]


def partition_study(steps: int, warmup: int, repeats: int) -> list[dict]:
    """--partition auto against every even split (sizes within one block), for MLPs and vgg8b at K=2."""
    from pipeline.cli import build_parser, config_from_args
    from pipeline.model.factories import count_blocks

    rows = []
    for label, model in (("mlp 3x1024", MLP), ("mlp 4x1024", MLP4), ("vgg8b x0.25", VGG)):
        blocks = count_blocks(config_from_args(build_parser().parse_args(["train", "--dataset", "synthetic", *model])))
        choices = [("even", ",".join(map(str, sizes))) for sizes in even_splits(blocks, 2)] + [("auto", "auto")]
        for kind, partition in choices:
            flags = model + ["--stages", "2", "--transport", "zmq", "--partition", partition]
            result = measure({"ours": flags}, steps, warmup, repeats)
            stats = result["detail"]["stage_stats"]
            rows.append({"model": label, "partition": kind, "sizes": [s["size"] for s in stats],
                         "samples_per_s": result["samples_per_s"], "runs": result["runs"],
                         "profile": stats[0].get("partition_profile")})
            print(f"  partition {label} {partition}: {result['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
    return rows


def _profile(result: dict) -> dict | None:
    """The --partition auto profile of a pipeline run (None without one)."""
    return next((s["partition_profile"] for s in result["detail"].get("stage_stats") or [] if "partition_profile" in s), None)


def vgg_study(steps: int, warmup: int, repeats: int) -> dict:
    """vgg8b x0.25 at K=2 and K=4: the auto placement (split heads where they pay) against the best whole-block split
    of the same profile, run one after the other; samples/s and their ratio."""
    flags = VGG + ["--transport", "zmq"]
    rows = {"sequential, 1 core": measure({"ours": VGG + ["--threads", "1"], "one_core": True}, steps, warmup, repeats, VGG)}
    for k in (2, 4):
        auto = measure({"ours": flags + ["--stages", str(k), "--partition", "auto"], "k": k}, steps, warmup, repeats, VGG)
        profile = _profile(auto)
        whole = ",".join(str(size) for size in profile["whole_blocks"])
        auto["profile"] = profile
        rows[f"K={k} auto {profile['chosen']}"] = auto
        rows[f"K={k} whole blocks {profile['whole_blocks']}"] = measure(
            {"ours": flags + ["--stages", str(k), "--partition", whole], "k": k}, steps, warmup, repeats, VGG)
    for name, row in rows.items():
        print(f"  vgg8b {name}: {row['samples_per_s']:.1f} samples/s {[round(r, 1) for r in row['runs']]}", file=sys.stderr, flush=True)
    sequential = rows["sequential, 1 core"]["samples_per_s"]
    ratios = {}
    for k in (2, 4):
        auto = next(r for n, r in rows.items() if n.startswith(f"K={k} auto"))
        whole = next(r for n, r in rows.items() if n.startswith(f"K={k} whole"))
        ratios[f"K={k}"] = {"auto_over_whole_blocks": auto["samples_per_s"] / whole["samples_per_s"],
                            "auto_vs_sequential": auto["samples_per_s"] / sequential,
                            "whole_blocks_vs_sequential": whole["samples_per_s"] / sequential,
                            "chosen": auto["profile"]["chosen"], "whole_blocks": auto["profile"]["whole_blocks"],
                            "chosen_stage_ms": auto["profile"]["chosen_stage_ms"],
                            "whole_blocks_stage_ms": auto["profile"]["whole_blocks_stage_ms"]}
    return {"rows": rows, "ratios": ratios}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(names, [results[n]["samples_per_s"] for n in names],
            color=["tab:blue" if n.startswith("pipeline") else "tab:gray" for n in names])
    ax.invert_yaxis()
    ax.set(xlabel="training samples/s (median)", title="MLP 3x1024 on MNIST-shaped data, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/quick")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--partition-only", action="store_true", help="only the --partition auto vs even study")
    parser.add_argument("--vgg-only", action="store_true", help="only vgg8b x0.25: split heads against whole blocks, K=2 and 4")
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 150)
    repeats = args.repeats or (3 if args.quick else 5)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    if args.partition_only:
        rows = partition_study(steps, args.warmup, repeats)
        with open(os.path.join(args.out, "partition.json"), "w") as f:
            json.dump({"machine": {"cores": len(CORES), "cpu": _cpu_name()}, "steps": steps, "repeats": repeats,
                       "partition": rows, "wall_s": time.time() - started}, f, indent=1)
        print_partition(rows)
        return
    if args.vgg_only:
        study = vgg_study(steps, args.warmup, repeats)
        with open(os.path.join(args.out, "vgg.json"), "w") as f:
            json.dump({"machine": {"cores": len(CORES), "cpu": _cpu_name()}, "steps": steps, "repeats": repeats,
                       **study, "wall_s": time.time() - started}, f, indent=1)
        for k, ratio in study["ratios"].items():
            print(f"vgg8b x0.25 {k}: auto {ratio['chosen']} / whole blocks {ratio['whole_blocks']} = "
                  f"{ratio['auto_over_whole_blocks']:.2f} (vs sequential: {ratio['auto_vs_sequential']:.2f} and "
                  f"{ratio['whole_blocks_vs_sequential']:.2f})")
        return
    results = {}
    for name, spec in contenders(args.quick):
        results[name] = measure(spec, steps, args.warmup, repeats)
        print(f"  {name}: {results[name]['samples_per_s']:.0f} samples/s {[round(r) for r in results[name]['runs']]}",
              file=sys.stderr, flush=True)
    sequential = results["sequential, 1 core"]["samples_per_s"]
    gpipe = results["GPipe K=2"]["samples_per_s"]
    k2 = {name.split()[-1]: r["samples_per_s"] for name, r in results.items()
          if name.startswith("pipeline K=2") and "," not in name}
    configurations = {name[len("pipeline K=2 "):]: r["samples_per_s"] for name, r in results.items()
                      if name.startswith("pipeline K=2") and "4x1024" not in name}
    best = max(configurations, key=configurations.get)  # the best K=2 configuration: transport and placement
    whole_ceiling, heads_ceiling = balance_ceilings(results["pipeline K=2 zmq, auto partition"])
    machine = results[SIDE_BY_SIDE]["samples_per_s"] / sequential
    report = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cores": len(CORES), "cpu": _cpu_name()},
        "steps": steps, "warmup": args.warmup, "repeats": repeats,
        "results": results,
        "speedup_vs_sequential": configurations[best] / sequential,
        "speedup_vs_gpipe": configurations[best] / gpipe,  # GPipe at its best micro-batch count (MICROBATCHES swept)
        "gpipe_microbatches": results["GPipe K=2"]["microbatches"],
        "speedup_vs_1f1b": configurations[best] / results["1F1B K=2"]["samples_per_s"],
        "onef1b_microbatches": results["1F1B K=2"]["microbatches"],
        "speedup_vs_backprop_1_core": configurations[best] / results["backprop, 1 core"]["samples_per_s"],
        "k2_best": best,
        "speedup_vs_sequential_by_configuration": {c: v / sequential for c, v in configurations.items()},
        "speedup_vs_sequential_by_transport": {t: v / sequential for t, v in k2.items()},
        "speedup_vs_gpipe_by_transport": {t: v / gpipe for t, v in k2.items()},
        "speedup_vs_sequential_auto_partition": results["pipeline K=2 zmq, auto partition"]["samples_per_s"] / sequential,
        "speedup_vs_sequential_mlp4x1024": results["pipeline K=2 zmq, MLP 4x1024"]["samples_per_s"]
        / results["sequential, 1 core, MLP 4x1024"]["samples_per_s"],
        "stage_profile": stage_profile(results),
        # what K=2 could reach at best: on this machine (N one-core runs side by side), and with whole blocks per
        # stage (the auto partition's measured block costs: all of them over its slowest stage's)
        "machine_ceiling": machine,
        "balance_ceiling_k2": whole_ceiling,
        "balance_ceiling_k2_split_heads": heads_ceiling,
        # both at once: the split-heads placement's balance bound, each of the K processes running at the speed
        # one process has when the machine is full (machine_ceiling / K)
        "combined_ceiling_k2_split_heads": heads_ceiling * machine / 2 if heads_ceiling else None,
    }
    if not args.quick:
        report["partition"] = partition_study(steps, args.warmup, repeats)
    report["wall_s"] = time.time() - started
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, os.path.join(args.out, "throughput.png"))
    print(f"| contender | samples/s (median of {repeats}) | vs sequential, 1 core | vs GPipe K=2 |")
    print("|---|---|---|---|")
    for name, result in results.items():
        rate = result["samples_per_s"]
        if "4x1024" in name:  # compared with its own sequential run
            print(f"| {name} | {rate:.0f} | {rate / results['sequential, 1 core, MLP 4x1024']['samples_per_s']:.2f} | - |")
        else:
            sweep = result.get("microbatch_sweep")
            label = f"{name} ({result['microbatches']} micro-batches; swept {sweep})" if sweep else name
            print(f"| {label} | {rate:.0f} | {rate / sequential:.2f} | {rate / gpipe:.2f} |")
    print(f"\nspeedup_vs_sequential = {report['speedup_vs_sequential']:.2f}, speedup_vs_gpipe = "
          f"{report['speedup_vs_gpipe']:.2f} (tuned: {report['gpipe_microbatches']} micro-batches), speedup_vs_1f1b = "
          f"{report['speedup_vs_1f1b']:.2f} ({report['onef1b_microbatches']}) (K=2: {best}); with --partition auto "
          f"{report['speedup_vs_sequential_auto_partition']:.2f}; MLP 4x1024 (balanced K=2) "
          f"{report['speedup_vs_sequential_mlp4x1024']:.2f}; ceilings: machine {report['machine_ceiling']:.2f}, "
          f"whole-block split {report['balance_ceiling_k2'] or float('nan'):.2f}, split heads "
          f"{report['balance_ceiling_k2_split_heads'] or float('nan'):.2f}, split heads on this machine "
          f"{report['combined_ceiling_k2_split_heads'] or float('nan'):.2f}; {report['wall_s'] / 60:.1f} minutes")
    print_partition(report.get("partition", []))


def print_partition(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| model (K=2, zmq) | partition | blocks per stage | samples/s (median) | vs best even split |")
    print("|---|---|---|---|---|")
    for row in rows:
        best = max(r["samples_per_s"] for r in rows if r["model"] == row["model"] and r["partition"] == "even")
        print(f"| {row['model']} | {row['partition']} | {row['sizes']} | {row['samples_per_s']:.0f} | "
              f"{row['samples_per_s'] / best:.2f} |")


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
