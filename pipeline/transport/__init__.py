"""Transports: how a stage hands detached activations and labels to the next one (dist, zmq, local)."""

from __future__ import annotations

import datetime

import torch

from pipeline.transport.base import Channel, Links, dfa_gradient_links
from pipeline.transport.dist import open_dist
from pipeline.transport.local import open_local
from pipeline.transport.zmq import open_zmq


def open_links(name: str, rank: int, world: int, device: torch.device, *, gradients: list[tuple[int, int]] = (),
               dist_backend: str = "gloo", zmq_host: str = "127.0.0.1", zmq_curve_keys: str | None = None,
               local_queues: dict | None = None, timeout: datetime.timedelta | None = None) -> Links:
    """The channels of stage `rank` over the named transport: the forward pipe and the remote-gradient links
    `gradients`, (sender, receiver) pairs listed alike on every rank. `timeout`: how long a dist link may wait (the
    run's stall timeout)."""
    if name == "dist":

        return open_dist(rank, world, device, dist_backend, list(gradients), timeout)
    if name == "zmq":

        return open_zmq(rank, world, device, zmq_host, list(gradients), zmq_curve_keys)
    if name == "local":

        if local_queues is None:
            raise ValueError("the local transport needs the queues of the local launcher")
        return open_local(rank, world, device, local_queues, list(gradients))
    raise ValueError(f"unknown transport '{name}'")


__all__ = ["Channel", "Links", "dfa_gradient_links", "open_links"]
