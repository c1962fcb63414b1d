"""The one interface every transport offers: a channel that sends or receives whole messages, in order."""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from pipeline.transport.message import Message, from_wire, to_wire


class PeerGone(ConnectionError):
    """The stage at the other end of a channel went away while a message was in flight (it failed or was killed)."""


class Channel(ABC):
    """One direction of the link between two neighbouring stages. Each channel is used by one thread only."""

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Deliver a message; returns once its tensors may be reused or freed by the caller."""

    @abstractmethod
    def recv(self) -> Message:
        """The next message, in the order it was sent; call msg.release() when done with its tensors."""

    def close(self) -> None:
        """Release the channel's resources (after the END message has gone through)."""


def dfa_gradient_links(world: int) -> list[tuple[int, int]]:
    """(sender, receiver) of DFA's remote-gradient links: the last stage's output error to every earlier stage."""
    return [(world - 1, k) for k in range(world - 1)]


def gradient_source(rank: int, gradients: list[tuple[int, int]]) -> int | None:
    """The one stage that sends remote gradients to `rank` (DFA: the last; split heads: the next; heads first: the
    other stage of the split block), if any."""
    sources = [sender for sender, receiver in gradients if receiver == rank]
    if len(sources) > 1:
        raise ValueError(f"stage {rank} would receive remote gradients from stages {sources}: one source at most")
    return sources[0] if sources else None


@dataclass
class Links:
    """All channels of one stage: the forward pipe, and the remote-gradient channels (DFA's output errors from the
    last stage, or dL/dh from the stage that runs a block's heads; see pipeline/engine/remote_gradient.py)."""

    inbox: Channel | None = None  # from stage k-1 (None at stage 0: the data source feeds it)
    outbox: Channel | None = None  # to stage k+1 (None at the last stage)
    feedback_in: Channel | None = None  # remote gradients (or, heads first, h) from another stage
    feedback_out: list[Channel] = field(default_factory=list)  # remote gradients to other stages (each gets every one)

    def close(self) -> None:
        for channel in [self.inbox, self.outbox, self.feedback_in, *self.feedback_out]:
            if channel is not None:
                channel.close()


class BufferPool:
    """Receive buffers kept per (shape, dtype, device): taken by the receiving thread, given back by release().

    In steady state every message reuses buffers; a new one is allocated only while all of a shape are in use,
    so correctness never depends on guessing how long a stage holds on to a batch.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated = 0  # buffers allocated so far
        self.allocated_bytes = 0  # and their size: all a stream of messages (or malformed ones) made this pool hold

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, device)
        with self._lock:
            if self._free[key]:
                return self._free[key].pop()
            self.allocated += 1
            self.allocated_bytes += math.prod(shape) * dtype.itemsize
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensors: list[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                self._free[(tuple(t.shape), t.dtype, t.device)].append(t)


# [Note: host staging]
# gloo and zmq move bytes through host memory. For a stage on a GPU, its tensors are staged through *pinned*
# host buffers, so that the copies are DMA transfers issued on the helper thread's own stream:
# - sending: copy into pinned buffers without blocking, then wait for this thread's stream (not the device):
#   the wire reads the host copies as soon as the send starts;
# - receiving: receive into a fresh pinned buffer, then copy it to the GPU without blocking. No wait is needed
#   before the buffer is dropped: pinned memory comes from PyTorch's caching host allocator, which records an
#   event for every non-blocking copy that reads a block and does not hand that block out again until the copy
#   has completed (CUDA semantics notes, "Use pinned memory buffers"; CachingHostAllocator's recordEvent).
# On CPU both are identities, and receive buffers come from the transport's BufferPool as before.


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The frames of a message's tensors in host memory for a host-staged transfer: pinned copies of GPU tensors,
    CPU tensors as they are; each in its memory order (see [Note: memory format on the wire])."""
    staged = []
    for tensor in tensors:
        tensor = to_wire(tensor.detach())
        if tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            staged.append(host)
        else:
            staged.append(tensor)
    if any(t.is_cuda for t in tensors):
        torch.cuda.current_stream(next(t.device for t in tensors if t.is_cuda)).synchronize()  # this stream only
    return staged


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A receive buffer in host memory for a tensor bound for `device` (pinned when that is a GPU)."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(buffers: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Received host buffers on `device`: non-blocking copies from pinned memory on this thread's stream (a permuted
    frame keeps its strides: .to() preserves the layout of a dense tensor)."""
    return [buffer.to(device, non_blocking=True) for buffer in buffers]


def received(frames: list[torch.Tensor], specs) -> list[torch.Tensor]:
    """A message's tensors from its received frames, each with the strides it was sent with."""
    return [from_wire(frame, spec.order) for frame, spec in zip(frames, specs)]
