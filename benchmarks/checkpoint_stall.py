"""Checkpoint stall: how long each stage's compute thread stops to write its part of a checkpoint, against one
training batch's compute on that stage.

    python benchmarks/checkpoint_stall.py --out benchmarks/results/checkpoint_stall     # vgg8b x1, CIFAR shapes, K=2, 4

Each run trains vgg8b x1 on synthetic CIFAR-shaped batches of 128 with --checkpoint-every N into a folder on this
machine's disk, and reads from each stage's stage_stats: checkpoint_s (per checkpoint, the seconds its compute
thread spent from the marker to its file durable and its own part handed on), checkpoint_bytes, and compute_s over
the batches it trained (one eval batch: its compute is a rounding error). The stage counts run round-robin, R
times; the table gives the median and the range over runs of each stage's median stall. Writes results.json,
table.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.persistence.checkpoint import latest_checkpoint  # noqa: E402

MODEL = ["--model", "vgg8b", "--feat-mult", "1", "--dropout", "0.1", "--synthetic-like", "cifar10"]


def _run(stages: int, batch: int, batches: int, every: int, folder: str, extra: list[str]) -> list[dict]:
    out, ckpt = os.path.join(folder, "out"), os.path.join(folder, "ckpt")
    command = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", *MODEL, "--batch-size", str(batch),
               "--synthetic-train-size", str(batch * batches), "--synthetic-test-size", str(batch),
               "--limit-eval-batches", "1", "--epochs", "1", "--no-progress", "--stages", str(stages),
               "--transport", "dist", "--checkpoint-dir", ckpt, "--checkpoint-every", str(every), "--out", out, *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        stats = sorted(json.load(f)["stage_stats"], key=lambda s: s["stage"])
    sizes = {entry["stage"]: entry["bytes"] for entry in latest_checkpoint(ckpt)[1]["files"]}
    return [{"stage": s["stage"], "stall_s": statistics.median(s["checkpoint_s"]), "checkpoints": len(s["checkpoint_s"]),
             # a version that wrote in line (no writer thread) has no separate write time: its stall is the write
             "write_s": statistics.median(s.get("checkpoint_write_s") or [float("nan")]),
             "checkpoint_mib": sizes[s["stage"]] / 2 ** 20,
             "batch_compute_s": s["compute_s"] / batches} for s in stats]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=12, help="training batches per run")
    p.add_argument("--every", type=int, default=4, help="--checkpoint-every")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train options (e.g. --threads 1)")
    p.add_argument("--out", default="benchmarks/results/checkpoint_stall")
    a = p.parse_args()
    runs: dict[int, list[list[dict]]] = {k: [] for k in a.stages}
    for repeat in range(a.repeats):  # round-robin: the machine's drift spreads over every stage count alike
        for stages in a.stages:
            with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKPOINT_STALL_DIR")) as folder:
                runs[stages].append(_run(stages, a.batch_size, a.batches, a.every, folder, a.extra))
            print(f"repeat {repeat + 1}/{a.repeats}, K={stages}: done", file=sys.stderr, flush=True)
    rows = []
    for stages, repeats in runs.items():
        for rank in range(stages):
            stalls = [r[rank]["stall_s"] for r in repeats]
            computes = [r[rank]["batch_compute_s"] for r in repeats]
            writes = [r[rank]["write_s"] for r in repeats]
            rows.append({"stages": stages, "stage": rank, "checkpoint_mib": repeats[0][rank]["checkpoint_mib"],
                         "write_s_median": statistics.median(writes),
                         "stall_s_median": statistics.median(stalls), "stall_s_range": [min(stalls), max(stalls)],
                         "batch_compute_s_median": statistics.median(computes),
                         "stall_per_batch": statistics.median(stalls) / statistics.median(computes)})
    lines = ["| K | stage | its checkpoint (MiB) | stall per checkpoint (s), median [range] | its write, on the writer thread (s) "
             "| one batch's compute (s) | stall / batch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["stall_s_range"]
        lines.append(f"| {r['stages']} | {r['stage']} | {r['checkpoint_mib']:.1f} | {r['stall_s_median']:.3f} [{lo:.3f}, {hi:.3f}] "
                     f"| {r['write_s_median']:.3f} | {r['batch_compute_s_median']:.3f} | {r['stall_per_batch']:.3f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"config": vars(a), "rows": rows, "runs": {str(k): v for k, v in runs.items()}}, f, indent=1)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
