"""The built-in networks: the reference's shapes and sizes, and per-block seeding that any process reproduces."""

import pytest
import torch

from helpers import small_config
from pipeline.block.blocks import HiddenBlock, LocalBlock
from pipeline.model.models import MODELS, VGG_LAYOUTS
from pipeline.model.factories import build_blocks, count_blocks, resolve
from pipeline.sequential import SequentialTrainer


@pytest.mark.parametrize("name,layers,blocks", [("mlp", 3, 4), ("vgg8b", 1, 8), ("vgg11b", 1, 11), ("vgg8b", 0, 7),
                                                ("vgg16", 1, 15), ("vgg6a", 2, 7), ("resnet18", 0, 10),
                                                ("resnet50", 0, 18), ("wresnet16-4", 0, 8), ("wresnet28-10a", 0, 14)])
def test_block_counts_include_the_output_classifier(name, layers, blocks):
    cfg = small_config(model=name, like="cifar10", model__num_layers=layers, model__feat_mult=0.125)
    assert count_blocks(cfg) == blocks == len(resolve(cfg)[2].blocks)


def test_every_layout_of_the_reference_is_built_in():
    assert set(VGG_LAYOUTS) == {"vgg6a", "vgg6b", "vgg8", "vgg8a", "vgg8b", "vgg11", "vgg11b", "vgg13", "vgg16", "vgg19"}
    assert {f"resnet{d}" for d in (18, 34, 50, 101, 152)} | {"wresnet10-8", "wresnet40-10"} <= set(MODELS)


def _layer_parameters(blocks):
    return sum(p.numel() for b in blocks for name, p in b.named_parameters() if not name.startswith(("norm", "heads")))


@pytest.mark.parametrize("like,shape,expected_millions", [("mnist", (1, 28, 28), 7.3), ("cifar10", (3, 32, 32), 8.9)])
def test_vgg8b_has_the_reference_parameter_count(like, shape, expected_millions):
    cfg = small_config(model="vgg8b", like=like, model__num_layers=1, model__num_hidden=1024, loss="backprop")
    assert _layer_parameters(build_blocks(cfg, shape, 10)) / 1e6 == pytest.approx(expected_millions, abs=0.05)


def test_resnet18_has_the_parameters_of_the_reference_resnet18():
    # the reference's ResNet18 (CIFAR: 3x3 stem, no max pool) has 11,173,962 parameters, batch norm included
    cfg = small_config(model="resnet18", like="cifar10", loss="backprop")
    assert sum(p.numel() for b in build_blocks(cfg, (3, 32, 32), 10) for p in b.parameters()) == 11_173_962


def test_resnet_blocks_are_residual_units_with_local_heads_on_their_output():
    cfg = small_config(model="resnet18", like="cifar10", model__feat_mult=0.125)
    network, _, shape = resolve(cfg)
    outputs = [b.output for b in shape.blocks]
    assert outputs[:9] == [(8, 32, 32)] * 3 + [(16, 16, 16)] * 2 + [(32, 8, 8)] * 2 + [(64, 4, 4)] * 2
    assert outputs[9] == (10,)
    block = build_blocks(cfg, (3, 32, 32), 10, indices=[3])[0]  # the first unit that changes the shape
    assert isinstance(block, LocalBlock) and block.heads.uses_sim and block.heads.uses_pred
    assert len(block.layer.shortcut) == 2  # a strided 1x1 convolution and its batch norm


def test_stl10_vgg_starts_with_a_strided_7x7_convolution():
    cfg = small_config(model="vgg8b", like="stl10", model__feat_mult=0.125)
    first = build_blocks(cfg, (3, 96, 96), 10, indices=[0])[0]
    assert (first.layer.kernel_size, first.layer.stride) == ((7, 7), (2, 2))
    assert resolve(cfg)[2].blocks[0].activation == (16, 48, 48)


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


@pytest.mark.parametrize("model", ["vgg8b", "vgg11b", "resnet18", "wresnet16-4"])
@pytest.mark.parametrize("like", ["mnist", "cifar10"])
def test_built_in_networks_train_a_few_steps_on_synthetic_data(model, like):
    cfg = small_config(model=model, like=like, model__num_layers=1, model__num_hidden=64, model__feat_mult=0.125,
                       data__synthetic_train_size=48, data__synthetic_test_size=16, data__batch_size=16)
    trainer = SequentialTrainer(cfg)
    hidden = [b for b in trainer.blocks if isinstance(b, LocalBlock)]
    before = [[p.clone() for p in b.alignment_weights()] for b in hidden]
    summary = trainer.run()
    assert all(any(not torch.equal(p, q) for p, q in zip(b.alignment_weights(), w)) for b, w in zip(hidden, before))
    assert len(summary["layer_test_errors"]) == count_blocks(cfg)
    assert all(e is not None and 0 <= e <= 100 for e in summary["layer_test_errors"])


def test_hidden_sizes_set_each_layer_width():
    cfg = small_config(model__hidden_sizes=(800, 3, 800))
    shape = resolve(cfg)[2]
    assert [(b.input, b.output) for b in shape.blocks] == [((1, 28, 28), (800,)), ((800,), (3,)), ((3,), (800,)),
                                                          ((800,), (10,))]
    assert all(isinstance(b, HiddenBlock) for b in build_blocks(cfg, (1, 28, 28), 10)[:3])
