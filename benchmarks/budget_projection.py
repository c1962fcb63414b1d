"""PROJECTION under a per-device memory budget: what each backprop pipeline can afford against local learning.

    python benchmarks/budget_projection.py --out benchmarks/results/budget_projection     # this CPU's costs

For vgg8b and resnet18 (CIFAR-10-shaped, batch B) at K = 4 and 8, from costs measured on one device, one block at
a time (a projection, not a measurement: one device per stage assumed, no fragmentation, no workspace):
- time: every block's forward and backward + step under global backprop at the micro-batch size B/M for every M
  (pipeline_projection.backprop_costs), and every block's layer and heads under local learning (profile.block_costs);
- memory, per block at batch B (pipeline/observe/memory.py's meter): what autograd saves for backward (under backprop the
  block's forward graph; under local learning its layer's and its heads'), its parameters (with their gradients
  and Adam's two moments: 4x) and its output.
Per device, stage k of the best contiguous split by time:
- GPipe holds every micro-batch's graph until the backward: saved_k(B), whatever M;
- 1F1B (torch's Schedule1F1B) holds min(M, K - k) micro-batches' graphs: saved_k(B) x min(M, K - k) / M;
- both also the stage outputs of those micro-batches (kept for their backward) and 4 x their parameters;
- ours, lean order, whole blocks: one block's graph at a time at the whole batch (the similarity loss needs it),
  the largest of its blocks' layer + heads (the input message among what it saves); 3 x the parameters of its
  layers and heads and one block's gradients at a time; the batch's output message.
Under each budget every peer runs at its fastest M whose every stage fits (its bubble and samples/s from the
simulated schedule, benchmarks/schedule_sim.py, sends priced as in pipeline_projection.py); ours fits or not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_projection import _config, _contiguous_stages, backprop_costs  # noqa: E402
from schedule_sim import step_time  # noqa: E402

LABEL = "PROJECTION under a memory budget, from per-block costs measured on one device: not a measurement"
MIB = 2 ** 20
MODELS = {"vgg8b x1": ["--model", "vgg8b", "--feat-mult", "1"], "vgg8b x0.5": ["--model", "vgg8b", "--feat-mult", "0.5"],
          "resnet18": ["--model", "resnet18"]}
HEADS = {"the reference's heads": [], "--sim-pool 4": ["--sim-pool", "4"]}


def block_memory(flags: list[str], device: torch.device) -> list[dict]:
    """Per block at the batch size: bytes saved for backward (layer and heads), parameter bytes, output bytes."""
    from pipeline.block.blocks import train_blocks
    from pipeline.data import BatchSource
    from pipeline.model.factories import build_blocks
    from pipeline.observe.memory import MemoryMeter

    cfg = _config(flags)
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks = build_blocks(cfg, shape, classes, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.data.batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, classes, (cfg.data.batch_size,), generator=gen).to(device)
    rows = []
    for block in blocks:
        meter = MemoryMeter().attach([block])
        local = cfg.loss.loss != "backprop"
        with meter.saving():
            if local:
                out = train_blocks([block], x, y)  # forward, local loss, backward, step: the peak is kept
                saved = {"layer": meter.report()["saved_peak_layer_bytes"], "heads": meter.report()["saved_peak_heads_bytes"]}
            else:
                out = block.forward_train(x)[1]
                saved = {"layer": meter.saved_now(), "heads": 0}
        rows.append({"saved": saved, "parameter_bytes": sum(p.nbytes for p in block.parameters()),
                     "input_bytes": x.nbytes, "output_bytes": out.nbytes})
        x = out.detach()
    return rows


def peer_memory(blocks: list[dict], sizes: list[int], m: int, k_total: int, schedule: str) -> list[float]:
    """Bytes per stage of a backprop pipeline at M micro-batches."""
    stages, begin = [], 0
    for k, size in enumerate(sizes):
        mine = blocks[begin:begin + size]
        begin += size
        held = m if schedule == "gpipe" else min(m, k_total - k)  # micro-batches whose graph the stage keeps
        saved = sum(b["saved"]["layer"] for b in mine) * held / m
        outputs = mine[-1]["output_bytes"] * held / m
        stages.append(4 * sum(b["parameter_bytes"] for b in mine) + saved + outputs)
    return stages


def local_memory(blocks: list[dict], sizes: list[int]) -> list[float]:
    """Bytes per stage of ours in the lean order, whole blocks: parameters and Adam's two moments of every block,
    the gradients of one block at a time, the largest block's graph (its input, the message that came in, is
    among what its layer saves) and the batch's output on its way out."""
    stages, begin = [], 0
    for size in sizes:
        mine = blocks[begin:begin + size]
        begin += size
        graph = max(b["saved"]["layer"] + b["saved"]["heads"] for b in mine)
        parameters = 3 * sum(b["parameter_bytes"] for b in mine) + max(b["parameter_bytes"] for b in mine)
        stages.append(parameters + graph + mine[-1]["output_bytes"])
    return stages


