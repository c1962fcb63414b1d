"""Blocks: private dropout streams, the learning-rate schedule, and updates that stay inside the block."""

import pytest
import torch

from helpers import small_config
from pipeline.block.blocks import learning_rate, train_blocks
from pipeline.engine.roles import Step, WholeBlocks
from pipeline.engine.schedule import Action
from pipeline.block.epoch_stats import EpochStats
from pipeline.config import OptimConfig
from pipeline.model.factories import build_blocks


def _blocks(cfg=None, **kw):
    cfg = cfg or small_config(**kw)
    return build_blocks(cfg, (1, 28, 28), 10)


def test_learning_rate_steps_down_after_each_milestone():
    cfg = OptimConfig(lr=1.0, lr_decay_milestones=(2, 4), lr_decay_fact=0.5)
    assert [learning_rate(cfg, e) for e in range(1, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_dropout_draws_from_the_block_generator_only():
    a, b = _blocks()[0], _blocks()[0]
    h = torch.ones(8, 32)
    a.train(), b.train()
    torch.manual_seed(123)  # the global stream must not matter
    out_a = a.emit(h)
    torch.manual_seed(456)
    out_b = b.emit(h)
    assert torch.equal(out_a, out_b)
    values = out_a.unique()
    assert len(values) == 2 and values[0] == 0.0 and values[1].item() == pytest.approx(1 / 0.9)
    assert not torch.equal(a.emit(h), out_a)  # the stream moves on


def test_conv_dropout_drops_whole_feature_maps():
    cfg = small_config(model="vgg8b", model__feat_mult=0.0625, model__dropout=0.5)
    block = build_blocks(cfg, (1, 28, 28), 10, indices=[0])[0]
    block.train()
    out = block.emit(torch.ones(4, 8, 6, 6))  # no pool on the first vgg8b block
    per_map = out.flatten(2)
    assert torch.all((per_map == 0).all(2) | (per_map == 2.0).all(2))


def test_a_block_learns_only_its_own_parameters_and_passes_on_detached_output():
    blocks = _blocks()
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    h, out = blocks[0].forward_train(x)
    blocks[0].learn(h, y)
    assert out.detach().grad_fn is None
    changed = [any(not torch.equal(v, before[i][k]) for k, v in b.state_dict().items()) for i, b in enumerate(blocks)]
    assert changed == [True, False, False]


def test_forward_first_then_learn_gives_the_same_numbers_as_learn_as_you_go():
    """The overlapping order (forward every block, send, then learn) and the lean one (train, block by block)."""
    eager, deferred = _blocks(), _blocks()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    out_a = train_blocks(eager, x, y)
    step, role = Step(None, x, y), WholeBlocks(deferred)
    role.forward(step, Action("forward", "blocks"))
    handed = step.x.clone()  # what a stage sends on before the blocks learn
    role.learn(step, Action("learn", "blocks"))
    assert torch.equal(out_a, step.x) and torch.equal(handed, out_a)
    for a, b in zip(eager, deferred):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k


def test_epoch_stats_report_mean_loss_and_error():
    stats = EpochStats()
    stats.add(torch.tensor(2.0), torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
    stats.add(torch.tensor(4.0), None, torch.tensor([1, 1, 1, 1]))
    assert stats.summary() == {"loss": 3.0, "error": pytest.approx(100 * (1 - 3 / 8))}


@pytest.mark.parametrize("optim", ["adam", "amsgrad", "sgd"])
def test_every_optimizer_steps_the_block(optim):
    block = _blocks(optim__optim=optim, optim__momentum=0.9 if optim == "sgd" else 0.0, optim__weight_decay=1e-4)[0]
    assert block.optimizer.defaults.get("amsgrad", False) == (optim == "amsgrad")
    before = block.layer.weight.clone()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    block.learn(block.forward_train(x)[0], y)
    assert not torch.equal(before, block.layer.weight)


def test_a_non_finite_loss_stops_or_is_skipped():
    from pipeline.block.blocks import NonFiniteLoss

    block = _blocks()[0]
    h, _ = block.forward_train(torch.randn(8, 1, 28, 28))
    poisoned = h * float("nan")
    with pytest.raises(NonFiniteLoss, match="block 0: loss is not finite"):
        block.learn(poisoned, torch.randint(0, 10, (8,)))
    block.skip_nonfinite = True
    before = block.layer.weight.clone()
    h, _ = block.forward_train(torch.randn(8, 1, 28, 28))
    block.learn(h * float("inf"), torch.randint(0, 10, (8,)))
    assert block.skipped == 1 and torch.equal(block.layer.weight, before)


@pytest.mark.parametrize("optim", ["adam", "amsgrad", "sgd"])
@pytest.mark.parametrize("skipped_at", [0, 1])
def test_a_skipped_update_leaves_the_block_as_if_it_had_not_been_made(optim, skipped_at):
    # the skip happens on the device (found_inf of the fused optimizer), whatever the gradients hold: here the
    # gradients are finite (a NaN added to the loss has none), so only the flag can stop the step; at batch 0
    # it is the optimizer's first step, which fused SGD with momentum would otherwise botch (make_optimizer)
    kw = dict(optim__optim=optim, optim__momentum=0.9 if optim == "sgd" else 0.0, optim__weight_decay=1e-4, model__dropout=0.0)
    skipping, reference = _blocks(**kw)[0], _blocks(**kw)[0]
    skipping.skip_nonfinite = True
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(3)]
    real = skipping.heads.loss
    for index, (x, y) in enumerate(batches):
        skipping.heads.loss = (lambda h, y: (real(h, y)[0] + float("nan"), None)) if index == skipped_at else real
        skipping.learn(skipping.forward_train(x)[0], y)
        h, _ = reference.forward_train(x)  # the forward (batch norm statistics) happens either way
        if index != skipped_at:
            reference.learn(h, y)
    assert skipping.skipped == 1
    for (name, p), q in zip(skipping.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
    mine, theirs = skipping.optimizer.state_dict()["state"], reference.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key]), (key, mine[key].keys())
    assert skipping.stats.summary() == reference.stats.summary()


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_a_finite_update_is_the_plain_optimizer_step(optim):
    import copy

    block = _blocks(optim__optim=optim, optim__momentum=0.9 if optim == "sgd" else 0.0, model__dropout=0.0)[0]
    plain = copy.deepcopy(block)
    plain.optimizer = (torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9, fused=True) if optim == "sgd"
                       else torch.optim.Adam(plain.parameters(), lr=1e-3, fused=True))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        block.learn(block.forward_train(x)[0], y)
        loss, _ = plain.heads.loss(plain.activation(x), y)  # the same function, stepped as any PyTorch code would
        loss.backward()
        plain.optimizer.step()
        plain.optimizer.zero_grad()
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_epoch_stats_leave_out_a_flagged_update_once_the_watch_reads_it():
    from pipeline.block.nonfinite import NonFiniteWatch

    block = _blocks()[0]
    block.skip_nonfinite = True
    watch = NonFiniteWatch(every=8).attach([block])
    watch.begin(1, 0)
    block.stats.add(torch.tensor(2.0), torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor(False))
    bad = torch.tensor(True)
    block.stats.add(torch.tensor(float("nan")), torch.tensor([1, 1]), torch.tensor([1, 1]), bad)
    watch.report(block, bad, 2)
    assert block.skipped == 0  # nothing read yet
    watch.check()
    assert block.skipped == 1 and block.stats.summary() == {"loss": 2.0, "error": 50.0}


