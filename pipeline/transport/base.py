"""The one interface every transport offers: a channel that sends or receives whole messages, in order."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from pipeline.message import Message


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


@dataclass
class Links:
    """All channels of one stage: the forward pipe, and for DFA the error channels from the last stage."""

    inbox: Channel | None = None  # from stage k-1 (None at stage 0: the data source feeds it)
    outbox: Channel | None = None  # to stage k+1 (None at the last stage)
    feedback_in: Channel | None = None  # DFA errors from the last stage (stages before the last)
    feedback_out: list[Channel] = field(default_factory=list)  # last stage: one per earlier stage

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
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, device)
        with self._lock:
            if self._free[key]:
                return self._free[key].pop()
            self.allocated += 1
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensors: list[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                self._free[(tuple(t.shape), t.dtype, t.device)].append(t)
