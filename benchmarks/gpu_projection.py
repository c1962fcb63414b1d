"""One-GPU emulation of vgg8b on CIFAR-10-shaped data, and a projection of K-GPU throughput (needs a GPU).

    python benchmarks/gpu_projection.py --out benchmarks/results/gpu

Measures, on the one GPU: the sequential trainer's samples/s; K-stage emulation runs (all stages on the one
GPU, --transport local, so activations stay on it) for K = 2 and 4; and each block's training-step time and
output size (pipeline/engine/profile.py). The projection, labelled as such in the output, assumes one GPU per stage:

    projected samples/s (K GPUs) = B / max over stages k of ( sum of block times in k + bytes_k / link )

where B is the batch size, bytes_k the activation stage k sends on (batch x features x 4 bytes) and link the
assumed GPU-to-GPU bandwidth (NVLink 300 GB/s and PCIe 4.0 x16 25 GB/s, both given). It ignores overlap of
sends with compute (so it is conservative) and contention that one GPU per stage removes.
benchmarks/gpu_check.py reuses train(), block_profile() and projections() for the GPU acceptance run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

LINKS_GB_S = {"nvlink": 300.0, "pcie4x16": 25.0}
PROJECTION_LABEL = "PROJECTION from measured per-block times and activation sizes, one GPU per stage: not a measurement"
VGG = ["--model", "vgg8b", "--num-layers", "1", "--num-hidden", "1024", "--dropout", "0.2", "--nonlin", "leakyrelu",
       "--dim-in-decoder", "2048", "--batch-size", "128", "--dataset", "synthetic", "--synthetic-like", "cifar10"]


def projection(compute_s: list[float], out_bytes: list[int], sizes: tuple[int, ...], batch: int, link_gb_s: float) -> float:
    """Projected samples/s of a K-stage pipeline with one GPU per stage (see the module docstring)."""
    from pipeline.engine.partition import stage_times

    return batch / max(stage_times(compute_s, [b / (link_gb_s * 1e9) for b in out_bytes], sizes))


def train(flags: list[str], timeout: float, out: str | None = None, env: dict | None = None) -> dict:
    """summary.json of `python -m pipeline train FLAGS` in a fresh process (into `out`, else a temporary folder);
    RuntimeError with the end of its stderr when it fails or runs past `timeout` seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        out = out or scratch
        command = [sys.executable, "-m", "pipeline", "train", *flags, "--no-progress", "--out", out]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"ran past {timeout:.0f} s: {' '.join(flags)}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {' '.join(flags)}\n{proc.stderr[-2000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)


def block_profile(flags: list[str], device: str) -> tuple[list[float], list[int], int]:
    """(seconds per training step, fp32 output bytes) of every block of the network FLAGS describe, and its batch size."""
    from pipeline.cli import build_parser, config_from_args
    from pipeline.data import BatchSource
    from pipeline.model.factories import build_blocks
    from pipeline.engine.profile import block_costs

    cfg = config_from_args(build_parser().parse_args(["train", *flags, "--device", device]))
    compute = block_costs(cfg, torch.device(device)).compute
    shape, classes = BatchSource.shape_of(cfg.data)
    with torch.no_grad():
        x, out_bytes = torch.zeros(cfg.data.batch_size, *shape, device=device), []
        for block in build_blocks(cfg, shape, classes, device=torch.device(device)):
            x = block(x)
            out_bytes.append(x.numel() * x.element_size())
    return compute, out_bytes, cfg.data.batch_size


def projections(compute: list[float], out_bytes: list[int], batch: int, ks: tuple[int, ...] = (2, 4)) -> dict[str, float]:
    """Projected samples/s for K GPUs, the even and the balanced split, over each link in LINKS_GB_S."""
    from pipeline.engine.partition import balanced_partition, resolve_partition

    projected = {}
    for k in ks:
        for sizes, label in ((tuple(len(r) for r in resolve_partition(len(compute), k, None)), "even"),
                             (balanced_partition(compute, [0.0] * len(compute), k), "balanced")):
            for link, speed in LINKS_GB_S.items():
                projected[f"K={k} {label} {list(sizes)} over {link}"] = projection(compute, out_bytes, sizes, batch, speed)
    return projected


def _run(flags: list[str], steps: int) -> dict:
    return train([*VGG, "--device", "cuda", "--synthetic-train-size", str(128 * (steps + 12)), "--limit-train-batches",
                  str(steps + 10), "--limit-eval-batches", "2", "--warmup-batches", "10", *flags], timeout=1800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--project-only", action="store_true",
                        help="only the K = 2, 4, 8 projection of local learning against GPipe/1F1B (benchmarks/pipeline_projection.py)")
    parser.add_argument("--device", default="cuda", help="--project-only: where the costs are measured")
    args = parser.parse_args()
    if args.project_only:
        from pipeline_projection import run

        run(args.device, "0.25", "32", os.path.join(args.out, "projection") if args.device == "cuda" else "benchmarks/results/projection")
        return
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (run this on a machine with one)", file=sys.stderr)
        sys.exit(2)
    compute, out_bytes, batch = block_profile(VGG, "cuda")
    report = {"gpu": torch.cuda.get_device_name(), "block_ms": [1e3 * c for c in compute], "block_output_bytes": out_bytes,
              "measured": {"sequential": _run([], args.steps)["train_samples_per_s"]},
              "projected": projections(compute, out_bytes, batch), "projection_label": PROJECTION_LABEL}
    from pipeline_projection import run as project_heads  # K = 2, 4, 8: whole blocks, split heads, GPipe/1F1B bubbles

    report["split_heads_projection"] = project_heads("cuda", "1", "128", os.path.join(args.out, "projection"))
    for k in (2, 4):
        report["measured"][f"one-GPU emulation K={k}"] = _run(["--stages", str(k), "--transport", "local"], args.steps)["train_samples_per_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_projection.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"GPU: {report['gpu']}")
    for name, rate in report["measured"].items():
        print(f"measured  {name}: {rate:.0f} samples/s")
    for name, rate in report["projected"].items():
        print(f"PROJECTED {name}: {rate:.0f} samples/s (a projection from per-block times, not a measurement)")


if __name__ == "__main__":
    main()
