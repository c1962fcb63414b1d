"""One stage's loop: receive a batch -> train this stage's blocks on it -> send the detached output on.

                 in_queue (<= D)                      out_queue (<= D)
    inbox ──► [feed thread] ──► compute (this thread) ──► [send thread] ──► outbox
    (stage 0: the data source instead of an inbox)        (last stage: no outbox, it reports)

DFA adds a second path: the last stage sends each training batch's output error e to every earlier stage
(an [error feed thread] there puts it on a queue); a stage applies it to the batch it kept, at once under
--dfa-sync, else whenever it arrives while the stage keeps forwarding (the delay is reported).

The compute thread never waits for anything but its next input (and, under backpressure, room to send).
The output is handed to the send thread as soon as the blocks' forward passes are done; the blocks learn
while it travels. Errors in the helper threads are carried to the compute thread and re-raised there.
A message's receive buffers go back to the transport once the blocks have learned from it and the message
that carries its labels on has been sent (see release_after).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import resource
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from pipeline.alignment import AlignmentLog
from pipeline.blocks import Block, NonFiniteLoss, evaluate_blocks, forward_for_feedback, learn_from_error, learning_rate, train_blocks
from pipeline.checkpoint import (fingerprint, finish_checkpoint, flatten_state, save_stage_checkpoint, save_weights,
                                 stage_state, unflatten_state)
from pipeline.config import Config
from pipeline.data import BatchSource
from pipeline.feedback import keep_weights_at_forward, output_error
from pipeline.message import Kind, Message
from pipeline.metrics import MetricsWriter, Throughput, describe_epoch, epoch_record
from pipeline.models import build_blocks
from pipeline.transport import Channel, Links

_POLL_S = 0.2
STOP_SILENCE_S = 3.0  # after an interrupt, a peer silent this long (or 4x its slowest batch) is taken for gone
FAULT_ENV = "PIPELINE_FAIL_AT"  # "STAGE:BATCH[:hang]": that stage raises (or hangs) at that batch (fault tests)


def _injected_fault(rank: int) -> tuple[int, str] | None:
    """(training batch, "raise" or "hang") at which this stage must fail, when a fault test asks for it."""
    parts = os.environ.get(FAULT_ENV, "").split(":")
    if len(parts) < 2 or int(parts[0]) != rank:
        return None
    return int(parts[1]), parts[2] if len(parts) > 2 else "raise"


class StallError(RuntimeError):
    """A peer stopped making progress for longer than --stall-timeout (or, once stopping, the stop patience)."""


class _Failure:
    """An exception raised in a helper thread, to be re-raised by the compute thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


@dataclass(slots=True)
class _AwaitingError:
    """A training batch this stage forwarded and must still update its DFA blocks with, once its error arrives."""

    epoch: int
    index: int
    states: list[torch.Tensor]  # each block's output graph
    release: Callable[[], None]  # its receive buffers, kept until the update is done
    forwarded: int  # how many batches this stage had forwarded before it


def release_after(count: int, release):
    """A callback that calls `release` on its `count`-th call: the buffers of a received message go back only
    when both its users are done, the compute thread (the blocks' backward reads the input) and the send thread
    (the labels travel on with the output)."""
    lock, calls = threading.Lock(), [0]

    def countdown() -> None:
        with lock:
            calls[0] += 1
            last = calls[0] == count
        if last:
            release()

    return countdown


