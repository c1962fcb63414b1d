"""Transports: how a stage hands detached activations and labels to the next one (dist, zmq, local)."""

from __future__ import annotations

import torch

from pipeline.transport.base import Channel


def open_channels(name: str, rank: int, world: int, device: torch.device, *, dist_backend: str = "gloo",
                  zmq_host: str = "127.0.0.1", local_queues: list | None = None) -> tuple[Channel | None, Channel | None]:
    """(inbox, outbox) of stage `rank` over the named transport; None at the ends of the pipe."""
    if name == "dist":
        from pipeline.transport.dist import open_dist

        return open_dist(rank, world, device, dist_backend)
    if name == "zmq":
        from pipeline.transport.zmq import open_zmq

        return open_zmq(rank, world, device, zmq_host)
    if name == "local":
        from pipeline.transport.local import open_local

        if local_queues is None:
            raise ValueError("the local transport needs the queues of the local launcher")
        return open_local(rank, world, device, local_queues)
    raise ValueError(f"unknown transport '{name}'")


__all__ = ["Channel", "open_channels"]
