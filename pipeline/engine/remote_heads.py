"""Split heads: a block's layer on one stage, its local heads on the next; dL/dh comes back as a remote gradient.

    stage k:    ... forward layer(t) ──► [out, y, h] on ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─► h.backward(dL/dh), step
    stage k+1:                           heads(h): loss, step the heads ──► dL/dh back ──► its own blocks

Both stages build the whole block from the same seed; each steps only its part (a parameter without a gradient is
left alone by every torch optimizer, and Adam's state, its step count included, is per parameter), so the two
halves together take exactly the sequential trainer's step. The non-finite flag of the loss travels back with
dL/dh, so the layer skips the update its heads skipped.

[Note: the exact overlapped schedule]
The layer's update for batch t must be in before its forward of t+1, but the blocks before it on stage k need
nothing from stage k+1. So stage k forwards those blocks for t+1 while dL/dh of t travels, then waits for it,
applies it, forwards the split block, sends t+1 on, and lets the blocks before it learn from t+1
(pipeline/engine/schedule.py: stage_schedule).
Every number is the sequential trainer's; the stages overlap by the blocks before the split one. A stage with
no such work (the split block first on its stage) can instead take a bounded delay (--heads-max-delay D): the
layer forwards at most D batches past the oldest one awaiting dL/dh, with the weights of each forward kept for
its update.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.block.blocks import LocalBlock
from pipeline.model.feedback import keep_weights_at_forward
from pipeline.transport.message import Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.remote_gradient import RemoteGradients, send_gradient
from pipeline.engine.roles import Role, Step
from pipeline.engine.schedule import Action
from pipeline.engine.stage_io import StageIO


def heads_step(block: LocalBlock, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The heads' half of a split block's training step: their loss on h, their update, and (dL/dh or None where
    the loss does not depend on h, the loss's non-finite flag). Written once: the heads' stage, and the profile
    that times a block's two halves (pipeline/engine/profile.py)."""
    block.train()  # the heads' modules in training mode, as forward_train puts the whole block in one process
    leaf = h.detach().requires_grad_(True)  # a new tensor: the flag never sticks to a reused receive buffer
    # heads that would draw from the block's generator are refused at start (factories.splittable): the layer's
    # stage advances that generator, so these draws could not be the sequential trainer's
    bad = block.learn(leaf, y)  # steps the heads' parameters only: the layer's have no gradient here
    return leaf.grad, bad


def layer_step(block: LocalBlock, h: torch.Tensor, grad: torch.Tensor | None, bad: torch.Tensor) -> None:
    """The layer's half: dL/dh back through the graph of h (none: no gradient), and the layer's update, skipped
    where the heads reported a non-finite loss (the layer only follows their flag)."""
    if grad is not None:
        torch.autograd.backward(h, grad)
    block.step(bad.reshape(()))


class SplitLayer(Role):
    """The layer half of a split block, on the stage before its heads' (or after, pipeline/engine/upstream_heads.py)."""

    name = "layer"
    receives = True  # dL/dh

    def __init__(self, rank: int, block: LocalBlock, io: StageIO, watch: NonFiniteWatch, max_delay: int):
        super().__init__([block])
        self.block, self.max_delay = block, max_delay
        self.parameters = list(block.parameters())  # their values at forward time are kept under a delay
        self.gradients = RemoteGradients(rank, io, watch, self._learn,
                                         what=lambda index: f"dL/dh of block {block.index}, batch {index}, from stage {block.partner}")

    @property
    def tested(self) -> list:
        return []  # its classifier is in its heads, scored on their stage

    def apply(self, step: Step, action: Action) -> None:
        """dL/dh of the batches before: what has come, and the one of step t - lag, waited for."""
        self.gradients.apply_through(None if action.lag is None else step.seq - action.lag)

    def forward(self, step: Step, action: Action) -> None:
        """step.x becomes the detached output, step.h_out the detached h; the graph is kept until dL/dh arrives
        (then the step's `release`)."""
        with keep_weights_at_forward(self.parameters) if self.max_delay else contextlib.nullcontext():
            h, out = self.block.forward_train(step.x)
        self.gradients.expect(step.msg.epoch, step.msg.index, h, step.release, step.seq)
        step.x, step.h_out = out.detach(), h.detach()

    def _learn(self, h: torch.Tensor, gradient: Message) -> None:
        grad, bad = gradient.tensors
        layer_step(self.block, h, grad if gradient.meta.get("gradient", True) else None, bad)

    @torch.no_grad()
    def evaluate(self, step: Step) -> None:
        """Eval mode: step.x becomes the output, step.h_out h; the block's classifier runs on the heads' stage."""
        self.block.eval()
        h = self.block.activation(step.x)
        step.x, step.h_out = self.block.emit(h), h

    def settle(self) -> None:
        self.gradients.settle()

    def await_stream_end(self) -> None:
        self.gradients.await_stream_end()

    def report(self) -> dict:
        return self.gradients.report("heads")


class RemoteHeads(Role):
    """The heads half of a split block, on the stage after its layer's."""

    name = "heads"

    def __init__(self, block: LocalBlock, io: StageIO):
        super().__init__([block])
        self.block, self.io = block, io
        self._unsent: list[tuple[Message, list, dict]] = []  # dL/dh and the loss's non-finite flag, per batch learned


    def learn(self, step: Step, action: Action | None = None) -> None:
        """The heads' loss on the received h and their step; dL/dh (with the flag) waits for `send_back`."""
        grad, bad = heads_step(self.block, step.h_in, step.y)
        # no gradient (a loss that does not depend on h): the layer gets none either, as in one process
        self._unsent.append((step.msg, [torch.zeros_like(step.h_in) if grad is None else grad, bad.reshape(1)],
                             {"gradient": grad is not None}))

    def send_back(self, step: Step | None = None, action: Action | None = None) -> None:
        """dL/dh of every batch learned from since the last send, to the layer's stage."""
        for msg, tensors, meta in self._unsent:
            send_gradient(self.io, msg, tensors, meta)
        self._unsent.clear()

    def evaluate(self, step: Step) -> None:
        """The block's classifier's correct count on a test batch's h (None without a classifier)."""
        self.block.eval()
        step.hits.append(self.block.hits(step.h_in, step.y))
