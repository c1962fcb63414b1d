"""DFA in a pipeline: the last stage sends each batch's output error back; earlier stages apply it when it comes.

    stage k:   forward t ──► send t on ──► keep t's graphs ─ ─ ─ ─ ─ ─ ─ ─ ─ ─► learn from e_t
    stage K-1: forward t ──► e_t = softmax(out) - onehot(y) ──► e_t to every earlier stage, learn from e_t

Under --dfa-sync (max delay 0) a stage waits for e_t before it forwards t+1: exactly the sequential DFA
trainer. Otherwise it forwards at most --dfa-max-delay batches past the oldest batch still awaiting its error
(with the weights each batch was forwarded with kept for its update), and reports the delay it saw.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.blocks import Block, forward_for_feedback, learn_from_error
from pipeline.feedback import keep_weights_at_forward, output_error
from pipeline.message import Kind, Message
from pipeline.nonfinite import NonFiniteWatch
from pipeline.stage_io import StageIO, release_after


@dataclass(slots=True)
class AwaitingError:
    """A training batch this stage forwarded and must still update its DFA blocks with, once its error arrives."""

    epoch: int
    index: int
    states: list[torch.Tensor]  # each block's output graph
    release: Callable[[], None]  # its receive buffers, kept until the update is done
    forwarded: int  # how many batches this stage had forwarded before it


class ErrorFeedback:
    """The DFA side of one stage: forwarding with kept graphs, and updates as the errors come back."""

    def __init__(self, rank: int, blocks: list[Block], io: StageIO, watch: NonFiniteWatch, *, is_last: bool,
                 has_errors_out: bool, max_delay: int | None):
        self.rank, self.blocks, self.io, self.watch = rank, blocks, io, watch
        self.is_last, self.has_errors_out, self.max_delay = is_last, has_errors_out, max_delay
        self.awaiting: deque[AwaitingError] = deque()
        self.forwarded = 0
        self.delay_sum = self.delay_max = self.updates = 0

    def parameters(self) -> list[torch.Tensor]:
        return [p for block in self.blocks for p in block.parameters()]

    def train(self, msg: Message) -> None:
        (self._train_last if self.is_last else self._train_forward)(msg)

    def _train_forward(self, msg: Message) -> None:
        """A stage before the last: forward, send on, keep the graphs until this batch's error arrives."""
        x, y = msg.tensors
        release = release_after(2, msg.release)  # x stays in the kept graph until the update
        keep = keep_weights_at_forward(self.parameters()) if self.max_delay != 0 else contextlib.nullcontext()
        with keep:
            states, out = forward_for_feedback(self.blocks, x)
        self.io.put(Message(Kind.TRAIN, msg.epoch, msg.index, [out, y], msg.meta, release=release))
        self.awaiting.append(AwaitingError(msg.epoch, msg.index, states, release, self.forwarded))
        self.forwarded += 1
        self.apply(wait=False)
        if self.max_delay is not None:  # the next batch may not be forwarded more than max_delay batches past an error
            self.apply(wait=True, keep=self.max_delay)

    def _train_last(self, msg: Message) -> None:
        """The last stage: the output error of the batch goes back to every earlier stage, and updates this one."""
        x, y = msg.tensors
        *hidden, output = self.blocks
        states, x = forward_for_feedback(hidden, x)
        logits, _ = output.forward_train(x)
        error = output_error(logits, y)
        if self.has_errors_out:
            self.io.put_error(Message(Kind.FEEDBACK, msg.epoch, msg.index, [error]))
        output.learn(logits, y)
        learn_from_error(hidden, states, error)
        self.updates += 1  # applied at once: delay 0
        msg.release()

    def apply(self, wait: bool, keep: int = 0) -> None:
        """Update with the errors that have arrived; with `wait`, block until at most `keep` batches await one."""
        while len(self.awaiting) > keep:
            what = f"the error of batch {self.awaiting[0].index} from the last stage"
            item = self.io.next_error(what, block=wait)
            if item is None:
                return
            batch = self.awaiting.popleft()
            if (item.kind, item.epoch, item.index) != (Kind.FEEDBACK, batch.epoch, batch.index):
                raise RuntimeError(f"stage {self.rank} awaited the error of batch {batch.index} (epoch {batch.epoch}), "
                                   f"got {item.kind.name} for batch {item.index} (epoch {item.epoch})")
            with self.watch.at(batch.epoch, batch.index):  # a late update is named by its own batch
                learn_from_error(self.blocks, batch.states, item.tensors[0])
            delay = self.forwarded - 1 - batch.forwarded  # batches forwarded since, with weights without this update
            self.delay_sum, self.delay_max, self.updates = self.delay_sum + delay, max(self.delay_max, delay), self.updates + 1
            batch.release()
            item.release()

    def settle(self) -> None:
        """Apply every outstanding update (before a test, a checkpoint or the end)."""
        if self.awaiting:
            self.apply(wait=True)

    def await_stream_end(self) -> None:
        """The last stage ends the error stream after every error: nothing may be left unapplied."""
        item = self.io.next_error("the end of the error stream from the last stage", block=True)
        if item.kind != Kind.END:
            raise RuntimeError(f"stage {self.rank}: an error for batch {item.index} arrived after the end of the run")

    def report(self) -> dict:
        return {"dfa_delay_mean": self.delay_sum / self.updates if self.updates else None,
                "dfa_delay_max": self.delay_max if self.updates else None}
