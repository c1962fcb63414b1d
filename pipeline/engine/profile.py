"""Block profiling: how long each block's layer and heads take to train, and its sends cost, for --partition auto."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.block.blocks import Block
from pipeline.config import Config
from pipeline.data import BatchSource
from pipeline.model.feedback import output_error
from pipeline.model.dry_run import NetworkShape
from pipeline.model.factories import build_blocks
from pipeline.engine.remote_heads import heads_step, layer_step


def timed(step, device: torch.device) -> float:
    """Seconds that step() takes, the device synchronised before and after."""
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
        return 2 * timed(lambda: out.clone(), device)
    if path == "host":
        def staged() -> None:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            host.to(device, non_blocking=True)
        return timed(staged, device)
    if path == "peer" and torch.cuda.device_count() > 1:
        other = torch.device("cuda", ((device.index or 0) + 1) % torch.cuda.device_count())

        def peer_copy() -> None:
            out.to(other)
            torch.cuda.synchronize(other)

        return timed(peer_copy, device)
    return timed(lambda: out.clone(), device)


@dataclass
class BlockCosts:
    """Seconds per batch of every block: its whole step (compute = layer + heads), split into the part that runs
    on the layer's stage (forward, and backward and step from dL/dh) and the heads' (loss, backward to h, step),
    and what handing on its output (send) and its activation h (send_h) costs."""

    layer: list[float] = field(default_factory=list)
    heads: list[float] = field(default_factory=list)
    send: list[float] = field(default_factory=list)
    send_h: list[float] = field(default_factory=list)

    @property
    def compute(self) -> list[float]:
        return [layer + heads for layer, heads in zip(self.layer, self.heads)]


def _block_step(block: Block, x: torch.Tensor, y: torch.Tensor, dfa: bool, classes: int,
                device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(layer seconds, heads seconds, detached output, h) of one training step of a block, timed in the two parts
    a split block runs in; a block without local heads counts all of its step as its layer's."""
    heads = getattr(block, "heads", None)
    if dfa or heads is None:
        held: list[torch.Tensor] = []

        def whole() -> None:
            state, out = block.forward_train(x)
            block.learn(state, output_error(torch.randn(len(y), classes, device=device), y) if dfa else y)
            held.extend([out.detach(), state.detach()])

        return timed(whole, device), 0.0, held[0], held[1]
    held = []

    def forward() -> None:
        held.extend(block.forward_train(x))

    def heads_half() -> None:  # (dL/dh or None, the loss's flag)
        held.extend(heads_step(block, held[0], y))

    def layer_half() -> None:
        layer_step(block, held[0], held[2], held[3])

    layer_s = timed(forward, device)
    heads_s = timed(heads_half, device)
    layer_s += timed(layer_half, device)
    return layer_s, heads_s, held[1].detach(), held[0].detach()


def block_costs(cfg: Config, device: torch.device, batches: int = 6, warmup: int = 2, path: str = "host",
                network: NetworkShape | None = None) -> BlockCosts:
    """Every block's costs (BlockCosts), measured on random batches of the run's shape: the median of `batches`
    timed steps after `warmup` untimed ones. send and send_h are timed along the transport's `path` (_send_cost).
    `network`: the run's dry-run shapes where the caller holds them (its plan's)."""
    shape, classes = BatchSource.shape_of(cfg.data)
    blocks: list[Block] = build_blocks(cfg, shape, classes, device=device, shape=network)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(cfg.data.batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, classes, (cfg.data.batch_size,), generator=gen).to(device)
    samples: list[list[tuple[float, ...]]] = [[] for _ in blocks]
    dfa = cfg.loss.loss == "dfa"
    for round_ in range(warmup + batches):
        x = x0
        for index, block in enumerate(blocks):
            last = index == len(blocks) - 1
            layer, heads, out, h = _block_step(block, x, y, dfa and not last, classes, device)
            send, send_h = _send_cost(out, path, device), (_send_cost(h, path, device) if heads else 0.0)
            if round_ >= warmup:
                samples[index].append((layer, heads, send, send_h))
            x = out
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    costs = BlockCosts()
    for block_samples in samples:
        layer, heads, send, send_h = (median([s[i] for s in block_samples]) for i in range(4))
        costs.layer.append(layer)
        costs.heads.append(heads)
        costs.send.append(send)
        costs.send_h.append(send_h)
    return costs
