"""Block profiling: how long each block's training step takes, for --partition auto."""

from __future__ import annotations

import time

import torch

from pipeline.blocks import Block
from pipeline.config import Config
from pipeline.data import BatchSource
from pipeline.feedback import output_error
from pipeline.models import build_blocks


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def block_costs(cfg: Config, device: torch.device, batches: int = 6, warmup: int = 2) -> tuple[list[float], list[float]]:
    """(compute, send) seconds per batch for every block, measured on random batches of the run's shape.

    compute: the block's forward, local loss, backward and optimizer step (DFA: forward and update);
    send: what handing its output on costs the stage, estimated as two copies of the output (the transport's
    serialisation and the receiver's copy). The median of `batches` timed steps after `warmup` untimed ones.
    """
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks: list[Block] = build_blocks(cfg, shape, classes, device=device)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(cfg.data.batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, classes, (cfg.data.batch_size,), generator=gen).to(device)
    samples: list[list[float]] = [[] for _ in blocks]
    sends: list[list[float]] = [[] for _ in blocks]
    for round_ in range(warmup + batches):
        x = x0
        for index, block in enumerate(blocks):
            out_holder: list[torch.Tensor] = []

            def step(block=block, x=x) -> None:
                state, out = block.forward_train(x)
                if cfg.loss.loss == "dfa" and index < len(blocks) - 1:
                    block.learn(state, output_error(torch.randn(len(y), classes, device=device), y))
                else:
                    block.learn(state, y)
                out_holder.append(out.detach())

            elapsed = _timed(step, device)
            out = out_holder[0]
            copy = _timed(lambda out=out: out.clone(), device)
            if round_ >= warmup:
                samples[index].append(elapsed)
                sends[index].append(2 * copy)
            x = out
    median = lambda values: sorted(values)[len(values) // 2]
    return [median(s) for s in samples], [median(s) for s in sends]
