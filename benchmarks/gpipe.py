"""Backprop pipeline baselines: the same network trained with global backprop by torch.distributed.pipelining.

    python benchmarks/gpipe.py --stages 2 --schedule gpipe --steps 60 --warmup 10
    python benchmarks/gpipe.py --stages 2 --schedule 1f1b --dataset mnist --data-dir ../shared/data --epochs 3

K processes over gloo, each pinned to its own core with one intra-op thread; the block list is the one the
local-learning pipeline uses (without local heads: --loss backprop) and is cut the same way. The batch is split
into --microbatches micro-batches (default 4K). Prints one JSON line: steady-state samples/s (after --warmup
steps), each stage's peak resident memory and the same memory accounting as our stages (pipeline/observe/memory.py),
and with --epochs the test accuracy after each epoch (and every --eval-every steps) with its wall time and the
part of it spent testing (for time to accuracy; --target stops the run at an accuracy). Full training batches
only: a last smaller batch is dropped (micro-batch shapes are fixed once the schedule has run). Tests run every
test batch through the stages outside the schedule, the same way for every schedule.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, PipelineConfig, RunConfig
from pipeline.data import BatchSource
from pipeline.model.factories import build_blocks, count_blocks
from pipeline.observe.memory import MemoryMeter
from pipeline.engine.partition import resolve_partition
from pipeline.run.runtime import pin_cores


def _config(args: argparse.Namespace) -> Config:
    return Config(
        model=ModelConfig(name=args.model, num_layers=args.num_layers, num_hidden=args.num_hidden, feat_mult=args.feat_mult,
                          dropout=args.dropout, nonlin=args.nonlin),
        loss=LossConfig(loss="backprop"),
        optim=OptimConfig(lr=args.lr),
        data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, download=False, batch_size=args.batch_size,
                        synthetic_like=args.synthetic_like, synthetic_train_size=args.synthetic_train_size),
        pipeline=PipelineConfig(stages=1),  # builds the blocks only; this script cuts them into stages itself
        run=RunConfig(epochs=max(1, args.epochs), seed=args.seed, progress=False),
    )


def _worker(rank: int, world: int, port: int, results, args: argparse.Namespace) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleZBVZeroBubble

    pin_cores(rank, world)  # the placement our stages get: a core each, or the scheduler's when there are more
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    cfg = _config(args)
    shape, classes = BatchSource.shape_of(cfg.data)
    microbatches = args.microbatches or 4 * world
    if args.schedule == "zbv":
        # zero bubble, V-shaped: 2K virtual stages, this rank holds stage `rank` and stage 2K-1-rank (so rank 0 has
        # the first and the last); backward split into input and weight gradients to fill the bubble
        ranges = resolve_partition(count_blocks(cfg), 2 * world, None)
        chunks = [build_blocks(cfg, shape, classes, indices=ranges[i]) for i in (rank, 2 * world - 1 - rank)]
        blocks = chunks[0] + chunks[1]
        module = nn.ModuleList([nn.Sequential(*c) for c in chunks])
        stages = [PipelineStage(module[j], i, 2 * world, torch.device("cpu"))
                  for j, i in enumerate((rank, 2 * world - 1 - rank))]
        schedule = ScheduleZBVZeroBubble(stages, n_microbatches=microbatches, loss_fn=F.cross_entropy)
        first = last = rank == 0
    else:
        ranges = resolve_partition(count_blocks(cfg), world, None)
        blocks = build_blocks(cfg, shape, classes, indices=ranges[rank])
        module = nn.Sequential(*blocks)
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        schedule_class = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
        schedule = schedule_class(stage, n_microbatches=microbatches, loss_fn=F.cross_entropy)
        first, last = rank == 0, rank == world - 1
    meter = MemoryMeter().attach(blocks)  # the accounting our stages get (pipeline/observe/memory.py)
    source = BatchSource(cfg.data, cfg.run.seed)  # every rank walks the batches: the middle ones to keep count
    # which rank holds each (virtual) stage, and this rank's modules by stage: for the evaluation below
    owners = list(range(world)) + (list(reversed(range(world))) if args.schedule == "zbv" else [])
    pieces = ({rank: module[0], 2 * world - 1 - rank: module[1]} if args.schedule == "zbv" else {rank: module})
    steps, timed_from, timed_samples, history = 0, None, 0, []
    test_s, stop, tested_at = 0.0, False, -1
    started = time.perf_counter()

    def test(epoch: int) -> bool:
        """A test pass, timed apart from training (after a barrier: every rank's step is done); True: stop."""
        nonlocal test_s
        dist.barrier()
        began = time.perf_counter()
        accuracy = _evaluate(pieces, owners, rank, source)
        now = time.perf_counter()
        test_s += now - began
        if accuracy is not None:
            history.append({"epoch": epoch, "step": steps, "wall_s": now - started, "test_s": test_s,
                            "test_accuracy": accuracy})
        reached = torch.tensor([float(accuracy is not None and args.target is not None and accuracy >= args.target)])
        dist.all_reduce(reached)
        return bool(reached.item())

    for epoch in range(1, max(1, args.epochs) + 1):
        module.train()
        batches = source.train_batches(epoch)
        for batch in batches:
            if len(batch.y) != cfg.data.batch_size or (args.steps and steps >= args.warmup + args.steps):
                break
            for block in blocks:
                block.optimizer.zero_grad(set_to_none=True)
            with meter.saving():  # every micro-batch's forward and backward run in this call, in this thread
                if first and last:  # zbv: rank 0 holds the first and the last stage
                    schedule.step(batch.x, target=batch.y)
                elif first:
                    schedule.step(batch.x)
                elif last:
                    schedule.step(target=batch.y)
                else:
                    schedule.step()
            meter.before_step()  # every gradient of the stage is alive now
            for block in blocks:
                block.optimizer.step()
            steps += 1
            if steps == args.warmup:
                timed_from, timed_samples = time.perf_counter(), 0
            elif timed_from is not None:
                timed_samples += len(batch.y)
            if args.epochs and args.eval_every and steps % args.eval_every == 0:
                tested_at = steps
                if stop := test(epoch):
                    break
        if args.epochs and not stop and tested_at != steps:  # the epoch's test, unless one ran at this step
            tested_at = steps
            stop = test(epoch)
        if stop:
            break
    rate = timed_samples / (time.perf_counter() - timed_from) if timed_from and timed_samples else None
    results.put((rank, {"samples_per_s": rate, "steps": steps, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "history": history, "memory": meter.report()}))
    dist.barrier()
    dist.destroy_process_group()


def _evaluate(pieces: dict[int, nn.Module], owners: list[int], rank: int, source: BatchSource) -> float | None:
    """Test accuracy (on the rank of the last stage; None elsewhere): every test batch, the last smaller one too,
    through the stages in order by point-to-point sends, outside the schedule (so every schedule tests alike)."""
    for piece in pieces.values():
        piece.eval()
    hits = total = 0
    with torch.no_grad():
        for batch in source.eval_batches():
            out = batch.x
            for stage, owner in enumerate(owners):
                if owner != rank:
                    continue
                if stage > 0 and owners[stage - 1] != rank:
                    out = _receive(owners[stage - 1])
                out = pieces[stage](out)
                if stage == len(owners) - 1:
                    hits += int((out.argmax(1) == batch.y).sum())
                    total += len(batch.y)
                elif owners[stage + 1] != rank:
                    _send(out, owners[stage + 1])
    for piece in pieces.values():
        piece.train()
    return 100.0 * hits / total if total else None


def _send(tensor: torch.Tensor, peer: int) -> None:
    header = torch.zeros(9, dtype=torch.int64)
    header[0] = tensor.dim()
    header[1:1 + tensor.dim()] = torch.tensor(tensor.shape)
    dist.send(header, peer)
    dist.send(tensor.contiguous().float(), peer)


def _receive(peer: int) -> torch.Tensor:
    header = torch.empty(9, dtype=torch.int64)
    dist.recv(header, peer)
    tensor = torch.empty([int(d) for d in header[1:1 + int(header[0])]])
    dist.recv(tensor, peer)
    return tensor


def run(args: argparse.Namespace) -> dict:
    """Run the K processes; the last stage's rate and history, and every stage's peak memory."""
    context = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(rank, args.stages, store.port, results, args))
                 for rank in range(args.stages)]
    for process in processes:
        process.start()
    collected = {}
    while len(collected) < len(processes):
        try:
            rank, value = results.get(timeout=1.0)
            collected[rank] = value
        except queue.Empty:
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed:
                for process in processes:
                    process.kill()
                raise RuntimeError(f"a baseline stage failed with exit code {failed[0].exitcode}")
    for process in processes:
        process.join()
    last = collected[0 if args.schedule == "zbv" else args.stages - 1]  # the rank of the last (virtual) stage
    return {"schedule": args.schedule, "stages": args.stages, "samples_per_s": last["samples_per_s"],
            "peak_rss_mib": [collected[r]["peak_rss_mib"] for r in range(args.stages)], "history": last["history"],
            "memory": [collected[r]["memory"] for r in range(args.stages)]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "zbv"], default="gpipe",
                   help="zbv: torch's ScheduleZBVZeroBubble, two virtual stages per rank")
    p.add_argument("--microbatches", type=int, default=None, help="default: 4 x stages")
    p.add_argument("--model", default="mlp")
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--num-hidden", type=int, default=1024)
    p.add_argument("--feat-mult", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--nonlin", default="leakyrelu")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--synthetic-like", default="mnist", help="the shapes of synthetic data (mnist, cifar10, ...)")
    p.add_argument("--synthetic-train-size", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="timed steps after warm-up (0: whole epochs)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--epochs", type=int, default=0, help="train this many epochs, testing after each")
    p.add_argument("--eval-every", type=int, default=None, help="with --epochs: also test every N steps")
    p.add_argument("--target", type=float, default=None, help="with --epochs: stop once a test reaches this accuracy")
    return p


if __name__ == "__main__":
    print(json.dumps(run(parser().parse_args())))
    sys.stdout.flush()
