"""One-GPU emulation of vgg8b on CIFAR-10-shaped data, and a projection of K-GPU throughput (needs a GPU).

    python benchmarks/gpu_projection.py --out benchmarks/results/gpu

Measures, on the one GPU: the sequential trainer's samples/s; K-stage emulation runs (all stages on the one
GPU, --transport local, so activations stay on it) for K = 2 and 4; and each block's training-step time and
output size (pipeline/profile.py). The projection, labelled as such in the output, assumes one GPU per stage:

    projected samples/s (K GPUs) = B / max over stages k of ( sum of block times in k + bytes_k / link )

where B is the batch size, bytes_k the activation stage k sends on (batch x features x 4 bytes) and link the
assumed GPU-to-GPU bandwidth (NVLink 300 GB/s and PCIe 4.0 x16 25 GB/s, both given). It ignores overlap of
sends with compute (so it is conservative) and contention that one GPU per stage removes.
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
VGG = ["--model", "vgg8b", "--num-layers", "1", "--num-hidden", "1024", "--dropout", "0.2", "--nonlin", "leakyrelu",
       "--dim-in-decoder", "2048", "--batch-size", "128", "--dataset", "synthetic", "--synthetic-like", "cifar10"]


def projection(compute_s: list[float], out_bytes: list[int], sizes: tuple[int, ...], batch: int, link_gb_s: float) -> float:
    """Projected samples/s of a K-stage pipeline with one GPU per stage (see the module docstring)."""
    from pipeline.partition import stage_times

    return batch / max(stage_times(compute_s, [b / (link_gb_s * 1e9) for b in out_bytes], sizes))


def _run(flags: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pipeline", "train", *VGG, "--device", "cuda", "--synthetic-train-size",
                   str(128 * (steps + 12)), "--limit-train-batches", str(steps + 10), "--limit-eval-batches", "2",
                   "--warmup-batches", "10", "--no-progress", "--out", out, *flags]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (run this on a machine with one)", file=sys.stderr)
        sys.exit(2)
    from pipeline.cli import build_parser, config_from_args
    from pipeline.models import build_blocks
    from pipeline.partition import balanced_partition, resolve_partition
    from pipeline.profile import block_costs

    cfg = config_from_args(build_parser().parse_args(["train", *VGG, "--device", "cuda"]))
    device = torch.device("cuda")
    compute, _ = block_costs(cfg, device)
    shape = (cfg.data.batch_size, 3, 32, 32)
    with torch.no_grad():
        x, out_bytes = torch.zeros(shape, device=device), []
        for block in build_blocks(cfg, (3, 32, 32), 10, device=device):
            x = block(x)
            out_bytes.append(x.numel() * x.element_size())
    report = {"gpu": torch.cuda.get_device_name(), "block_ms": [1e3 * c for c in compute], "block_output_bytes": out_bytes,
              "measured": {"sequential": _run([], args.steps)["train_samples_per_s"]}, "projected": {}}
    for k in (2, 4):
        report["measured"][f"one-GPU emulation K={k}"] = _run(["--stages", str(k), "--transport", "local"], args.steps)["train_samples_per_s"]
        for sizes, label in ((tuple(len(r) for r in resolve_partition(len(compute), k, None)), "even"),
                             (balanced_partition(compute, [0.0] * len(compute), k), "balanced")):
            for link, speed in LINKS_GB_S.items():
                report["projected"][f"K={k} {label} {list(sizes)} over {link}"] = projection(compute, out_bytes, sizes, cfg.data.batch_size, speed)
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
