"""Remote gradients: a batch's gradient that another stage computes and sends, applied when it arrives.

    this stage:   forward t (keep its graph) ──► send t on ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─► learn from g_t
    later stage:                                  receive t ──► g_t ──► send g_t back

Three learning schemes work this way, over the same channels (Links.feedback_in / feedback_out, every transport):
- DFA: g_t is batch t's output error, from the last stage to every earlier one (pipeline/engine/dfa_stage.py);
- split heads: g_t is dL/dh of a block whose local heads run on the next stage (pipeline/engine/remote_heads.py);
- heads first: the layer's stage awaits dL/dh from the stage before it, which awaits h from the layer's stage
  (pipeline/engine/upstream_heads.py): the same bookkeeping, with the other stage earlier in the pipeline.

The schedule (pipeline/engine/schedule.py) says when a stage applies them and which batch it waits for. Exact, the
gradient of t is applied before the awaiting blocks forward t+1: the sequential trainer. With a delay D > 0
they forward at most D batches past the oldest batch still awaiting its gradient, the weights each batch was
forwarded with kept for its update (a delayed gradient), and the delay seen is reported.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.transport.message import Kind, Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.stage_io import StageIO


@dataclass(slots=True)
class Awaiting:
    """A batch this stage forwarded and must still learn from, once its remote gradient arrives."""

    epoch: int
    index: int
    graph: Any  # what the update needs: the awaiting blocks' output graphs
    release: Callable[[], None]  # its receive buffers, kept until the update is done (the graph reads them)
    forwarded: int  # how many batches this stage had forwarded before it
    seq: int  # the stage's training step that forwarded it (Step.seq)


class RemoteGradients:
    """The batches of one stage that await a gradient from `source`, and their updates as the gradients come."""

    def __init__(self, rank: int, io: StageIO, watch: NonFiniteWatch, learn: Callable[[Any, Message], None], *,
                 what: Callable[[int], str]):
        """`what(index)` names batch index's gradient in messages, e.g. "the error of batch 3 from the last stage"."""
        self.rank, self.io, self.watch, self.learn = rank, io, watch, learn
        self.what = what
        self.awaiting: deque[Awaiting] = deque()
        self.forwarded = 0
        self.delay_sum = self.delay_max = self.updates = 0

    def expect(self, epoch: int, index: int, graph: Any, release: Callable[[], None], seq: int) -> None:
        """Batch (epoch, index), training step `seq`, was forwarded; `learn(graph, gradient message)` applies its
        update later."""
        self.awaiting.append(Awaiting(epoch, index, graph, release, self.forwarded, seq))
        self.forwarded += 1
        self.io.want_error()

    def apply(self, wait: bool, keep: int = 0) -> None:
        """Update with the gradients that have arrived; with `wait`, block until at most `keep` batches await one."""
        while len(self.awaiting) > keep:
            item = self.io.next_error(self.what(self.awaiting[0].index), block=wait)
            if item is None:
                return
            batch = self.awaiting.popleft()
            if (item.kind, item.epoch, item.index) != (Kind.FEEDBACK, batch.epoch, batch.index):
                raise RuntimeError(f"stage {self.rank} awaited {self.what(batch.index)} (epoch {batch.epoch}), got "
                                   f"{item.kind.name} for batch {item.index} (epoch {item.epoch})")
            with self.watch.at(batch.epoch, batch.index):  # a late update is named by its own batch
                self.learn(batch.graph, item)
            delay = self.forwarded - 1 - batch.forwarded  # batches forwarded since, with weights without this update
            self.delay_sum, self.delay_max, self.updates = self.delay_sum + delay, max(self.delay_max, delay), self.updates + 1
            batch.release()
            item.release()

    def apply_through(self, seq: int | None, early: bool = True) -> None:
        """The schedule's apply action: the updates whose gradients have come (with `early`), and then, unless
        `seq` is None, every update of training steps up to `seq`, waiting for their gradients."""
        if early:
            self.apply(wait=False)
        if seq is not None:
            self.apply(wait=True, keep=sum(batch.seq > seq for batch in self.awaiting))

    def settle(self) -> None:
        """Apply every outstanding update (before a test, a checkpoint or the end)."""
        if self.awaiting:
            self.apply(wait=True)

    def await_stream_end(self) -> None:
        """The sending stage ends the gradient stream after every gradient: nothing may be left unapplied. (Its END
        was wanted when this stage reached its own END: Stage._end.)"""
        item = self.io.next_error("the end of the remote-gradient stream", block=True)
        if item.kind != Kind.END:
            raise RuntimeError(f"stage {self.rank}: a remote gradient for batch {item.index} arrived after the end of the run")

    def report(self, prefix: str) -> dict:
        return {f"{prefix}_delay_mean": self.delay_sum / self.updates if self.updates else None,
                f"{prefix}_delay_max": self.delay_max if self.updates else None}


def send_gradient(io: StageIO, msg: Message, tensors: list, meta: dict | None = None) -> None:
    """Send batch `msg`'s remote gradient back to the stage(s) awaiting it."""
    io.put_error(Message(Kind.FEEDBACK, msg.epoch, msg.index, tensors, meta or {}))
