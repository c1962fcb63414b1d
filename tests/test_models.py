"""Models as block lists: the reference's shapes and sizes, and per-block seeding that any process reproduces."""

import pytest
import torch

from helpers import small_config
from pipeline.blocks import HiddenBlock
from pipeline.config import ModelConfig
from pipeline.models import build_blocks, count_blocks, plan_blocks
from pipeline.sequential import SequentialTrainer


@pytest.mark.parametrize("name,layers,blocks", [("mlp", 3, 4), ("vgg8b", 1, 8), ("vgg11b", 1, 11), ("vgg8b", 0, 7)])
def test_block_counts_include_the_output_classifier(name, layers, blocks):
    assert count_blocks(ModelConfig(name=name, num_layers=layers)) == blocks
    assert len(plan_blocks(ModelConfig(name=name, num_layers=layers), (3, 32, 32), 10)) == blocks


@pytest.mark.parametrize("like,shape,expected_millions", [("mnist", (1, 28, 28), 7.3), ("cifar10", (3, 32, 32), 8.9)])
def test_vgg8b_has_the_reference_parameter_count(like, shape, expected_millions):
    cfg = small_config(model="vgg8b", like=like, model__num_layers=1, model__num_hidden=1024, loss="backprop")
    blocks = build_blocks(cfg, shape, 10)
    layers = sum(p.numel() for b in blocks for name, p in b.named_parameters() if not name.startswith("norm"))
    assert layers / 1e6 == pytest.approx(expected_millions, abs=0.05)


def test_stl10_vgg_starts_with_a_strided_7x7_convolution():
    plans = plan_blocks(ModelConfig(name="vgg8b"), (3, 96, 96), 10)
    assert (plans[0].kernel, plans[0].stride, plans[0].size) == (7, 2, 48)


def test_blocks_built_alone_equal_blocks_built_together():
    cfg = small_config(model="mlp", model__num_layers=3)
    together = build_blocks(cfg, (1, 28, 28), 10)
    alone = [build_blocks(cfg, (1, 28, 28), 10, indices=[i])[0] for i in reversed(range(4))][::-1]
    for a, b in zip(together, alone):
        assert a.index == b.index
        for v, w in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(v, w)


def test_seed_changes_the_initial_weights():
    a = build_blocks(small_config(run__seed=1), (1, 28, 28), 10)[0]
    b = build_blocks(small_config(run__seed=2), (1, 28, 28), 10)[0]
    assert not torch.equal(a.layer.weight, b.layer.weight)


@pytest.mark.parametrize("model", ["vgg8b", "vgg11b"])
@pytest.mark.parametrize("like", ["mnist", "cifar10"])
def test_vggs_train_a_few_steps_on_synthetic_data(model, like):
    cfg = small_config(model=model, like=like, model__num_layers=1, model__num_hidden=64, model__feat_mult=0.125,
                       data__synthetic_train_size=48, data__synthetic_test_size=16, data__batch_size=16)
    trainer = SequentialTrainer(cfg)
    hidden = [b for b in trainer.blocks if isinstance(b, HiddenBlock)]
    before = [b.layer.weight.clone() for b in hidden]
    summary = trainer.run()
    assert all(not torch.equal(b.layer.weight, w) for b, w in zip(hidden, before))
    assert len(summary["layer_test_errors"]) == count_blocks(cfg.model)
    assert all(e is not None and 0 <= e <= 100 for e in summary["layer_test_errors"])


def test_hidden_sizes_set_each_layer_width():
    model = ModelConfig(hidden_sizes=(800, 3, 800))
    plans = plan_blocks(model, (1, 28, 28), 10)
    assert [(p.inputs, p.outputs) for p in plans] == [(784, 800), (800, 3), (3, 800), (800, 10)]
    assert count_blocks(model) == 4
