"""One stage's loop: receive a batch -> train this stage's blocks on it -> send the detached output on.

                 in_queue (<= D)                      out_queue (<= D)
    inbox ──► [feed thread] ──► compute (this thread) ──► [send thread] ──► outbox
    (stage 0: the data source instead of an inbox)        (last stage: no outbox, it reports)

The compute thread never waits for anything but its next input (under backpressure, room to send; with a
remote gradient, the gradient its next forward needs; with a block's heads first on this stage, h of the batch
before, and the heads' weights for a test on the layer's stage). The output is handed to the send thread as soon as the
blocks' forward passes are done; the blocks learn while it travels. Around this loop:
- pipeline/engine/schedule.py: the stage's actions for each batch, as data; its roles (pipeline/engine/roles.py) take them;
- pipeline/engine/stage_io.py: the helper threads and queues;
- pipeline/engine/remote_gradient.py: batches awaiting a gradient from another stage, for
  pipeline/engine/dfa_stage.py (DFA's output errors), pipeline/engine/remote_heads.py (a block's heads on the next stage) and
  pipeline/engine/upstream_heads.py (a block's heads on the previous stage);
- pipeline/observe/stage_report.py: the stage's report and the run's summary.
A message's receive buffers go back to the transport once the blocks have learned from it and the message that
carries its labels on has been sent (see release_after).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import torch
from tqdm import tqdm

from pipeline.observe.alignment import AlignmentLog
from pipeline.block.blocks import Block, learning_rate
from pipeline.persistence.checkpoint import fingerprint, flatten_state, save_weights, stage_state, unflatten_state
from pipeline.persistence.checkpoint_writer import CheckpointWriter, host_copy
from pipeline.config import Config, PipelineConfig
from pipeline.engine.cuda_streams import NoStreams, stage_streams
from pipeline.data import BatchSource
from pipeline.engine.dfa_stage import DfaBlocks, DfaOutput
from pipeline.run.faults import Hooks
from pipeline.transport.message import Kind, Message
from pipeline.observe.memory import MemoryMeter
from pipeline.engine.message_stream import data_messages
from pipeline.observe.metrics import MetricsWriter, Throughput, describe_epoch, epoch_record, test_record
from pipeline.model.factories import build_blocks
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.partition import Placement
from pipeline.observe.progress import LineProgress, progress_bar
from pipeline.engine.remote_heads import RemoteHeads, SplitLayer
from pipeline.run.restarts import ProgressFile, mark_stopped
from pipeline.engine.roles import Role, Step, WholeBlocks, take_actions
from pipeline.engine.schedule import buffer_users, stage_roles, stage_schedule
from pipeline.engine.stage_io import StageIO, StallError, release_after
from pipeline.observe.stage_report import run_summary, stage_report, stage_size
from pipeline.transport import Links
from pipeline.engine.upstream_heads import HeadsFirst, LayerAfterHeads

__all__ = ["Stage", "StallError", "data_messages", "release_after"]


def make_roles(names: list[str], rank: int, blocks: list[Block], io: StageIO, watch: NonFiniteWatch,
               pipe: PipelineConfig) -> dict[str, Role]:
    """The role objects of a stage, in block order: `names` from stage_roles, each on its blocks."""
    first, last = blocks[0], blocks[-1]
    whole = [b for b in blocks if b.part == "whole"]
    delay = pipe.heads_max_delay
    made = {"heads": lambda: RemoteHeads(first, io),
            "layer_after": lambda: LayerAfterHeads(rank, first, io, watch, delay),
            "blocks": lambda: WholeBlocks(whole),
            "layer": lambda: SplitLayer(rank, last, io, watch, delay),
            "heads_first": lambda: HeadsFirst(rank, last, io, watch),
            "dfa": lambda: DfaBlocks(rank, blocks, io, watch, pipe.dfa_max_delay),
            "dfa_output": lambda: DfaOutput(blocks, io)}
    return {name: made[name]() for name in names}


class Stage:
    """The blocks of one stage and the loop that trains them on the stream from upstream."""

    def __init__(self, cfg: Config, rank: int, world: int, blocks: list[Block], placement: Placement, *, links: Links,
                 source: BatchSource | None, device: torch.device, host: str, start: dict | None = None,
                 stop: threading.Event | None = None, streams: NoStreams | None = None, token: str = "",
                 hooks: Hooks = Hooks(), network: str | None = None):
        """`token`: this run attempt's, the same on every stage (it tells its checkpoint entries from stale ones);
        `hooks`: the faults and stops a test injects (pipeline/run/faults.py); `network`: the network's fingerprint
        from the run's plan, which its checkpoints record (None: made here when first needed)."""
        if (rank == 0) != (source is not None) or (rank > 0) != (links.inbox is not None) or (rank < world - 1) != (links.outbox is not None):
            raise ValueError(f"stage {rank} of {world} is wired wrongly")
        self.cfg, self.rank, self.world, self.blocks = cfg, rank, world, blocks
        self.network, self._print = network, None
        self.links, self.source = links, source
        self.device, self.host = device, host
        self.is_last = rank == world - 1
        self.streams = streams or stage_streams(device)
        self.memory = MemoryMeter().attach(blocks)  # saved tensors, gradients, messages (pipeline/observe/memory.py)
        self.io = StageIO(rank, links, self._incoming, queue_depth=cfg.pipeline.queue_depth,
                          stall_timeout=cfg.pipeline.stall_timeout, streams=self.streams, stop=stop, memory=self.memory)
        # every block's update flags, read every few batches and before anything reads weights or statistics
        self.watch = NonFiniteWatch(device=device, where=f"stage {rank}, ").attach(blocks)
        # the roles of this stage's blocks and their actions for each batch, as data (pipeline/engine/schedule.py)
        pipe = cfg.pipeline
        dfa = cfg.loss.loss == "dfa"
        self.schedule = stage_schedule(placement, rank, dfa=dfa, lean=pipe.stage_order == "lean",
                                       heads_delay=pipe.heads_max_delay, dfa_delay=pipe.dfa_max_delay)
        self.roles = make_roles(stage_roles(placement, rank, dfa), rank, blocks, self.io, self.watch, pipe)
        self.users = buffer_users(self.schedule)  # of a training batch's receive buffers
        self.scored = [b for b in blocks if b.part != "layer"]  # the blocks whose training statistics this stage reports
        self.tested = [block for role in self.roles.values() for block in role.tested]  # and whose classifier it scores
        self.start = start  # resume position
        self.steps = start["step"] if start else 0  # training steps finished, counted as checkpoint positions are
        self.seq = 0  # and those of this process (Step.seq)
        self.progress = ProgressFile(cfg, rank, self.steps)  # and kept where a restarted run reads how far this one got
        self.stopped_at: dict | None = None  # where a signal stopped the run early (END's position)
        self.checkpoint_s: list[float] = []  # each checkpoint's stall of this stage's compute thread
        self.checkpoints = CheckpointWriter(cfg.run.checkpoint_dir, rank, world, cfg.pipeline.stall_timeout, token)
        self._epoch = start["epoch"] if start and start["batch"] > 0 else 0  # mid-epoch: keep its running stats
        self._eval_hits: list[torch.Tensor | None] = [None] * len(self.tested)
        self._eval_examples = 0
        self._trained_until = self._test_began = time.perf_counter()  # the last stage's test passes, timed from
        # the end of the message before each (reset when the loop starts)
        self._test_s = 0.0  # their seconds so far (tests.jsonl: time to accuracy without them)
        self.timer = self.streams.timer()  # compute seconds (GPU time from CUDA events on a GPU)
        self.io.pause = self.timer.paused  # a wait for a peer is not compute
        self.started = time.perf_counter()
        self.hooks = hooks
        self.fault = hooks.fault(rank)  # none unless a fault test asks for one
        # the last stage keeps the run's metrics
        self.throughput = Throughput(cfg.run.warmup_batches)
        resumed = start["epoch"] if start else None
        self.writer = MetricsWriter(cfg.run.out, resumed, cfg.run.tensorboard, self.steps) if self.is_last else None
        self._bar: tqdm | LineProgress | None = None
        self.record: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}  # extra facts for this stage's report (e.g. the auto partition's profile)
        self._alignment: AlignmentLog | None = None
        self._alignment_net: list[Block] | None = None  # the last stage's copy of the whole network, for ALIGN

    def _incoming(self) -> Iterator[Message]:
        """What the feed thread reads: stage 0's data source, or the link from upstream."""
        if self.source is not None:
            yield from data_messages(self.source, self.cfg, self.start, self.io.stop, self.hooks)
            return
        while True:
            yield self.links.inbox.recv()

    # ---- compute thread -------------------------------------------------------------------------------------

    def _begin_epoch(self, msg: Message, reset: bool = True) -> None:
        self._epoch = msg.epoch
        for block in self.blocks:
            block.set_learning_rate(learning_rate(block.optim_config, msg.epoch))
            if reset:
                block.stats.reset()
        if self.is_last:
            self.throughput.start_epoch()
            self._bar = progress_bar(msg.meta.get("batches"), msg.index, f"epoch {msg.epoch}", self.cfg.run.progress)

    def _train(self, msg: Message) -> None:
        if msg.epoch != self._epoch:
            self._begin_epoch(msg)
        elif self.is_last and self._bar is None:  # resumed in the middle of this epoch
            self._begin_epoch(msg, reset=False)
        io = self.io
        self.watch.begin(msg.epoch, msg.index)  # the flags of earlier batches are read here every few batches
        self.timer.start()  # waits for a peer inside are left out (io.pause)
        with self.fault.around(msg.index, self.blocks), self.memory.saving():
            self._train_step(msg)
        self.timer.stop()
        self.steps += 1
        self.progress.finished(self.steps)
        io.raise_helper_failure()
        if self.is_last:
            self.throughput.batch_done(len(msg.tensors[1]))
            self._bar.update()

    def _train_step(self, msg: Message) -> None:
        """Run this stage's schedule on the batch, action by action."""
        x, y, *h = msg.tensors
        step = Step(msg, x, y, h[0] if h else None, release=release_after(self.users, msg.release), seq=self.seq)
        take_actions(self.schedule, self.roles, step, self._send)
        self.seq += 1
        step.release()

    def _send(self, step: Step) -> None:
        """The batch on to the next stage, after the forwards (whole blocks may learn while it travels)."""
        tensors = [step.x, step.y] + ([step.h_out] if step.h_out is not None else [])
        msg = step.msg
        self.io.put(Message(Kind.TRAIN, msg.epoch, msg.index, tensors, msg.meta, release=step.release))

    def _settle(self) -> None:
        """Every update of the batches before this point is in (remote gradients applied) and was finite."""
        for role in self.roles.values():
            role.settle()
        self.watch.check()

    def _eval(self, msg: Message) -> None:
        self._settle()  # the epoch's updates are all in before its test
        x, y, *h = msg.tensors
        self.timer.start()
        step = Step(msg, x, y, h[0] if h else None)
        for role in self.roles.values():
            role.evaluate(step)
        hits = step.hits
        tensors = [step.x, y] + ([step.h_out] if step.h_out is not None else [])
        self._eval_hits = [h if t is None else t + h for t, h in zip(self._eval_hits, hits)]
        self._eval_examples += len(y)
        meta = dict(msg.meta)
        if msg.index == 0:  # the pass's time at the output: from the end of the message before it
            self._test_began = self._trained_until
        if meta.get("last"):  # this stage's epoch results ride on the last test batch
            if not meta.get("interim"):
                meta["train_stats"] = meta.get("train_stats", []) + [b.stats.summary() for b in self.scored]
            meta["hits"] = meta.get("hits", []) + [None if h is None else int(h) for h in self._eval_hits]  # self.tested
            examples = self._eval_examples
            self._eval_hits, self._eval_examples = [None] * len(self.tested), 0
        self.timer.stop()
        if self.links.outbox is not None:
            self.io.put(Message(Kind.EVAL, msg.epoch, msg.index, tensors, meta, release=msg.release))
            return
        msg.release()
        if not meta.get("last"):
            return
        now = time.perf_counter()
        self._test_s += now - self._test_began
        if meta["interim"]:
            self.throughput.exclude(now - self._test_began)
        self.writer.test(test_record(msg.epoch, meta["step"], meta["interim"], meta["hits"], examples,
                                     now - self.started, self._test_s))
        if not meta["interim"]:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            rate = self.throughput.epoch_rate()
            lr = learning_rate(self.cfg.optim, msg.epoch)
            self.record = epoch_record(msg.epoch, lr, meta["train_stats"], meta["hits"], examples, rate, self.started)
            self.writer.epoch(self.record)
            tqdm.write(describe_epoch(self.record))

    def _align(self, msg: Message) -> None:
        """Add this stage's blocks to the ALIGN message; the last stage rebuilds the network and measures."""
        self._settle()  # the weights are read next: every update before this point in, on both halves of a split block
        flat, manifest = flatten_state(self.blocks)
        meta = {**msg.meta, "manifest": msg.meta.get("manifest", []) + [manifest]}
        tensors = msg.tensors + [flat]
        if not self.is_last:
            self.io.put(Message(Kind.ALIGN, msg.epoch, msg.index, tensors, meta, release=msg.release))
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
        """Snapshot this stage's state at the marker's position and pass the marker on; the writer thread makes it
        durable, and the last stage's completes the checkpoint (pipeline/persistence/checkpoint_writer.py)."""
        self._settle()  # no update may be in flight in a checkpoint (a remote gradient awaited)
        started = time.perf_counter()  # the stall: until the snapshot is taken and the marker handed on
        if self._print is None:
            self._print = fingerprint(self.cfg, self.network)
        print_ = self._print
        state = host_copy(stage_state(self.blocks, self.rank, self.world, msg.meta["position"], print_))
        if not self.is_last:  # on at once: the next stage never waits for this one's writes
            self.io.put(Message(Kind.CHECKPOINT, meta=msg.meta))
        self.checkpoints.submit(state, stage_size(self.blocks, self.rank), print_)
        self.checkpoint_s.append(time.perf_counter() - started)

    def report(self) -> dict[str, Any]:
        """This stage's timings and facts for stage_stats (pipeline/observe/stage_report.py)."""
        return stage_report(self)

    def _end(self, msg: Message) -> dict[str, Any] | None:
        self.stopped_at = msg.meta.get("stopped_at")
        self.progress.close()
        if self.stopped_at and self.is_last:
            mark_stopped(self.cfg, self.stopped_at)  # a restart of this stopped run stops too (pipeline/run/restarts.py)
        self._settle()
        if self.links.feedback_in:  # the peer's END on the gradient link comes next: receive it while this stage
            self.io.want_error()  # finishes sending (over gloo a send completes only once its receive is posted)
        if self.links.feedback_out:
            self.io.put_error(Message(Kind.END))  # the earlier stages' error feed threads stop on it
        if self.cfg.run.out:
            save_weights(self.cfg.run.out, self.blocks, self.rank)
        stages = msg.meta.get("stages", []) + [self.report()]
        if self.links.outbox is not None:
            self.io.put(Message(Kind.END, meta={**msg.meta, "stages": stages}))
            return None
        stopped = self.stopped_at
        if stopped:
            tqdm.write(f"stopped at epoch {stopped['epoch']} batch {stopped['batch']}"
                       + ("; continue with --resume" if self.cfg.run.checkpoint_dir else ""))
        summary = run_summary(self, stages, stopped)
        self.writer.summary(summary)
        return summary

    def run(self) -> dict[str, Any] | None:
        """Process the stream until END; the last stage returns the run's summary.

        The blocks were built (and perhaps restored from a checkpoint) on the default stream, which the helper
        and compute streams do not wait for implicitly: one device-wide sync here, at start-up, settles that.
        """
        if self.streams.enabled:
            torch.cuda.synchronize(self.device)  # start-up only (see the docstring); never per batch
        with self.streams.using(self.streams.new_stream()):  # the compute stream
            self.io.start()
            summary = self._loop()
            self.io.finish_sending()
            if self.links.feedback_in:
                for role in self.roles.values():
                    if role.receives:
                        role.await_stream_end()
        # the last checkpoint durable (and complete) before the stage leaves; not before END went on: a peer that
        # stops on a signal waits only seconds for END (StageIO.patience)
        self.checkpoints.wait()
        return summary

    def _loop(self) -> dict[str, Any] | None:
        handlers = {Kind.TRAIN: self._train, Kind.EVAL: self._eval, Kind.ALIGN: self._align, Kind.CHECKPOINT: self._checkpoint}
        self._trained_until = time.perf_counter()
        while True:
            msg = self.io.next()
            if msg.kind == Kind.END:
                return self._end(msg)
            handlers[msg.kind](msg)
            if msg.kind != Kind.EVAL:
                self._trained_until = time.perf_counter()
