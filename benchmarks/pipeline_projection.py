"""PROJECTION of K-device throughput for vgg8b: local learning (whole blocks, split heads) against GPipe / 1F1B.

    python benchmarks/gpu_projection.py --project-only --device cpu    # from this CPU's costs (this module)
    python benchmarks/gpu_projection.py --out benchmarks/results/gpu     # on a GPU: measured runs and this projection

From costs measured on one device (one process, one block at a time), with one device per stage:
- local learning: every block's layer and heads timed apart (pipeline/profile.py); the best whole-block placement
  and the best placement with split heads (pipeline/partition.py), each at batch B / its slowest stage;
- GPipe and 1F1B: every block's forward + backward + step under global backprop, timed at the micro-batch size
  B/M for M = 1, 2, 4, 8; the best contiguous split of those costs, and a batch takes (M + K - 1) micro-batch
  slots of the slowest stage: the bubble (K-1)/(M+K-1). 1F1B has GPipe's bubble (it saves memory, not time).
Sends are priced as the profile prices them on this device; no overlap, contention or link limits are modelled.
These are projections, not measurements; benchmarks/run.py measures what this machine can run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

LABEL = "PROJECTION from per-block costs measured on one device, one device per stage: not a measurement"
MICROBATCHES = (1, 2, 4, 8)


def _config(flags: list[str]):
    from pipeline.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["train", "--dataset", "synthetic", *flags]))


def backprop_costs(flags: list[str], device: torch.device, batch: int, rounds: int = 5) -> list[float]:
    """Seconds per block of forward + backward + optimizer step under global backprop at batch size `batch` (the
    median of `rounds` after one untimed round): the gradient at each block's output is given, as a pipeline stage
    receives it."""
    from pipeline.data import BatchSource
    from pipeline.factories import build_blocks
    from pipeline.profile import timed

    cfg = _config(flags + ["--loss", "backprop", "--batch-size", str(batch)])
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks = build_blocks(cfg, shape, classes, device=device)
    x0, y = torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device)
    samples: list[list[float]] = [[] for _ in blocks]
    for round_ in range(rounds + 1):
        inputs, outputs, times = [], [], []
        x = x0
        for block in blocks:  # forward, each block's input a leaf so that its backward can be timed alone
            x = x.detach().requires_grad_(True)
            held = []
            times.append(timed(lambda block=block, x=x: held.append(block.forward_train(x)[1]), device))
            inputs.append(x)
            outputs.append(held[0])
            x = held[0]
        grad = torch.autograd.grad(torch.nn.functional.cross_entropy(outputs[-1].float(), y), outputs[-1])[0]
        for index in reversed(range(len(blocks))):
            def backward(index=index, grad=grad) -> None:
                outputs[index].backward(grad)
                blocks[index].optimizer.step()
                blocks[index].optimizer.zero_grad(set_to_none=True)
            times[index] += timed(backward, device)
            grad = inputs[index].grad
        if round_:
            for index, elapsed in enumerate(times):
                samples[index].append(elapsed)
    return [sorted(s)[len(s) // 2] for s in samples]


def project(flags: list[str], device: torch.device, ks: tuple[int, ...]) -> dict:
    from pipeline.partition import balanced_partition, balanced_placement, stage_times
    from pipeline.profile import block_costs, send_path

    cfg = _config(flags)
    batch = cfg.data.batch_size
    costs = block_costs(cfg, device, path=send_path(device, "dist", "nccl" if device.type == "cuda" else "gloo"))
    splittable = [h > 0 for h in costs.heads]
    backprop = {m: backprop_costs(flags, device, batch // m) for m in MICROBATCHES if batch % m == 0}
    report = {"label": LABEL, "device": str(device), "flags": flags, "batch": batch,
              "local_layer_ms": [1e3 * c for c in costs.layer], "local_heads_ms": [1e3 * c for c in costs.heads],
              "local_send_ms": [1e3 * c for c in costs.send], "local_send_h_ms": [1e3 * c for c in costs.send_h],
              "backprop_block_ms": {str(m): [1e3 * c for c in v] for m, v in backprop.items()},
              "sequential_local_samples_per_s": batch / sum(costs.compute),
              "sequential_backprop_samples_per_s": batch / sum(backprop[1]), "projected": {}}
    for k in ks:
        placement, times = balanced_placement(costs.layer, costs.heads, costs.send, costs.send_h, splittable, k, margin=0.0)
        row = {"local split heads": {"sizes": list(placement.entries), "samples_per_s": batch / max(times)}}
        if k <= len(costs.compute):  # whole blocks, and a backprop stage per block at most
            whole = balanced_partition(costs.compute, costs.send, k)
            row["local whole blocks"] = {"sizes": list(whole),
                                         "samples_per_s": batch / max(stage_times(costs.compute, costs.send, whole))}
            options = {}
            for m, per_block in backprop.items():
                split = balanced_partition(per_block, [0.0] * len(per_block), k)
                slot = max(stage_times(per_block, [0.0] * len(per_block), split))
                options[m] = {"sizes": list(split), "bubble": (k - 1) / (m + k - 1),
                              "samples_per_s": batch / ((m + k - 1) * slot)}
            best = max(options, key=lambda m: options[m]["samples_per_s"])
            row["GPipe / 1F1B"] = {**options[best], "microbatches": best,
                                   "sweep": {str(m): o["samples_per_s"] for m, o in options.items()}}
        report["projected"][f"K={k}"] = row
    pays = [k for k in ks if "GPipe / 1F1B" in report["projected"][f"K={k}"]
            and report["projected"][f"K={k}"]["local split heads"]["samples_per_s"]
            >= report["projected"][f"K={k}"]["GPipe / 1F1B"]["samples_per_s"]]
    report["local_pays_from_k"] = pays[0] if pays else None
    return report


def run(device_name: str, feat_mult: str, batch: str, out: str) -> dict:
    """Measure, project, write projection.json under `out` and print the table."""
    device = torch.device(device_name)
    torch.set_num_threads(1)
    flags = ["--model", "vgg8b", "--feat-mult", feat_mult, "--num-layers", "1", "--num-hidden", "256",
             "--dropout", "0.1", "--nonlin", "leakyrelu", "--batch-size", batch, "--dim-in-decoder", "1024",
             "--synthetic-like", "cifar10", "--device", device_name, "--threads", "1"]
    report = project(flags, device, (2, 4, 8))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "projection.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{LABEL}\nvgg8b x{feat_mult}, batch {batch}, costs from {device}; sequential local "
          f"{report['sequential_local_samples_per_s']:.1f} samples/s, sequential backprop "
          f"{report['sequential_backprop_samples_per_s']:.1f}\n")
    print("| K | local, whole blocks | local, split heads | GPipe / 1F1B (best M, bubble) |")
    print("|---|---|---|---|")
    for k, row in report["projected"].items():
        whole, split, gpipe = row.get("local whole blocks"), row["local split heads"], row.get("GPipe / 1F1B")
        cells = [f"{whole['samples_per_s']:.1f} {whole['sizes']}" if whole else "-",
                 f"{split['samples_per_s']:.1f} {split['sizes']}",
                 f"{gpipe['samples_per_s']:.1f} (M={gpipe['microbatches']}, {gpipe['bubble']:.2f})" if gpipe else "-"]
        print(f"| {k[2:]} | " + " | ".join(cells) + " |")
    pays = report["local_pays_from_k"]
    print(f"\nlocal learning's missing bubble pays for its heads from K={pays} on" if pays
          else "\nat no K projected here does local learning's missing bubble pay for its heads")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--feat-mult", default="0.25")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--out", default="benchmarks/results/projection")
    args = parser.parse_args()
    run(args.device, args.feat_mult, args.batch_size, args.out)


if __name__ == "__main__":
    main()
