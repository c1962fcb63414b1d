"""A pipeline stage's DFA bookkeeping (on the shared remote-gradient mechanism): the delay it reports is the number of
batches forwarded before an update."""

from collections import deque

import pytest
import torch

from helpers import small_config
from pipeline.engine.dfa_stage import DfaBlocks
from pipeline.transport.message import Kind, Message
from pipeline.model.factories import build_blocks
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.partition import Placement
from pipeline.engine.roles import Step, take_actions
from pipeline.engine.schedule import stage_schedule


class _Link:
    """The stage's I/O as its DFA blocks see it: forwarded batches are sent at once; the test decides when each
    batch's error arrives, and a blocking wait delivers the oldest error still due (as the last stage would)."""

    def __init__(self):
        self.forwarded: list[int] = []
        self.due: deque[int] = deque()  # batches whose error has not arrived yet
        self.arrived: deque[Message] = deque()
        self.wanted = self.taken = 0  # a message may arrive only once it is awaited (StageIO.want_error)

    def want_error(self):
        self.wanted += 1

    def put(self, msg):
        self.forwarded.append(msg.index)
        self.due.append(msg.index)
        msg.release()  # sent

    def deliver(self, count=1):
        for _ in range(count):
            index = self.due.popleft()
            error = torch.softmax(torch.randn(8, 10), 1) - torch.eye(10)[torch.arange(8) % 10]
            self.arrived.append(Message(Kind.FEEDBACK, 1, index, [error]))

    def next_error(self, what, block):
        if not self.arrived and block:
            self.deliver()
        if not self.arrived:
            return None
        assert self.wanted > self.taken, "a message taken that nobody said it awaited"
        self.taken += 1
        return self.arrived.popleft()


def _stage(max_delay):
    cfg = small_config(loss="dfa", model__nonlin="tanh", model__num_layers=2, model__num_hidden=16)
    blocks = build_blocks(cfg, (1, 28, 28), 10, indices=[0, 1])
    link = _Link()
    feedback = DfaBlocks(0, blocks, link, NonFiniteWatch().attach(blocks), max_delay=max_delay)
    feedback.link, feedback.schedule = link, stage_schedule(Placement((1, 1)), 0, dfa=True, dfa_delay=max_delay)
    return feedback, link


def _train(feedback, index):
    """Stage 0's schedule for one batch, as Stage takes it."""
    msg = Message(Kind.TRAIN, 1, index, [torch.randn(8, 1, 28, 28), torch.arange(8) % 10])
    take_actions(feedback.schedule, {"dfa": feedback}, Step(msg, *msg.tensors, seq=index), lambda step: feedback.link.put(msg))


def test_the_delay_counts_the_batches_forwarded_before_each_update():
    feedback, link = _stage(max_delay=None)
    for index in range(3):  # no error comes back while batches 0, 1, 2 go forward
        _train(feedback, index)
    assert len(feedback.errors.awaiting) == 3 and feedback.report() == {"dfa_delay_mean": None, "dfa_delay_max": None}
    link.deliver(3)
    _train(feedback, 3)  # forwarded, then 0, 1, 2 are applied: after 3, 2 and 1 later batches went forward
    assert [b.index for b in feedback.errors.awaiting] == [3]
    feedback.errors.settle()  # batch 3's error: nothing went forward after it
    assert feedback.report() == {"dfa_delay_mean": (3 + 2 + 1 + 0) / 4, "dfa_delay_max": 3}
    assert link.wanted == link.taken == 4  # each error awaited once, none left with a receive posted


def test_a_bounded_delay_waits_for_the_error_that_would_exceed_it():
    feedback, link = _stage(max_delay=1)
    for index in range(3):  # each batch waits for the error of the one before it
        _train(feedback, index)
        assert [b.index for b in feedback.errors.awaiting] == [index]
    feedback.errors.settle()
    assert feedback.report() == {"dfa_delay_mean": pytest.approx(2 / 3), "dfa_delay_max": 1}
    assert link.wanted == link.taken == 3


def test_synchronous_dfa_has_no_delay():
    feedback, link = _stage(max_delay=0)
    for index in range(3):
        _train(feedback, index)
        assert not feedback.errors.awaiting
    assert feedback.report() == {"dfa_delay_mean": 0.0, "dfa_delay_max": 0}