def project(name: str, flags: list[str], device: torch.device, ks: tuple[int, ...], budgets: list[int], rounds: int) -> dict:
    from pipeline.engine.partition import balanced_partition, stage_times
    from pipeline.engine.profile import block_costs, send_path

    batch = _config(flags).data.batch_size
    path = send_path(device, "dist", "nccl" if device.type == "cuda" else "gloo")
    counts = [m for m in (2 ** i for i in range(batch.bit_length())) if batch % m == 0 and batch // m >= 2]
    times = {m: backprop_costs(flags, device, batch // m, rounds=rounds) for m in counts}
    backprop_blocks = block_memory(flags + ["--loss", "backprop"], device)
    local = {h: (block_costs(_config(flags + extra), device, batches=rounds, warmup=1, path=path),
                 block_memory(flags + extra, device)) for h, extra in HEADS.items()}
    send = local["the reference's heads"][0].send
    report = {"model": name, "batch": batch, "device": str(device), "label": LABEL,
              "backprop_block_memory": backprop_blocks, "local_block_memory": {h: v[1] for h, v in local.items()},
              "rows": []}
    for k in ks:
        if k > len(send):
            continue
        peers = {}
        for schedule in ("gpipe", "1f1b"):
            for m, (forward, backward) in times.items():
                if schedule == "1f1b" and m < k:
                    continue  # torch's Schedule1F1B needs M >= K
                sizes = list(balanced_partition([f + b for f, b in zip(forward, backward)], [0.0] * len(forward), k))
                f_stage, b_stage = _contiguous_stages(forward, sizes), _contiguous_stages(backward, sizes)
                seconds = step_time(schedule, f_stage, b_stage, [send[sum(sizes[:j + 1]) - 1] / m for j in range(k)], m)
                memory = peer_memory(backprop_blocks, sizes, m, k, schedule)
                peers.setdefault(schedule, []).append({
                    "microbatches": m, "sizes": sizes, "samples_per_s": batch / seconds, "max_stage_mib": max(memory) / MIB,
                    "bubble": 1 - m * sum(f + b for f, b in zip(f_stage, b_stage)) / (k * seconds)})
        ours = {}
        for heads, (costs, memory_rows) in local.items():
            sizes = list(balanced_partition(costs.compute, costs.send, k))
            ours[heads] = {"sizes": sizes, "samples_per_s": batch / max(stage_times(costs.compute, costs.send, tuple(sizes))),
                           "max_stage_mib": max(local_memory(memory_rows, sizes)) / MIB}
        for budget in budgets:
            row = {"K": k, "budget_mib": budget, "ours": {}, "peers": {}}
            for heads, o in ours.items():
                row["ours"][heads] = {**o, "fits": o["max_stage_mib"] <= budget}
            for schedule, options in peers.items():
                fitting = [o for o in options if o["max_stage_mib"] <= budget]
                row["peers"][schedule] = max(fitting, key=lambda o: o["samples_per_s"]) if fitting else None
                row["peers"][schedule + " unlimited"] = max(options, key=lambda o: o["samples_per_s"])
            fitting_peers = [p["samples_per_s"] for s, p in row["peers"].items() if p and "unlimited" not in s]
            best_ours = max((o["samples_per_s"] for o in row["ours"].values() if o["fits"]), default=None)
            row["ours_wins"] = best_ours is not None and (not fitting_peers or best_ours > max(fitting_peers))
            report["rows"].append(row)
    return report


def table(reports: list[dict]) -> str:
    lines = [LABEL, "", "| model | K | budget (MiB) | ours, reference heads | ours, --sim-pool 4 | GPipe (M, bubble) | "
             "1F1B (M, bubble) | ours ahead |", "|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for row in report["rows"]:
            cells = [f"{o['samples_per_s']:.1f} ({o['max_stage_mib']:.0f} MiB)" if o["fits"] else f"does not fit ({o['max_stage_mib']:.0f} MiB)"
                     for o in row["ours"].values()]
            for schedule in ("gpipe", "1f1b"):
                p = row["peers"].get(schedule)
                cells.append(f"{p['samples_per_s']:.1f} (M={p['microbatches']}, {p['bubble']:.2f}; {p['max_stage_mib']:.0f} MiB)"
                             if p else "does not fit")
            lines.append(f"| {report['model']} | {row['K']} | {row['budget_mib']} | " + " | ".join(cells)
                         + f" | {'yes' if row['ours_wins'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg8b x1", "resnet18"], choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512, 1024], help="MiB per device")
    parser.add_argument("--batch-size", default="128")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per cost (after one untimed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/budget_projection")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    reports = []
    for name in args.models:
        flags = MODELS[name] + ["--dropout", "0.1", "--synthetic-like", "cifar10", "--batch-size", args.batch_size,
                                "--device", args.device, "--threads", "1"]
        reports.append(project(name, flags, device, tuple(args.stages), args.budgets, args.rounds))
        print(f"  {name} done", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "budget.json"), "w") as f:
        json.dump(reports, f, indent=1)
    text = table(reports)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