def data_messages(source: BatchSource, cfg: Config, start: dict | None = None,
                  stop: threading.Event | None = None) -> Iterator[Message]:
    """Stage 0's input stream: each epoch's training batches, then its test batches, then END.

    Also: an ALIGN message (held-out batches) every --log-alignment steps and at each epoch's end; a CHECKPOINT
    marker every --checkpoint-every batches or epochs and at the end; and, once `stop` is set, a last CHECKPOINT
    and END at the next batch boundary. A resumed run starts at `start` (a checkpoint position).
    """
    run = cfg.run
    align_every = run.log_alignment
    heldout = [t for b in itertools.islice(source.eval_batches(), run.alignment_batches) for t in (b.x, b.y)] if align_every else []
    every = run.checkpoint_every
    start = start or {"epoch": 1, "batch": 0, "step": 0}
    step = start["step"]

    def checkpoint(epoch: int, batch: int, stopping: bool = False) -> Message:
        return Message(Kind.CHECKPOINT, meta={"position": {"epoch": epoch, "batch": batch, "step": step}, "stop": stopping})

    for epoch in range(start["epoch"], run.epochs + 1):
        batches = source.num_train_batches
        for batch in source.train_batches(epoch, start["batch"] if epoch == start["epoch"] else 0):
            if stop is not None and stop.is_set():
                if run.checkpoint_dir:
                    yield checkpoint(epoch, batch.index, stopping=True)
                yield Message(Kind.END, meta={"stopped_at": {"epoch": epoch, "batch": batch.index, "step": step}})
                return
            meta = {"batches": batches} if batch.index == 0 else {}
            yield Message(Kind.TRAIN, epoch, batch.index, [batch.x, batch.y], meta)
            step += 1
            if align_every and step % align_every == 0:
                yield Message(Kind.ALIGN, epoch, step, list(heldout), {"epoch_end": False})
            if run.checkpoint_dir and every and run.checkpoint_unit == "batch" and step % every == 0:
                yield checkpoint(epoch, batch.index + 1)
        if align_every:
            yield Message(Kind.ALIGN, epoch, step, list(heldout), {"epoch_end": True})
        last = source.num_eval_batches - 1
        for batch in source.eval_batches():
            yield Message(Kind.EVAL, epoch, batch.index, [batch.x, batch.y], {"last": True} if batch.index == last else {})
        due = every and run.checkpoint_unit == "epoch" and epoch % every == 0
        if run.checkpoint_dir and (due or epoch == run.epochs):
            yield checkpoint(epoch + 1, 0)
    yield Message(Kind.END)


