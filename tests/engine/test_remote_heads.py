"""Split heads in one process: a block's layer half and heads half, joined by a fake link, learn what the whole block
learns, batch for batch, test passes in between (pipeline/engine/remote_heads.py)."""

from collections import deque

import torch

from helpers import small_config
from pipeline.model.factories import build_blocks
from pipeline.transport.message import Kind, Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.partition import Placement
from pipeline.engine.remote_heads import RemoteHeads, SplitLayer
from pipeline.engine.roles import Step, take_actions
from pipeline.engine.schedule import stage_schedule


class _Link:
    """The two stages' StageIO as the halves use it: what the heads send back is what the layer receives."""

    def __init__(self):
        self.sent: deque[Message] = deque()
        self.wanted = self.taken = 0  # a message may arrive only once it is awaited (StageIO.want_error)

    def want_error(self):
        self.wanted += 1

    def put_error(self, msg):
        self.sent.append(Message(msg.kind, msg.epoch, msg.index, [t.clone() for t in msg.tensors], dict(msg.meta)))

    def next_error(self, what, block):
        if not self.sent:
            return None
        assert self.wanted > self.taken, "a message taken that nobody said it awaited"
        self.taken += 1
        return self.sent.popleft()


def _blocks(model):
    cfg = small_config(model=model)
    return build_blocks(cfg, (1, 28, 28), 10, indices=[0])[0]


def remote_hits(remote, step, y):
    scored = Step(step.msg, step.x, y, h_in=step.h_out)
    remote.evaluate(scored)
    return scored.hits[0]


def test_the_two_halves_of_a_block_learn_exactly_what_the_whole_block_learns():
    whole, layer, heads = (_blocks("networks.plain:normed_heads") for _ in range(3))
    (layer.part, layer.partner), (heads.part, heads.partner) = ("layer", 1), ("heads", 0)
    link = _Link()
    split = SplitLayer(0, layer, link, NonFiniteWatch().attach([layer]), max_delay=0)
    remote = RemoteHeads(heads, link)
    placement = Placement.parse([0.5, 0.5])  # the layer alone on stage 0, the heads alone on stage 1
    layer_steps, heads_steps = stage_schedule(placement, 0), stage_schedule(placement, 1)
    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        x, y = torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        h, _ = whole.forward_train(x)
        whole.learn(h, y)
        msg = Message(Kind.TRAIN, 1, index, [x, y])
        sent = []
        take_actions(layer_steps, {"layer": split}, Step(msg, x, y, seq=index), sent.append)
        take_actions(heads_steps, {"heads": remote}, Step(msg, sent[0].x, y, h_in=sent[0].h_out, seq=index), None)
        if index == 1:  # a test pass: the heads classify in eval mode, then must train in training mode again
            split.settle()  # as a stage settles before a test
            test = torch.randn(16, 1, 28, 28, generator=generator)
            with torch.no_grad():
                _, expected = whole.evaluate(test, y)
            step = Step(msg, test, y)
            split.evaluate(step)
            assert step.hits == [] and remote_hits(remote, step, y) == expected
    split.settle()
    assert link.wanted == link.taken == 4  # each gradient awaited once, none left with a receive posted
    assert layer.owned_state().keys() | heads.owned_state().keys() == whole.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        mine = (heads if name.startswith("heads.") else layer).state_dict()[name]
        assert torch.equal(mine, tensor), name


class _LateLink(_Link):
    """dL/dh of batch t arrives before the layer's step `arrive[t]`: a look that does not wait sees it from then on;
    a wait takes it at once (the layer then stalls until it comes)."""

    def __init__(self, arrive):
        super().__init__()
        self.arrive, self.now = arrive, 0

    def next_error(self, what, block):
        if self.sent and not block and self.arrive[self.sent[0].index] > self.now:
            return None
        return super().next_error(what, block)


def test_a_bounded_delay_updates_the_layer_as_a_one_process_delayed_reference_does():
    """--heads-max-delay D: before its forward of t the layer applies the dL/dh that came (in order, up to the first
    that has not), then waits for those of batches up to t-1-D; each update uses the graph (and weights) of its own
    forward. The reference is that rule written out in one loop, with the same arrival times."""
    import random

    from pipeline.model.feedback import keep_weights_at_forward
    from pipeline.engine.remote_heads import heads_step, layer_step

    delay, batches = 2, 14
    rng = random.Random(1)
    arrive = [t + rng.randint(1, delay + 3) for t in range(batches)]  # some late enough to make the layer wait
    layer, heads, ref_layer, ref_heads = (_blocks("networks.plain:normed_heads") for _ in range(4))
    for block, part, partner in ((layer, "layer", 1), (heads, "heads", 0), (ref_layer, "layer", 1), (ref_heads, "heads", 0)):
        block.part, block.partner = part, partner
    link = _LateLink(arrive)
    split = SplitLayer(0, layer, link, NonFiniteWatch().attach([layer]), max_delay=delay)
    remote = RemoteHeads(heads, link)
    placement = Placement.parse([0.5, 0.5])
    layer_steps, heads_steps = stage_schedule(placement, 0, heads_delay=delay), stage_schedule(placement, 1)
    pending = deque()  # the reference's batches awaiting their layer update: (t, h, dL/dh, flag)
    generator = torch.Generator().manual_seed(0)
    for t in range(batches):
        x, y = torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        link.now = t
        msg, sent = Message(Kind.TRAIN, 1, t, [x, y]), []
        take_actions(layer_steps, {"layer": split}, Step(msg, x, y, seq=t), sent.append)
        take_actions(heads_steps, {"heads": remote}, Step(msg, sent[0].x, y, h_in=sent[0].h_out, seq=t), None)
        # the reference: what has come, in order (up to the first that has not), then what is older than the
        # bound (waiting for it), then the forward
        for due in (lambda b: arrive[b] <= t, lambda b: b <= t - 1 - delay):
            while pending and due(pending[0][0]):
                _, h, grad, bad = pending.popleft()
                layer_step(ref_layer, h, grad, bad)
        with keep_weights_at_forward(list(ref_layer.parameters())):
            h, _ = ref_layer.forward_train(x)
        pending.append((t, h, *heads_step(ref_heads, h, y)))
    split.settle()
    for _, h, grad, bad in pending:
        layer_step(ref_layer, h, grad, bad)
    report = split.report()
    assert 0 < report["heads_delay_mean"] <= report["heads_delay_max"] == delay  # the bound was reached, not passed
    for mine, theirs in ((layer, ref_layer), (heads, ref_heads)):
        for (name, value), other in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(value, other), name
