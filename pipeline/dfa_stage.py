"""DFA in a pipeline: the last stage sends each batch's output error back; earlier stages apply it when it comes.

    stage k:   forward t ──► send t on ──► keep t's graphs ─ ─ ─ ─ ─ ─ ─ ─ ─ ─► learn from e_t
    stage K-1: forward t ──► e_t = softmax(out) - onehot(y) ──► e_t to every earlier stage, learn from e_t

Under --dfa-sync (max delay 0) a stage waits for e_t before it forwards t+1: exactly the sequential DFA
trainer. Otherwise it forwards at most --dfa-max-delay batches past the oldest batch still awaiting its error
(with the weights each batch was forwarded with kept for its update), and reports the delay it saw.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.blocks import Block, forward_for_feedback, learn_from_error
from pipeline.feedback import keep_weights_at_forward, output_error
from pipeline.message import Kind, Message
from pipeline.nonfinite import NonFiniteWatch
from pipeline.remote_gradient import RemoteGradients, send_gradient
from pipeline.stage_io import StageIO, release_after


class ErrorFeedback:
    """The DFA side of one stage: forwarding with kept graphs, and updates as the errors come back (the errors are
    remote gradients, pipeline/remote_gradient.py)."""

    def __init__(self, rank: int, blocks: list[Block], io: StageIO, watch: NonFiniteWatch, *, is_last: bool,
                 has_errors_out: bool, max_delay: int | None):
        self.rank, self.blocks, self.io = rank, blocks, io
        self.is_last, self.has_errors_out, self.max_delay = is_last, has_errors_out, max_delay
        self.errors = RemoteGradients(rank, io, watch, self._learn, max_delay=max_delay,
                                      what=lambda index: f"the error of batch {index} from the last stage")
        self.last_updates = 0  # the last stage applies each error at once: delay 0

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
        self.errors.expect(msg.epoch, msg.index, states, release)
        self.errors.before_forward()  # the next batch may not be forwarded more than max_delay batches past an error

    def _learn(self, states: list[torch.Tensor], error: Message) -> None:
        learn_from_error(self.blocks, states, error.tensors[0])

    def _train_last(self, msg: Message) -> None:
        """The last stage: the output error of the batch goes back to every earlier stage, and updates this one."""
        x, y = msg.tensors
        *hidden, output = self.blocks
        states, x = forward_for_feedback(hidden, x)
        logits, _ = output.forward_train(x)
        error = output_error(logits, y)
        if self.has_errors_out:
            send_gradient(self.io, msg, [error])
        output.learn(logits, y)
        learn_from_error(hidden, states, error)
        self.last_updates += 1
        msg.release()

    def report(self) -> dict:
        if self.is_last:
            return {"dfa_delay_mean": 0.0 if self.last_updates else None, "dfa_delay_max": 0 if self.last_updates else None}
        return self.errors.report("dfa")
