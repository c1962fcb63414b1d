"""A stage's helper threads: receive into the input queue, send from the output queues, carry failures back.

    inbox ──► [feed thread] ──► in_queue (<= D) ──► compute thread ──► out_queue (<= D) ──► [send thread] ──► outbox
    remote gradients (DFA's errors, split heads' dL/dh; heads first: h, dL/dh and the heads' weights before a
    test; pipeline/engine/remote_gradient.py):
          feedback_in ──► [error feed thread] ──► errors         errors_out ──► [error send thread] ──► feedback_out

The error feed thread receives only what the compute thread awaits (want_error): a remote-gradient link never
keeps a receive posted while no batch awaits one (see [Note: no receive left posted on a gradient link] in
pipeline/transport/dist.py).

Each helper thread issues its GPU work on a stream of its own, and every message carries an event from the
thread that made it to the thread that takes it (see [Note: stage streams] in pipeline/engine/cuda_streams.py).
Exceptions in a helper thread are carried to the compute thread and re-raised there.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Callable, ContextManager, Iterator

from pipeline.engine.cuda_streams import NoStreams
from pipeline.observe.memory import MemoryMeter
from pipeline.transport.message import Kind, Message
from pipeline.transport import Channel, Links

POLL_S = 0.2
STOP_SILENCE_S = 3.0  # after an interrupt, a peer silent this long (or 4x its slowest batch) is taken for gone


class StallError(RuntimeError):
    """A peer stopped making progress for longer than --stall-timeout (or, once stopping, the stop patience)."""


class Failure:
    """An exception raised in a helper thread, to be re-raised by the compute thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def release_after(count: int, release):
    """A callback that calls `release` on its `count`-th call: the buffers of a received message go back only
    when all its users are done: the compute thread (the blocks' backward reads the input), the send thread (the
    labels travel on with the output) and, for a block whose heads run on the next stage, its update when dL/dh
    comes back (its kept graph reads the input)."""
    lock, calls = threading.Lock(), [0]

    def countdown() -> None:
        with lock:
            calls[0] += 1
            last = calls[0] == count
        if last:
            release()

    return countdown