class _FakeCudaGenerator:
    """Stands in for a CUDA generator (the block's device generator, and the device's default one)."""

    device = torch.device("cuda", 0)

    def __init__(self):
        self.state = torch.tensor([0])

    def get_state(self):
        return self.state.clone()

    def set_state(self, state):
        self.state = state.clone()


def test_a_gpu_blocks_cpu_draws_come_from_its_own_generator(monkeypatch):
    """A block on a GPU whose module draws on the CPU (torch.randperm(n) without device=) draws the same numbers in
    every process: own_randomness swaps in the block's host generator as well as its device one."""
    from pipeline.model.seeding import generator

    monkeypatch.setattr(torch.cuda, "default_generators", [_FakeCudaGenerator()], raising=False)
    block = build_blocks(small_config(), (1, 28, 28), 10)[0]
    block.generator, block.host_generator = _FakeCudaGenerator(), generator(3, "host draws", 0)
    draws = []
    for noise in (0, 7):  # two processes that drew differently before
        block.host_generator = generator(3, "host draws", 0)
        torch.manual_seed(noise)
        torch.rand(noise)
        global_before = torch.default_generator.get_state()
        with block.own_randomness():
            draws.append(torch.randperm(10))
        assert torch.equal(torch.default_generator.get_state(), global_before)  # the process's own stream untouched
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], torch.randperm(10, generator=generator(3, "host draws", 0)))


def test_an_after_that_changes_h_in_place_keeps_its_graph():
    """after = ReLU(inplace=True) changes the h the heads learn from: the gradient must go through it, as it did
    before `after` ran without a graph (forward_local finds such an after out on the first step)."""
    import copy

    def run(local: bool):
        block = copy.deepcopy(template)
        x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10
        for _ in range(2):  # the second step takes the path the first one chose
            h, _ = block.forward_local(x) if local else block.forward_train(x)
            block.learn(h, y)
        return block.layer[1].weight.detach()

    template = build_blocks(small_config(model="networks.plain:in_place_after"), (1, 28, 28), 10)[0]
    assert template._after_in_place is True  # the dry run saw it
    assert torch.equal(run(local=True), run(local=False))
    template._after_in_place = None  # a block built outside build_blocks finds out on its first step
    assert torch.equal(run(local=True), run(local=False))
    assert build_blocks(small_config(), (1, 28, 28), 10)[0]._after_in_place is False  # dropout: no graph from step 1

