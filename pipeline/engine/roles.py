"""The role interface: what a stage's blocks do for each action of the schedule (pipeline/engine/schedule.py).

A stage holds one role per kind of work on its blocks (whole blocks here; a split block's layer or heads; DFA's
blocks) and runs the schedule's actions on them, in order, on a Step: the batch as it moves through the
stage. Every role answers the same calls; the ones a role's schedule never gives it raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.block.blocks import Block, evaluate_blocks, train_blocks
from pipeline.transport.message import Message
from pipeline.engine.schedule import Action


@dataclass
class Step:
    """One batch on its way through a stage's roles (training, or a test pass with `hits`)."""

    msg: Message
    x: torch.Tensor  # the activation the next role takes (on receipt: the stage's input)
    y: torch.Tensor
    h_in: torch.Tensor | None = None  # a split block's h, from the layer's stage before this one
    h_out: torch.Tensor | None = None  # this stage's split layer's h, sent on with x
    release: Callable[[], None] = lambda: None  # the receive buffers' share of whatever holds them
    seq: int = 0  # training steps this process took before this one (remote gradients' lags count in them)
    hits: list[torch.Tensor | None] = field(default_factory=list)  # a test pass: each tested block's correct count


class Role:
    """One kind of work on some of a stage's blocks; each method is one action of the schedule."""

    name = ""
    receives = False  # it awaits messages on the stage's remote-gradient link (feedback_in)

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks

    @property
    def tested(self) -> list[Block]:
        """The blocks whose classifier this stage scores on test batches (where their h is)."""
        return self.blocks

    def _refuse(self, action: Action) -> None:
        raise RuntimeError(f"the schedule gives role {self.name} an action it has no part in: {action.text()}")

    def forward(self, step: Step, action: Action) -> None:
        self._refuse(action)

    def train(self, step: Step, action: Action) -> None:
        self._refuse(action)

    def learn(self, step: Step, action: Action) -> None:
        self._refuse(action)

    def apply(self, step: Step, action: Action) -> None:
        self._refuse(action)

    def send_back(self, step: Step, action: Action) -> None:
        self._refuse(action)

    def evaluate(self, step: Step) -> None:
        """A test batch: the role's eval-mode pass on step.x, its blocks' hits appended to step.hits."""
        step.x, hits = evaluate_blocks(self.blocks, step.x, step.y)
        step.hits += hits

    def settle(self) -> None:
        """Every update of the batches so far in (before a test, a checkpoint, the weights read, the end)."""

    def await_stream_end(self) -> None:
        """After the run: the remote-gradient stream this role receives has ended with nothing left over."""

    def report(self) -> dict[str, Any]:
        return {}


class WholeBlocks(Role):
    """Consecutive blocks trained whole on this stage: layer and heads."""

    name = "blocks"

    def __init__(self, blocks: list[Block]):
        super().__init__(blocks)
        self._pending: list[tuple[Block, torch.Tensor]] = []  # forwarded, to learn after the batch went on

    def forward(self, step: Step, action: Action) -> None:
        """Every block's forward; their graphs are kept until `learn` (the batch is sent on in between)."""
        x = step.x
        for block in self.blocks:
            h, x = block.forward_local(x)
            self._pending.append((block, h))
        step.x = x

    def learn(self, step: Step, action: Action) -> None:
        for block, h in self._pending:
            block.learn(h, step.y)
        self._pending.clear()

    def train(self, step: Step, action: Action) -> None:
        """Forward and learn one block at a time: one block's graph held at a time."""
        step.x = train_blocks(self.blocks, step.x, step.y)


def take_actions(actions: list[Action], roles: dict[str, Role], step: Step, send: Callable[[Step], None]) -> None:
    """One training step: the schedule's actions in order, each by its role; `send(step)` hands the batch on."""
    for action in actions:
        if action.op == "send":
            send(step)
        elif action.op != "recv":  # the batch is here
            getattr(roles[action.role], action.op)(step, action)