class StageIO:
    """The queues and helper threads of stage `rank`, and the compute thread's side of them (waits, timings)."""

    def __init__(self, rank: int, links: Links, incoming: Callable[[], Iterator[Message]], *, queue_depth: int,
                 stall_timeout: float, streams: NoStreams, stop: threading.Event | None = None,
                 memory: MemoryMeter | None = None):
        self.rank, self.links, self.incoming, self.streams = rank, links, incoming, streams
        self.memory = memory  # counts the bytes of every message from arrival (or creation) to its release
        self.pause: Callable[[], ContextManager] = contextlib.nullcontext  # what a wait for a peer runs under
        self.stall_timeout, self.stop = stall_timeout, stop
        self.in_queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self.out_queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self.errors: queue.Queue = queue.Queue()  # remote gradients (or h, or heads' weights) that arrived
        self.errors_out: queue.Queue = queue.Queue()  # remote gradients on their way to other stages
        self._wanted = threading.Semaphore(0)  # messages awaited on the remote-gradient link, not yet received
        self.helper_failure: BaseException | None = None
        self.senders: list[threading.Thread] = []
        # timings (seconds) and counts for the stage report
        self.wait_s = self.blocked_s = self.send_s = self.error_wait_s = 0.0
        self.depth_sum = self.depth_max = self.messages = 0
        self.sent_messages = self.sent_bytes = 0  # TRAIN messages this stage sent on, and their tensor bytes
        self.slowest_gap = 0.0  # longest wait for an upstream message after the first (sets the stop patience)

    # ---- helper threads -------------------------------------------------------------------------------------

    def start(self) -> None:
        rank, links = self.rank, self.links
        threads = [threading.Thread(target=self._feed, args=(self.incoming(), self.in_queue), name=f"stage{rank}-feed", daemon=True)]
        if links.outbox:
            self.senders.append(threading.Thread(target=self._drain, args=(self.out_queue, [links.outbox]),
                                                 name=f"stage{rank}-send", daemon=True))
        if links.feedback_out:
            self.senders.append(threading.Thread(target=self._drain, args=(self.errors_out, links.feedback_out),
                                                 name=f"stage{rank}-send-errors", daemon=True))
        if links.feedback_in:
            threads.append(threading.Thread(target=self._feed, args=(self._awaited(links.feedback_in), self.errors),
                                            name=f"stage{rank}-feed-errors", daemon=True))
        for thread in threads + self.senders:
            thread.start()

    def _awaited(self, channel: Channel) -> Iterator[Message]:
        """The messages of a remote-gradient link, each received only once the compute thread awaits it."""
        while True:
            self._wanted.acquire()
            yield channel.recv()

    def want_error(self) -> None:
        """The compute thread will await one more message on the remote-gradient link (a batch's gradient, h, the
        heads' weights, END): the error feed thread may receive it."""
        self._wanted.release()

    def _feed(self, messages: Iterator[Message], into: queue.Queue) -> None:
        """Feed thread: put each incoming message, with an event marking its tensors ready, on a queue until END."""
        try:
            with self.streams.using(self.streams.new_stream()):
                for msg in messages:
                    msg.ready = self.streams.record()
                    self._count(msg)
                    into.put(msg)
                    if msg.kind == Kind.END:
                        return
        except BaseException as exc:  # carried to the compute thread
            into.put(Failure(exc))

    def _drain(self, pending: queue.Queue, channels: list[Channel]) -> None:
        """Send thread: deliver queued messages on every channel, in order, until END has gone."""
        try:
            with self.streams.using(self.streams.new_stream()):
                while True:
                    msg = pending.get()
                    started = time.perf_counter()
                    self.streams.accept(msg.tensors, msg.ready)  # this stream waits for the compute that made them
                    for channel in channels:
                        channel.send(msg)  # returns once the tensors may be freed (the transfer is done)
                    self.send_s += time.perf_counter() - started
                    if msg.kind == Kind.TRAIN:
                        self.sent_messages += 1
                        self.sent_bytes += sum(t.numel() * t.element_size() for t in msg.tensors)
                    msg.release()
                    if msg.kind == Kind.END:
                        return
        except BaseException as exc:
            self.helper_failure = exc

    # ---- the compute thread's side --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def patience(self) -> float:
        """How long a peer may stay silent: --stall-timeout; once an interrupt asked the run to stop, only a few
        seconds (or 4x the slowest gap seen so far) -- under torchrun a SIGTERM often means a peer has died."""
        if not self.stopping:
            return self.stall_timeout
        return min(self.stall_timeout, max(STOP_SILENCE_S, 4 * self.slowest_gap))

    def stalled(self, waited: float, what: str) -> StallError:
        if self.stopping:
            return StallError(f"stage {self.rank} waited {waited:.0f} s for {what} after an interrupt: that peer "
                              f"is gone, so the run stops without a final checkpoint")
        return StallError(f"stage {self.rank} waited {waited:.0f} s for {what} (--stall-timeout): "
                          f"that peer is dead or stuck")

    def wait(self, source: queue.Queue, what: str):
        """The next item of a queue; a StallError if none comes within the patience (re-read as we wait)."""
        started = time.perf_counter()
        while True:
            try:
                return source.get(timeout=POLL_S)
            except queue.Empty:
                waited = time.perf_counter() - started
                if waited > self.patience():
                    raise self.stalled(waited, what) from None

    def take(self, source: queue.Queue, what: str) -> Message:
        """A message from a helper thread, ready for use on the compute stream (or its failure, re-raised)."""
        item = self.wait(source, what)
        if isinstance(item, Failure):
            raise item.exc
        self.streams.accept(item.tensors, item.ready)
        return item

    def next(self) -> Message:
        """The next message from upstream (or the data source)."""
        started = time.perf_counter()
        depth = self.in_queue.qsize()
        upstream = "its data source" if self.rank == 0 else f"a batch from stage {self.rank - 1}"
        msg = self.take(self.in_queue, upstream)
        gap = time.perf_counter() - started
        self.wait_s += gap
        if self.messages:  # not the first message: that wait includes the peers' start-up
            self.slowest_gap = max(self.slowest_gap, gap)
        self.depth_sum += depth
        self.depth_max = max(self.depth_max, depth)
        self.messages += 1
        return msg

    def next_error(self, what: str, block: bool) -> Message | None:
        """The next remote gradient (waiting for it if `block`), or None if none has arrived."""
        if not block:
            try:
                item = self.errors.get_nowait()
            except queue.Empty:
                return None
            if isinstance(item, Failure):
                raise item.exc
            self.streams.accept(item.tensors, item.ready)
            return item
        started = time.perf_counter()
        with self.pause():
            item = self.take(self.errors, what)
        waited = time.perf_counter() - started
        self.error_wait_s += waited
        self.slowest_gap = max(self.slowest_gap, waited)  # a slow gradient's stage is not taken for gone when stopping
        return item

    def _count(self, msg: Message) -> None:
        if self.memory is not None:
            msg.release = self.memory.hold_message(msg.tensors, msg.release)

    def put(self, msg: Message) -> None:
        """Hand a message to the send thread; blocks while the output queue is full (backpressure)."""
        msg.ready = self.streams.record()
        self._count(msg)
        started = time.perf_counter()
        while True:
            self.raise_helper_failure()
            try:
                self.out_queue.put_nowait(msg)
                break
            except queue.Full:
                pass
            with self.pause():  # backpressure: the next stage is behind
                try:
                    self.out_queue.put(msg, timeout=POLL_S)
                    break
                except queue.Full:
                    waited = time.perf_counter() - started
                    if waited > self.patience():
                        raise self.stalled(waited, f"stage {self.rank + 1} to take a batch") from None
        self.blocked_s += time.perf_counter() - started

    def put_error(self, msg: Message) -> None:
        """Send a message on the remote-gradient links (DFA's output error to every earlier stage, dL/dh to the layer's
        stage, h back to the heads' stage, the heads' weights before a test)."""
        msg.ready = self.streams.record()
        self._count(msg)
        self.errors_out.put(msg)

    def raise_helper_failure(self) -> None:
        if self.helper_failure is not None:
            raise self.helper_failure

    def finish_sending(self) -> None:
        """After END: wait for the send threads to deliver it, or for a link to fail."""
        started = time.perf_counter()
        for sender in self.senders:
            while sender.is_alive() and self.helper_failure is None:
                if time.perf_counter() - started > self.patience():
                    raise self.stalled(time.perf_counter() - started, f"stage {self.rank + 1} to take END")
                sender.join(POLL_S)
        self.raise_helper_failure()
