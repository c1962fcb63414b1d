"""In-host transport: torch.multiprocessing queues made by the local launcher.

CPU tensors travel through shared memory and CUDA tensors as CUDA IPC handles, so in the one-GPU emulation an
activation never leaves the GPU. The header is the same checked msgpack header as on the wire.
"""

from __future__ import annotations

import torch

from pipeline.message import Message, decode_header, encode_header
from pipeline.transport.base import Channel, Links


def _shareable(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in shared memory (CPU) or the tensor itself (CUDA, sent as an IPC handle).

    torch would otherwise move the caller's storage into shared memory from the queue's feeder thread,
    while the stage may still be reading that tensor (the labels, in its blocks' backward pass).
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor
    return torch.empty_like(tensor).share_memory_().copy_(tensor)


class QueueChannel(Channel):
    """One end of a bounded torch.multiprocessing queue between two stage processes on this host."""

    def __init__(self, queue, device: torch.device):
        self.queue, self.device = queue, device

    def send(self, msg: Message) -> None:
        self.queue.put((encode_header(msg), [_shareable(t) for t in msg.tensors]))

    def recv(self) -> Message:
        header_bytes, tensors = self.queue.get()
        header = decode_header(header_bytes)
        tensors = [t if t.device == self.device else t.to(self.device) for t in tensors]
        return Message(header.kind, header.epoch, header.index, tensors, header.meta)

    def close(self) -> None:
        self.queue.close()


def make_queues(context, world: int, depth: int, feedback: bool) -> dict[str, list]:
    """One bounded queue per link (k, k+1) and, for DFA, per error link (K-1 -> k); made by the launcher before
    it starts the stages. Error queues are unbounded: a stage drains them at once, and --dfa-max-delay bounds
    how many batches can await an error."""
    return {"forward": [context.Queue(maxsize=depth) for _ in range(world - 1)],
            "feedback": [context.Queue() for _ in range(world - 1)] if feedback else []}


def open_local(rank: int, world: int, device: torch.device, queues: dict[str, list]) -> Links:
    forward, errors, last = queues["forward"], queues["feedback"], world - 1
    links = Links(inbox=QueueChannel(forward[rank - 1], device) if rank > 0 else None,
                  outbox=QueueChannel(forward[rank], device) if rank < last else None)
    if errors and rank < last:
        links.feedback_in = QueueChannel(errors[rank], device)
    if errors and rank == last:
        links.feedback_out = [QueueChannel(errors[k], device) for k in range(last)]
    return links