class Stage:
    """The blocks of one stage and the loop that trains them on the stream from upstream."""

    def __init__(self, cfg: Config, rank: int, world: int, blocks: list[Block], *, links: Links,
                 source: BatchSource | None, device: torch.device, host: str, start: dict | None = None,
                 stop: threading.Event | None = None):
        inbox, outbox = links.inbox, links.outbox
        if (rank == 0) != (source is not None) or (rank > 0) != (inbox is not None) or (rank < world - 1) != (outbox is not None):
            raise ValueError(f"stage {rank} of {world} is wired wrongly")
        self.cfg, self.rank, self.world, self.blocks = cfg, rank, world, blocks
        self.links, self.inbox, self.outbox, self.source = links, inbox, outbox, source
        self.device, self.host = device, host
        self.is_last = rank == world - 1
        self.dfa = cfg.loss.loss == "dfa"
        self.in_queue: queue.Queue = queue.Queue(maxsize=cfg.pipeline.queue_depth)
        self.out_queue: queue.Queue = queue.Queue(maxsize=cfg.pipeline.queue_depth)
        self.errors: queue.Queue = queue.Queue()  # DFA errors that arrived (at most the batches awaiting one)
        self.errors_out: queue.Queue = queue.Queue()  # last stage: errors on their way back
        self._awaiting: deque[_AwaitingError] = deque()
        self._forwarded = 0
        self._helper_failure: BaseException | None = None
        self.start, self.stop = start, stop  # resume position; stage 0 watches `stop` (a signal arrived)
        self._epoch = start["epoch"] if start and start["batch"] > 0 else 0  # mid-epoch: keep its running stats
        self._checkpoint_files: list[dict] = []
        self._eval_hits: list[torch.Tensor | None] = [None] * len(blocks)
        self._eval_examples = 0
        # timings (seconds) and counts for the stage report
        self.compute_s = self.wait_s = self.blocked_s = self.send_s = self.error_wait_s = 0.0
        self._depth_sum = self._depth_max = self._messages = 0
        self._delay_sum = self._delay_max = self._updates = 0
        self._slowest_gap = 0.0  # longest wait for an upstream message after the first (sets the stop patience)
        self._started = time.perf_counter()
        self._fail_at = _injected_fault(rank)
        # the last stage keeps the run's metrics
        self.throughput = Throughput(cfg.run.warmup_batches)
        self.writer = MetricsWriter(cfg.run.out, append=cfg.run.resume) if self.is_last else None
        self._bar: tqdm | None = None
        self._record: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}  # extra facts for this stage's report (e.g. the auto partition's profile)
        self._alignment: AlignmentLog | None = None
        self._alignment_net: list[Block] | None = None  # the last stage's copy of the whole network, for ALIGN

    # ---- helper threads -------------------------------------------------------------------------------------

    def _incoming(self) -> Iterator[Message]:
        if self.source is not None:
            yield from data_messages(self.source, self.cfg, self.start, self.stop)
            return
        while True:
            yield self.inbox.recv()

    def _feed(self) -> None:
        try:
            for msg in self._incoming():
                self.in_queue.put(msg)
                if msg.kind == Kind.END:
                    return
        except BaseException as exc:  # carried to the compute thread
            self.in_queue.put(_Failure(exc))

    def _drain(self, pending: queue.Queue, channels: list[Channel]) -> None:
        """Send thread: deliver queued messages on every channel, in order, until END has gone."""
        try:
            while True:
                msg = pending.get()
                started = time.perf_counter()
                for channel in channels:
                    channel.send(msg)
                self.send_s += time.perf_counter() - started
                msg.release()
                if msg.kind == Kind.END:
                    return
        except BaseException as exc:
            self._helper_failure = exc

    def _feed_errors(self) -> None:
        """Error feed thread (DFA, stages before the last): errors from the last stage, until its END."""
        try:
            while True:
                msg = self.links.feedback_in.recv()
                self.errors.put(msg)
                if msg.kind == Kind.END:
                    return
        except BaseException as exc:
            self.errors.put(_Failure(exc))

    # ---- compute thread -------------------------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _patience(self) -> float:
        """How long a peer may stay silent: --stall-timeout; once an interrupt asked the run to stop, only a few
        seconds (or 4x the slowest gap seen so far) -- under torchrun a SIGTERM often means a peer has died."""
        if not self._stopping:
            return self.cfg.pipeline.stall_timeout
        return min(self.cfg.pipeline.stall_timeout, max(STOP_SILENCE_S, 4 * self._slowest_gap))

    def _stalled(self, waited: float, what: str) -> StallError:
        if self._stopping:
            return StallError(f"stage {self.rank} waited {waited:.0f} s for {what} after an interrupt: that peer "
                              f"is gone, so the run stops without a final checkpoint")
        return StallError(f"stage {self.rank} waited {waited:.0f} s for {what} (--stall-timeout): "
                          f"that peer is dead or stuck")

    def _wait(self, source: queue.Queue, what: str):
        """The next item of a queue; a StallError if none comes within the patience (re-read as we wait)."""
        started = time.perf_counter()
        while True:
            try:
                return source.get(timeout=_POLL_S)
            except queue.Empty:
                waited = time.perf_counter() - started
                if waited > self._patience():
                    raise self._stalled(waited, what) from None

    def _next(self) -> Message:
        started = time.perf_counter()
        depth = self.in_queue.qsize()
        upstream = "its data source" if self.rank == 0 else f"a batch from stage {self.rank - 1}"
        item = self._wait(self.in_queue, upstream)
        gap = time.perf_counter() - started
        self.wait_s += gap
        if self._messages:  # not the first message: that wait includes the peers' start-up
            self._slowest_gap = max(self._slowest_gap, gap)
        self._depth_sum += depth
        self._depth_max = max(self._depth_max, depth)
        self._messages += 1
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def _put(self, msg: Message) -> None:
        started = time.perf_counter()
        while True:
            if self._helper_failure is not None:
                raise self._helper_failure
            try:
                self.out_queue.put(msg, timeout=_POLL_S)
                break
            except queue.Full:
                waited = time.perf_counter() - started
                if waited > self._patience():
                    raise self._stalled(waited, f"stage {self.rank + 1} to take a batch") from None
        self.blocked_s += time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":  # so that compute time is GPU time, not kernel-launch time
            torch.cuda.synchronize(self.device)

    def _begin_epoch(self, msg: Message, reset: bool = True) -> None:
        self._epoch = msg.epoch
        lr = learning_rate(self.cfg.optim, msg.epoch)
        for block in self.blocks:
            block.set_learning_rate(lr)
            if reset:
                block.stats.reset()
        if self.is_last:
            self.throughput.start_epoch()
            self._bar = tqdm(total=msg.meta.get("batches"), initial=msg.index, desc=f"epoch {msg.epoch}", unit="batch",
                             leave=False, disable=not self.cfg.run.progress, dynamic_ncols=True)

    def _train(self, msg: Message) -> None:
        if msg.epoch != self._epoch:
            self._begin_epoch(msg)
        elif self.is_last and self._bar is None:  # resumed in the middle of this epoch
            self._begin_epoch(msg, reset=False)
        if self._fail_at and msg.index == self._fail_at[0]:
            if self._fail_at[1] == "hang":
                time.sleep(10 ** 6)  # a stuck stage: its neighbours must notice (--stall-timeout)
            raise RuntimeError(f"injected failure at batch {msg.index} ({FAULT_ENV})")
        started, blocked, waited = time.perf_counter(), self.blocked_s, self.error_wait_s
        try:
            self._train_step(msg)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"stage {self.rank}, epoch {msg.epoch} batch {msg.index}, {exc}") from None
        self._sync()
        self.compute_s += time.perf_counter() - started - (self.blocked_s - blocked) - (self.error_wait_s - waited)
        if self._helper_failure is not None:
            raise self._helper_failure
        if self.is_last:
            self.throughput.batch_done(len(msg.tensors[1]))
            self._bar.update()

    def _train_step(self, msg: Message) -> None:
        if self.dfa:
            (self._train_dfa_last if self.is_last else self._train_dfa)(msg)
        elif self.outbox is None:
            train_blocks(self.blocks, *msg.tensors)
            msg.release()
        else:
            x, y = msg.tensors
            release = release_after(2, msg.release)

            def hand_off(out: torch.Tensor) -> None:
                self._put(Message(Kind.TRAIN, msg.epoch, msg.index, [out, y], msg.meta, release=release))

            train_blocks(self.blocks, x, y, hand_off)
            release()

    def _train_dfa(self, msg: Message) -> None:
        """DFA, a stage before the last: forward, send on, keep the graphs until this batch's error arrives."""
        x, y = msg.tensors
        release = release_after(2, msg.release)  # x stays in the kept graph until the update
        max_delay = self.cfg.pipeline.dfa_max_delay
        with keep_weights_at_forward(self.parameters()) if max_delay != 0 else contextlib.nullcontext():
            states, out = forward_for_feedback(self.blocks, x)
        self._put(Message(Kind.TRAIN, msg.epoch, msg.index, [out, y], msg.meta, release=release))
        self._awaiting.append(_AwaitingError(msg.epoch, msg.index, states, release, self._forwarded))
        self._forwarded += 1
        self._apply_errors(wait=False)
        if max_delay is not None:  # the next batch may not be forwarded more than max_delay batches past an error
            self._apply_errors(wait=True, keep=max_delay)

    def _train_dfa_last(self, msg: Message) -> None:
        """DFA, the last stage: the output error of the batch goes back to every earlier stage, and updates this one."""
        x, y = msg.tensors
        *hidden, output = self.blocks
        states, x = forward_for_feedback(hidden, x)
        logits, _ = output.forward_train(x)
        error = output_error(logits, y)
        if self.links.feedback_out:
            self.errors_out.put(Message(Kind.FEEDBACK, msg.epoch, msg.index, [error]))
        output.learn(logits, y)
        learn_from_error(hidden, states, error)
        self._updates += 1  # applied at once: delay 0
        msg.release()

    def parameters(self) -> list[torch.Tensor]:
        return [p for block in self.blocks for p in block.parameters()]

    def _apply_errors(self, wait: bool, keep: int = 0) -> None:
        """Update with the errors that have arrived; with `wait`, block until at most `keep` batches await one."""
        while len(self._awaiting) > keep:
            if wait:
                started = time.perf_counter()
                item = self._wait(self.errors, f"the error of batch {self._awaiting[0].index} from the last stage")
                self.error_wait_s += time.perf_counter() - started
            else:
                try:
                    item = self.errors.get_nowait()
                except queue.Empty:
                    return
            if isinstance(item, _Failure):
                raise item.exc
            batch = self._awaiting.popleft()
            if (item.kind, item.epoch, item.index) != (Kind.FEEDBACK, batch.epoch, batch.index):
                raise RuntimeError(f"stage {self.rank} awaited the error of batch {batch.index} (epoch {batch.epoch}), "
                                   f"got {item.kind.name} for batch {item.index} (epoch {item.epoch})")
            learn_from_error(self.blocks, batch.states, item.tensors[0])
            delay = self._forwarded - 1 - batch.forwarded  # batches forwarded since, with weights without this update
            self._delay_sum, self._delay_max, self._updates = self._delay_sum + delay, max(self._delay_max, delay), self._updates + 1
            batch.release()
            item.release()

    def _eval(self, msg: Message) -> None:
        if self._awaiting:  # the epoch's updates are all in before its test
            self._apply_errors(wait=True)
        x, y = msg.tensors
        started = time.perf_counter()
        out, hits = evaluate_blocks(self.blocks, x, y)
        self._eval_hits = [h if t is None else t + h for t, h in zip(self._eval_hits, hits)]
        self._eval_examples += len(y)
        meta = dict(msg.meta)
        if meta.get("last"):  # this stage's epoch results ride on the last test batch
            meta["train_stats"] = meta.get("train_stats", []) + [b.stats.summary() for b in self.blocks]
            meta["hits"] = meta.get("hits", []) + [None if h is None else int(h) for h in self._eval_hits]
            examples = self._eval_examples
            self._eval_hits, self._eval_examples = [None] * len(self.blocks), 0
        self._sync()
        self.compute_s += time.perf_counter() - started
        if self.outbox is not None:
            self._put(Message(Kind.EVAL, msg.epoch, msg.index, [out, y], meta, release=msg.release))
            return
        msg.release()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if meta.get("last"):
            rate = self.throughput.epoch_rate()
            lr = learning_rate(self.cfg.optim, msg.epoch)
            self._record = epoch_record(msg.epoch, lr, meta["train_stats"], meta["hits"], examples, rate, self._started)
            self.writer.epoch(self._record)
            tqdm.write(describe_epoch(self._record))

    def _align(self, msg: Message) -> None:
        """Add this stage's blocks to the ALIGN message; the last stage rebuilds the network and measures."""
        flat, manifest = flatten_state(self.blocks)
        meta = {**msg.meta, "manifest": msg.meta.get("manifest", []) + [manifest]}
        tensors = msg.tensors + [flat]
        if not self.is_last:
            self._put(Message(Kind.ALIGN, msg.epoch, msg.index, tensors, meta, release=msg.release))
            return
        batches = 2 * self.cfg.run.alignment_batches
        heldout = list(zip(tensors[0:batches:2], tensors[1:batches:2]))
        if self._alignment_net is None:
            shape, classes = BatchSource.shape_of(self.cfg.data)
            self._alignment_net = build_blocks(self.cfg, shape, classes, device=self.device)
            self._alignment = AlignmentLog(heldout, self.cfg.loss.loss, self.cfg.run.out)
        for state, stage_manifest in zip(tensors[batches:], meta["manifest"]):
            for index, partial in unflatten_state(state, stage_manifest).items():
                self._alignment_net[index].load_state_dict(partial, strict=False)
        self._alignment.heldout = heldout
        self._alignment.measure(self._alignment_net, msg.index, msg.epoch, epoch_end=meta["epoch_end"])
        msg.release()

    def _checkpoint(self, msg: Message) -> None:
        """Save this stage's state at the marker's position, pass it on; the last stage completes the checkpoint."""
        if self._awaiting:  # DFA: no update may be in flight in a checkpoint
            self._apply_errors(wait=True)
        root, position, print_ = self.cfg.run.checkpoint_dir, msg.meta["position"], fingerprint(self.cfg)
        entry = save_stage_checkpoint(root, stage_state(self.blocks, self.rank, self.world, position, print_))
        files = msg.meta.get("files", []) + [entry]
        if not self.is_last:
            self._put(Message(Kind.CHECKPOINT, meta={**msg.meta, "files": files}))
            return
        folder = finish_checkpoint(root, position, self.world, files, print_)
        tqdm.write(f"checkpoint {folder} (epoch {position['epoch']}, next batch {position['batch']})")

    def report(self) -> dict[str, Any]:
        """This stage's timings: where its wall time went, and how full its input queue was."""
        wall = time.perf_counter() - self._started
        return {
            "stage": self.rank,
            "blocks": [b.index for b in self.blocks],
            "host": self.host,
            "device": str(self.device),
            "pid": os.getpid(),
            "wall_s": wall,
            "compute_s": self.compute_s,
            "wait_s": self.wait_s,
            "blocked_s": self.blocked_s,
            "send_s": self.send_s,
            "busy_fraction": self.compute_s / wall if wall > 0 else 0.0,
            "mean_queue_depth": self._depth_sum / max(1, self._messages),
            "max_queue_depth": self._depth_max,
            "messages": self._messages,
            "receive_buffers": getattr(getattr(self.inbox, "pool", None), "allocated", None),
            "rejected_messages": getattr(self.inbox, "rejected", None),
            "dfa_delay_mean": self._delay_sum / self._updates if self._updates else None,
            "dfa_delay_max": self._delay_max if self._updates else None,
            "error_wait_s": self.error_wait_s,
            "skipped_updates": {b.index: b.skipped for b in self.blocks if b.skipped},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None,
            **self.notes,
        }

    def _end(self, msg: Message) -> dict[str, Any] | None:
        if self._awaiting:
            self._apply_errors(wait=True)
        if self.links.feedback_out:
            self.errors_out.put(Message(Kind.END))  # the earlier stages' error feed threads stop on it
        if self.cfg.run.out:
            save_weights(self.cfg.run.out, self.blocks, self.rank)
        stages = msg.meta.get("stages", []) + [self.report()]
        if self.outbox is not None:
            self._put(Message(Kind.END, meta={**msg.meta, "stages": stages}))
            return None
        stopped = msg.meta.get("stopped_at")
        if stopped:
            tqdm.write(f"stopped at epoch {stopped['epoch']} batch {stopped['batch']}"
                       + ("; continue with --resume" if self.cfg.run.checkpoint_dir else ""))
        summary = {
            "mode": "pipeline",
            "stopped_at": stopped,
            "stages": self.world,
            "transport": self.cfg.pipeline.transport,
            "partition": [len(s["blocks"]) for s in stages],
            "test_error": self._record.get("test_error"),
            "layer_test_errors": self._record.get("layer_test_errors"),
            "train_samples_per_s": self.throughput.rate(),
            "wall_s": time.perf_counter() - self._started,
            "epochs": self.cfg.run.epochs,
            "busy_fraction": [s["busy_fraction"] for s in stages],
            "stage_stats": stages,
            "config": self.cfg.to_dict(),
        }
        self.writer.summary(summary)
        return summary

    def run(self) -> dict[str, Any] | None:
        """Process the stream until END; the last stage returns the run's summary."""
        threads = [threading.Thread(target=self._feed, name=f"stage{self.rank}-feed", daemon=True)]
        senders = []
        if self.outbox:
            senders.append(threading.Thread(target=self._drain, args=(self.out_queue, [self.outbox]),
                                            name=f"stage{self.rank}-send", daemon=True))
        if self.links.feedback_out:
            senders.append(threading.Thread(target=self._drain, args=(self.errors_out, self.links.feedback_out),
                                            name=f"stage{self.rank}-send-errors", daemon=True))
        if self.links.feedback_in:
            threads.append(threading.Thread(target=self._feed_errors, name=f"stage{self.rank}-feed-errors", daemon=True))
        for thread in threads + senders:
            thread.start()
        while True:
            msg = self._next()
            if msg.kind == Kind.TRAIN:
                self._train(msg)
            elif msg.kind == Kind.EVAL:
                self._eval(msg)
            elif msg.kind == Kind.ALIGN:
                self._align(msg)
            elif msg.kind == Kind.CHECKPOINT:
                self._checkpoint(msg)
            else:
                summary = self._end(msg)
                break
        started = time.perf_counter()
        for sender in senders:  # END is on its way; wait for it to leave, or for a link to fail
            while sender.is_alive() and self._helper_failure is None:
                if time.perf_counter() - started > self._patience():
                    raise self._stalled(time.perf_counter() - started, f"stage {self.rank + 1} to take END")
                sender.join(_POLL_S)
        if self._helper_failure is not None:
            raise self._helper_failure
        if self.links.feedback_in:
            self._await_error_stream_end()
        return summary

    def _await_error_stream_end(self) -> None:
        """The last stage ends the error stream after every error: nothing may be left unapplied."""
        item = self._wait(self.errors, "the end of the error stream from the last stage")
        if isinstance(item, _Failure):
            raise item.exc
        if item.kind != Kind.END:
            raise RuntimeError(f"stage {self.rank}: an error for batch {item.index} arrived after the end of the run")
