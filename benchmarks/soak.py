"""Soak: run a pipeline for a set time; report its throughput and every process's resident memory over time.

    python benchmarks/soak.py --minutes 20 --out benchmarks/results/soak

The run trains on synthetic MNIST-shaped data in short epochs (so metrics.jsonl gives throughput over time),
is sampled every --interval seconds (/proc/<pid>/status VmRSS of the launcher and of each stage-<k> process),
and is stopped with SIGTERM at the end (a clean stop). Memory is "flat" when, after the warm-up, every process
stays within 5% of its mean.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from pipeline.run.runtime import stage_processes


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


def flatness(samples: list[float]) -> float:
    """Largest deviation from the mean, as a fraction of the mean."""
    mean = statistics.fmean(samples)
    return max(abs(s - mean) for s in samples) / mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--transport", default="zmq")
    parser.add_argument("--out", default="benchmarks/results/soak")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    run_dir = os.path.join(args.out, "run")
    command = [sys.executable, "-m", "pipeline", "train", "--model", "mlp", "--num-layers", "3", "--num-hidden", "256",
               "--dropout", "0.1", "--dataset", "synthetic", "--synthetic-train-size", "12800", "--synthetic-test-size", "512",
               "--epochs", "1000000", "--stages", str(args.stages), "--transport", args.transport, "--no-progress",
               "--out", run_dir]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    samples = []
    print("| minute | " + " | ".join(["launcher"] + [f"stage-{k}" for k in range(args.stages)]) + " (RSS MiB) |")
    print("|---|" + "---|" * (args.stages + 1))
    while time.monotonic() - started < args.minutes * 60 and proc.poll() is None:
        time.sleep(args.interval)
        pids = {"launcher": proc.pid, **{f"stage-{rank}": pid for rank, pid in stage_processes(proc.pid).items()}}
        sample = {"t_s": time.monotonic() - started, **{name: rss_mib(pid) for name, pid in pids.items()}}
        samples.append(sample)
        if int(sample["t_s"] // 60) != int((sample["t_s"] - args.interval) // 60):
            print(f"| {sample['t_s'] / 60:.0f} | " + " | ".join(f"{sample.get(n) or 0:.0f}" for n in
                  ["launcher"] + [f"stage-{k}" for k in range(args.stages)]) + " |", flush=True)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    epochs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    warm = [s for s in samples if s["t_s"] >= args.warmup_minutes * 60]
    names = ["launcher"] + [f"stage-{k}" for k in range(args.stages)]
    memory = {n: {"mean_mib": statistics.fmean(s[n] for s in warm), "max_deviation": flatness([s[n] for s in warm])}
              for n in names if all(s.get(n) for s in warm)}
    rates = [e["train_samples_per_s"] for e in epochs if e["train_samples_per_s"]]
    per_minute: dict[int, list[float]] = {}
    for e in epochs:
        if e["train_samples_per_s"]:
            per_minute.setdefault(int(e["wall_s"] // 60), []).append(e["train_samples_per_s"])
    minute_rates = [statistics.fmean(v) for _, v in sorted(per_minute.items())]
    result = {"minutes": args.minutes, "stages": args.stages, "transport": args.transport, "exit_code": proc.returncode,
              "epochs": len(epochs), "memory_after_warmup": memory, "samples": samples,
              "throughput": {"mean": statistics.fmean(rates), "cv": statistics.pstdev(rates) / statistics.fmean(rates),
                             "per_minute": minute_rates}}
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nexit code {proc.returncode} after {len(epochs)} epochs; throughput {result['throughput']['mean']:.0f} samples/s "
          f"(coefficient of variation {result['throughput']['cv']:.1%}; per-minute means "
          f"{min(minute_rates):.0f}..{max(minute_rates):.0f})")
    for name, m in memory.items():
        print(f"{name}: {m['mean_mib']:.0f} MiB after warm-up, largest deviation {m['max_deviation']:.1%}")
    plot(samples, names, minute_rates, os.path.join(args.out, "soak.png"))
    if proc.returncode != 0:
        print(stderr[-2000:], file=sys.stderr)


def plot(samples, names, minute_rates, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        mem.plot([s["t_s"] / 60 for s in samples], [s.get(name) for s in samples], label=name)
    mem.set(xlabel="minutes", ylabel="resident memory (MiB)", title="memory per process", ylim=(0, None))
    mem.legend(fontsize=8)
    rate.plot(range(len(minute_rates)), minute_rates, marker=".")
    rate.set(xlabel="minute", ylabel="training samples/s", title="throughput", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
