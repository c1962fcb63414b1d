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

from pipeline.block.blocks import Block, forward_for_feedback, learn_from_error
from pipeline.model.feedback import keep_weights_at_forward, output_error
from pipeline.transport.message import Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.remote_gradient import RemoteGradients, send_gradient
from pipeline.engine.roles import Role, Step
from pipeline.engine.schedule import Action
from pipeline.engine.stage_io import StageIO


class DfaBlocks(Role):
    """DFA's hidden blocks on a stage before the last: forwarding with kept graphs, and updates as the output
    errors come back (remote gradients, pipeline/engine/remote_gradient.py)."""

    name = "dfa"
    receives = True  # the output errors

    def __init__(self, rank: int, blocks: list[Block], io: StageIO, watch: NonFiniteWatch, max_delay: int | None):
        super().__init__(blocks)
        self.max_delay = max_delay
        self.errors = RemoteGradients(rank, io, watch, self._learn,
                                      what=lambda index: f"the error of batch {index} from the last stage")

    def forward(self, step: Step, action: Action) -> None:
        """Forward, the graphs (and, under a delay, the weights) kept until this batch's error arrives."""
        parameters = [p for block in self.blocks for p in block.parameters()]
        with keep_weights_at_forward(parameters) if self.max_delay != 0 else contextlib.nullcontext():
            states, step.x = forward_for_feedback(self.blocks, step.x)
        self.errors.expect(step.msg.epoch, step.msg.index, states, step.release, step.seq)

    def apply(self, step: Step, action: Action) -> None:
        """The errors that came, and that of batch t - lag, waited for (no batch goes more than lag past one)."""
        self.errors.apply_through(None if action.lag is None else step.seq - action.lag)

    def _learn(self, states: list[torch.Tensor], error: Message) -> None:
        learn_from_error(self.blocks, states, error.tensors[0])

    def settle(self) -> None:
        self.errors.settle()

    def await_stream_end(self) -> None:
        self.errors.await_stream_end()

    def report(self) -> dict:
        return self.errors.report("dfa")


class DfaOutput(Role):
    """The last stage under DFA: its hidden blocks and the output; each batch's output error goes back to every
    earlier stage and updates this one at once."""

    name = "dfa_output"

    def __init__(self, blocks: list[Block], io: StageIO):
        super().__init__(blocks)
        self.io = io
        self.updates = 0  # each applied at once: delay 0
        self._batch: tuple = ()

    def forward(self, step: Step, action: Action) -> None:
        *hidden, output = self.blocks
        states, x = forward_for_feedback(hidden, step.x)
        logits, _ = output.forward_train(x)
        self._batch = (states, logits, output_error(logits, step.y))

    def send_back(self, step: Step, action: Action) -> None:
        send_gradient(self.io, step.msg, [self._batch[2]])

    def learn(self, step: Step, action: Action) -> None:
        (states, logits, error), self._batch = self._batch, ()
        *hidden, output = self.blocks
        output.learn(logits, step.y)
        learn_from_error(hidden, states, error)
        self.updates += 1

    def report(self) -> dict:
        return {"dfa_delay_mean": 0.0 if self.updates else None, "dfa_delay_max": 0 if self.updates else None}
