"""CUDA streams of a stage: one per thread, events at every hand-off between threads, compute timed by events.

[Note: stage streams]
On a GPU every thread of a stage issues its work on a CUDA stream of its own:

    feed thread     (receive, or stage 0's data source)  ──event──►  compute thread (blocks, local heads)
    compute thread  (forward passes done)                ──event──►  send thread    (send on to stage k+1)
    error feed      (a remote gradient: DFA's error, dL/dh) ──event──►  compute thread (the update it completes)

A message that crosses from one thread to another carries a CUDA event recorded on the producer's stream right
after the work that made its tensors. The consumer makes its own stream wait for that event
(`Stream.wait_event`: a wait on the GPU, the CPU goes on) and calls `Tensor.record_stream` on each tensor, so
that the caching allocator does not hand the memory out again before the consumer's stream is done with it
(the tensor was allocated on the producer's stream; CUDA semantics notes, "Stream semantics of backward
passes" and `Tensor.record_stream`; torchgpipe's copy streams follow the same rule).

Why this matters: for NCCL, `Work.wait()` does not block the CPU; it makes the *current stream* wait for the
communication (torch.distributed docs, "Synchronous and asynchronous collective operations": "function calls
utilizing the output on the same CUDA stream will behave as expected. Users must take care of synchronization
under the scenario of running under different streams"). If a receiving thread and the compute thread shared
a stream, every kernel of the compute thread queued after a pending receive would wait for that receive: with
DFA that is a cycle (error t+1 cannot come before this stage sends batch t+1, which waits behind the pending
receive of error t+1). With a stream per thread, a pending receive holds only its own thread's stream.

Streams made by `torch.cuda.Stream()` come from PyTorch's pool of non-blocking streams, which never
synchronise implicitly with the legacy default stream. The CPU blocks only in these places, each by design:
a helper thread waiting for the network or for its own stream (a receive's header, a send leaving), the
compute thread waiting for its next message or for room in the output queue (backpressure), and the
deferred non-finite check, which reads the update flags every few batches (pipeline/block/nonfinite.py). There is
no device-wide `torch.cuda.synchronize()` in the steady state.

On CPU the same calls are no-ops (`NoStreams`), so the stage's code path is one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable

import torch


class NoStreams:
    """The CPU case: work runs in program order, nothing to wait for, wall time is compute time."""

    enabled = False

    def new_stream(self) -> Any:
        return None

    def using(self, stream: Any):
        return contextlib.nullcontext()

    def record(self) -> Any:
        """An event marking the work issued so far on this thread's stream (None on CPU)."""
        return None

    def accept(self, tensors: Iterable[torch.Tensor], ready: Any) -> None:
        """Make this thread's stream wait for `ready` and keep the tensors' memory until it is done with them."""

    def timer(self) -> "ComputeTimer":
        return ComputeTimer(None)


class CudaStreams(NoStreams):
    """The GPU case: real streams and events on `device` (see [Note: stage streams])."""

    enabled = True

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def using(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)  # thread-local: sets this thread's current stream only

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def accept(self, tensors: Iterable[torch.Tensor], ready: torch.cuda.Event | None) -> None:
        stream = torch.cuda.current_stream(self.device)
        if ready is not None:
            stream.wait_event(ready)
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(stream)

    def timer(self) -> "ComputeTimer":
        return ComputeTimer(self.device)


def stage_streams(device: torch.device) -> NoStreams:
    return CudaStreams(device) if device.type == "cuda" else NoStreams()


class ComputeTimer:
    """Seconds of compute: wall time on CPU; on a GPU, the time between CUDA events on the compute stream,
    read only once they have completed (no host sync to time a step). A wait for another stage inside a timed
    span (paused()) ends the span and starts a new one after it, so neither count includes it: on a GPU the
    stream idles while the host waits, and events around the wait would count that idle time as compute."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []
        self._started: Any = None

    def start(self) -> None:
        if self.device is None:
            self._started = time.perf_counter()
        else:
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(torch.cuda.current_stream(self.device))

    @contextlib.contextmanager
    def paused(self):
        """Leave what runs inside (a wait for a peer) out of the timed span, if one is running."""
        if self._started is None:
            yield
            return
        self.stop()
        try:
            yield
        finally:
            self.start()

    def stop(self) -> None:
        """End a timed span."""
        if self.device is None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._pending.append((self._started, end))
        self._started = None
        while self._pending and self._pending[0][1].query():  # completed spans: their time is known, no sync
            begin, done = self._pending.pop(0)
            self.seconds += begin.elapsed_time(done) / 1e3

    def total(self) -> float:
        """All spans so far (at the end of a run: waits for the last ones)."""
        for begin, done in self._pending:
            done.synchronize()
            self.seconds += begin.elapsed_time(done) / 1e3
        self._pending.clear()
        return self.seconds
