"""Block profiling: how long each block's training step takes, for --partition auto."""

from __future__ import annotations

import time

import torch

from pipeline.blocks import Block
from pipeline.config import Config
from pipeline.data import BatchSource
from pipeline.feedback import output_error
from pipeline.factories import build_blocks


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def send_path(device: torch.device, transport: str, backend: str | None) -> str:
    """How a stage's output travels: "host" (through host memory: CPU stages, gloo, zmq, the local transport's
    shared memory) or "peer" (NCCL, GPU to GPU)."""
    if device.type == "cuda" and transport == "dist" and backend == "nccl":
        return "peer"
    return "host"


def _send_cost(out: torch.Tensor, path: str, device: torch.device) -> float:
    """Seconds that handing `out` on costs, timed the way the transport moves it:
    - host: on CPU two copies (serialisation and the receiver's copy); on a GPU, the copy into pinned host memory
      and the receiver's copy back to its GPU (pipeline/transport/base.py, [Note: host staging]);
    - peer: a copy to another GPU of this host when there is one (NVLink or PCIe, as NCCL would use), else a
      copy within this GPU -- a lower bound for GPUs on other nodes, whose network this profile cannot see.
    """
    if path == "host" and device.type != "cuda":
        return 2 * _timed(lambda: out.clone(), device)
    if path == "host":
        def staged() -> None:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            host.to(device, non_blocking=True)
        return _timed(staged, device)
    if path == "peer" and torch.cuda.device_count() > 1:
        other = torch.device("cuda", ((device.index or 0) + 1) % torch.cuda.device_count())

        def peer_copy() -> None:
            out.to(other)
            torch.cuda.synchronize(other)

        return _timed(peer_copy, device)
    return _timed(lambda: out.clone(), device)


def block_costs(cfg: Config, device: torch.device, batches: int = 6, warmup: int = 2,
                path: str = "host") -> tuple[list[float], list[float]]:
    """(compute, send) seconds per batch for every block, measured on random batches of the run's shape.

    compute: the block's forward, local loss, backward and optimizer step (DFA: forward and update);
    send: what handing its output on costs the stage, timed along the transport's `path` (see _send_cost).
    The median of `batches` timed steps after `warmup` untimed ones.
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
            send = _send_cost(out, path, device)
            if round_ >= warmup:
                samples[index].append(elapsed)
                sends[index].append(send)
            x = out
    median = lambda values: sorted(values)[len(values) // 2]
    return [median(s) for s in samples], [median(s) for s in sends]
