"""Blocks: private dropout streams, the learning-rate schedule, and updates that stay inside the block."""

import pytest
import torch

from helpers import small_config
from pipeline.blocks import EpochStats, learning_rate, train_blocks
from pipeline.config import OptimConfig
from pipeline.models import build_blocks


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
    eager, deferred = _blocks(), _blocks()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    handed = []
    out_a = train_blocks(eager, x, y)
    out_b = train_blocks(deferred, x, y, hand_off=handed.append)
    assert torch.equal(out_a, out_b) and torch.equal(handed[0], out_b)
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
    from pipeline.blocks import NonFiniteLoss

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
