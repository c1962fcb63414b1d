"""PROJECTION of K-device throughput for vgg8b: local learning (whole blocks, split heads) against GPipe / 1F1B.

    python benchmarks/gpu_projection.py --project-only --device cpu    # from this CPU's costs (this module)
    python benchmarks/gpu_projection.py --out benchmarks/results/gpu     # on a GPU: measured runs and this projection

From costs measured on one device (one process, one block at a time), with one device per stage:
- local learning: every block's layer and heads timed apart (pipeline/engine/profile.py); the best whole-block placement
  and the best placement with split heads (pipeline/engine/partition.py), each at batch B / its slowest stage;
  the exact schedule is held to each split block's serial chain (layer, heads and the messages between them,
  partition.split_chain); without it (--heads-max-delay >= 1) a split can run as its stage times say;
- GPipe and 1F1B: every block's forward, and backward + step, under global backprop, timed at the micro-batch
  size B/M for every M up to the batch size; the best contiguous split of those costs, and the step simulated on
  them in each schedule's order (benchmarks/schedule_sim.py; with unequal stages GPipe takes
  sum of the stages + (M-1) x the slowest, not (M+K-1) x the slowest).
Sends are priced alike for all: an activation costs what the profile measured for this block's output at the
batch size, a micro-batch's 1/M of it, a gradient the same again; no overlap, contention or link limits are
modelled.
These are projections, not measurements; benchmarks/run.py measures what this machine can run.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

CHEAP_HEADS = ["--sim-pool", "4"]
LABEL = "PROJECTION from per-block costs measured on one device, one device per stage: not a measurement"


def _config(flags: list[str]):
    from pipeline.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["train", "--dataset", "synthetic", *flags]))


def backprop_costs(flags: list[str], device: torch.device, batch: int, rounds: int = 5) -> tuple[list[float], list[float]]:
    """Seconds per block of the forward, and of the backward + optimizer step, under global backprop at batch size
    `batch` (medians of `rounds` after one untimed round): the gradient at each block's output is given, as a
    pipeline stage receives it."""
    from pipeline.data import BatchSource
    from pipeline.model.factories import build_blocks
    from pipeline.engine.profile import timed

    cfg = _config(flags + ["--loss", "backprop", "--batch-size", str(batch)])
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks = build_blocks(cfg, shape, classes, device=device)
    x0, y = torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device)
    forward: list[list[float]] = [[] for _ in blocks]
    backward: list[list[float]] = [[] for _ in blocks]
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
        back = [0.0] * len(blocks)
        for index in reversed(range(len(blocks))):
            def step(index=index, grad=grad) -> None:
                outputs[index].backward(grad)
                blocks[index].optimizer.step()
                blocks[index].optimizer.zero_grad(set_to_none=True)
            back[index] = timed(step, device)
            grad = inputs[index].grad
        if round_:
            for index in range(len(blocks)):
                forward[index].append(times[index])
                backward[index].append(back[index])
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    return [median(v) for v in forward], [median(v) for v in backward]


def _contiguous_stages(costs: list[float], sizes: list[int]) -> list[float]:
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def project(flags: list[str], device: torch.device, ks: tuple[int, ...]) -> dict:
    """Every contender at every K, from the same measured per-block costs, sends priced alike: a batch's activation
    costs what the profile measured for it (send_ms), a micro-batch's 1/M of that, its gradient the same again."""
    try:  # run as a script (benchmarks/ on the path) or imported from the repository's root
        from schedule_sim import gpipe_closed_form, local_step_time, step_time
    except ImportError:
        from benchmarks.schedule_sim import gpipe_closed_form, local_step_time, step_time
    from pipeline.engine.partition import balanced_partition, balanced_placement, split_chain, stage_times
    from pipeline.engine.profile import block_costs, send_path

    cfg = _config(flags)
    batch = cfg.data.batch_size
    path = send_path(device, "dist", "nccl" if device.type == "cuda" else "gloo")
    costs = block_costs(cfg, device, path=path)
    cheap = block_costs(_config(flags + CHEAP_HEADS), device, path=path)  # the heads pooled 4 x 4 (--sim-pool 4)
    splittable = [h > 0 for h in costs.heads]
    # M up to the batch size, as long as a micro-batch has 2 examples: batch norm cannot train on one
    counts = [m for m in (2 ** i for i in range(batch.bit_length())) if batch % m == 0 and batch // m >= 2]
    backprop = {m: backprop_costs(flags, device, batch // m) for m in counts}
    report = {"label": LABEL, "device": str(device), "flags": flags, "batch": batch,
              "local_layer_ms": [1e3 * c for c in costs.layer], "local_heads_ms": [1e3 * c for c in costs.heads],
              "local_send_ms": [1e3 * c for c in costs.send], "local_send_h_ms": [1e3 * c for c in costs.send_h],
              "backprop_forward_ms": {str(m): [1e3 * c for c in v[0]] for m, v in backprop.items()},
              "backprop_backward_ms": {str(m): [1e3 * c for c in v[1]] for m, v in backprop.items()},
              "sequential_local_samples_per_s": batch / sum(costs.compute),
              "sequential_backprop_samples_per_s": batch / (sum(backprop[1][0]) + sum(backprop[1][1])), "projected": {}}
    for k in ks:
        row = {}
        for name, exact in (("local split heads (exact)", True), ("local split heads, --heads-max-delay >= 1", False)):
            placement, times = balanced_placement(costs.layer, costs.heads, costs.send, costs.send_h, splittable, k,
                                                  margin=0.0, exact=exact)
            row[name] = {"sizes": list(placement.entries), "samples_per_s": batch / max(times),
                         "stage_ms": [1e3 * t for t in times]}
            if exact:  # the simulation's check: the slowest stage, or a split block's serial chain
                chains = [split_chain(costs.layer, costs.heads, costs.send, costs.send_h, b // 2, k in placement.heads_first)
                          for k, (_, b) in enumerate(placement.bounds[:-1]) if b % 2]
                row[name]["simulated_samples_per_s"] = batch / local_step_time(times, chains)
        placement, times = balanced_placement(cheap.layer, cheap.heads, cheap.send, cheap.send_h, splittable, k, margin=0.0)
        row["local, --sim-pool 4 (exact)"] = {"sizes": list(placement.entries), "samples_per_s": batch / max(times)}
        if k <= len(costs.compute):  # whole blocks, and a backprop stage per block at most
            whole = balanced_partition(costs.compute, costs.send, k)
            row["local whole blocks"] = {"sizes": list(whole),
                                         "samples_per_s": batch / max(stage_times(costs.compute, costs.send, whole))}
            for schedule in ("gpipe", "1f1b"):
                options = {}
                for m, (forward, backward) in backprop.items():
                    if schedule == "1f1b" and m < k:
                        continue  # torch.distributed.pipelining's 1F1B needs M >= K
                    split = balanced_partition([f + b for f, b in zip(forward, backward)], [0.0] * len(forward), k)
                    f_stage, b_stage = _contiguous_stages(forward, list(split)), _contiguous_stages(backward, list(split))
                    send = [costs.send[sum(split[:j + 1]) - 1] / m for j in range(k)]
                    seconds = step_time(schedule, f_stage, b_stage, send, m)
                    options[m] = {"sizes": list(split), "samples_per_s": batch / seconds,
                                  "closed_form_samples_per_s": batch / gpipe_closed_form(f_stage, b_stage, m),
                                  "bubble": 1 - m * sum(f + b for f, b in zip(f_stage, b_stage)) / (k * seconds)}
                best = max(options, key=lambda m: options[m]["samples_per_s"])
                row["GPipe" if schedule == "gpipe" else "1F1B"] = {
                    **options[best], "microbatches": best, "sweep": {str(m): o["samples_per_s"] for m, o in options.items()}}
        report["projected"][f"K={k}"] = row
    for name in ("local split heads (exact)", "local, --sim-pool 4 (exact)"):
        wins = [k for k in ks if "GPipe" in report["projected"][f"K={k}"]
                and report["projected"][f"K={k}"][name]["samples_per_s"]
                >= max(report["projected"][f"K={k}"][p]["samples_per_s"] for p in ("GPipe", "1F1B"))]
        report["local_wins_at_k" if "split" in name else "cheap_heads_win_at_k"] = wins
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
    print("| K | local, whole blocks | local, split heads (exact) | local, split heads (needs --heads-max-delay >= 1) | "
          "local, --sim-pool 4 (exact) | GPipe (best M, bubble) | 1F1B (best M, bubble) |")
    print("|---|---|---|---|---|---|---|")
    for k, row in report["projected"].items():
        whole, exact = row.get("local whole blocks"), row["local split heads (exact)"]
        delayed, cheap = row["local split heads, --heads-max-delay >= 1"], row["local, --sim-pool 4 (exact)"]
        cells = [f"{whole['samples_per_s']:.1f} {whole['sizes']}" if whole else "-",
                 f"{exact['samples_per_s']:.1f} {exact['sizes']}", f"{delayed['samples_per_s']:.1f} {delayed['sizes']}",
                 f"{cheap['samples_per_s']:.1f} {cheap['sizes']}"]
        for peer in ("GPipe", "1F1B"):
            p = row.get(peer)
            cells.append(f"{p['samples_per_s']:.1f} (M={p['microbatches']}, {p['bubble']:.2f})" if p else "-")
        print(f"| {k[2:]} | " + " | ".join(cells) + " |")
    for key, what in (("local_wins_at_k", "with the reference's heads"), ("cheap_heads_win_at_k", "with --sim-pool 4")):
        wins = report[key]
        print(f"exact local learning {what} matches or beats GPipe and 1F1B at their best M at K = "
              f"{', '.join(map(str, wins))} (of {', '.join(k[2:] for k in report['projected'])})" if wins
              else f"at no K projected here does exact local learning {what} beat GPipe and 1F1B at their best M")
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
