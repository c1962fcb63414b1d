"""Local heads: the reference's decoder pooling, zero-initialised classifiers, and the bio variant's parts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import losses
from pipeline.config import LossConfig
from pipeline.model.feedback import LinearFA
from pipeline.model.heads import LocalHeads, decoder_pool


@pytest.mark.parametrize("channels,size,limit,kernel,padding,features", [
    (128, 28, 4096, (8, 4), (4, 0), 3584),  # vgg8b's first block on MNIST
    (256, 32, 4096, (8, 8), (0, 0), 4096),
    (512, 1, 4096, (1, 1), (0, 0), 512),
    (128, 28, 1024, (16, 8), (8, 4), 1024),  # the reference's MNIST vgg recipe uses --dim-in-decoder 1024
])
def test_decoder_pool_sizes(channels, size, limit, kernel, padding, features):
    k, p, f = decoder_pool(channels, size, limit)
    assert (k, p, f) == (kernel, padding, features)
    assert f <= limit or k[0] >= size
    if k != (1, 1):
        pooled = nn.AvgPool2d(k, padding=p)(torch.zeros(1, channels, size, size))
        assert pooled.numel() == f


def test_predsim_heads_combine_pred_and_sim_with_beta():
    torch.manual_seed(0)
    heads = LocalHeads(LossConfig(loss="predsim", beta=0.9), num_classes=3, channels=5, size=None)
    assert torch.count_nonzero(heads.decoder.weight) == 0
    with torch.no_grad():
        heads.decoder.weight.normal_()
    h, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logits = heads.loss(h, y)
    pred = losses.pred_loss(heads.decoder(h), y)
    sim = losses.sim_loss(heads.sim_map(h), losses.similarity_matrix(losses.one_hot(y, 3)))
    assert torch.allclose(loss, 0.1 * pred + 0.9 * sim)
    assert torch.equal(logits, heads.decoder(h))


def test_conv_heads_use_a_3x3_conv_before_sim_and_pool_before_pred():
    heads = LocalHeads(LossConfig(loss="predsim", dim_in_decoder=64), num_classes=10, channels=8, size=8)
    assert isinstance(heads.sim_map, nn.Conv2d) and heads.sim_map.kernel_size == (3, 3) and heads.sim_map.bias is None
    assert heads.decoder.in_features == 64 and heads.pool is not None
    loss, logits = heads.loss(torch.randn(4, 8, 8, 8), torch.tensor([1, 2, 3, 4]))
    assert logits.shape == (4, 10) and loss.dim() == 0


def test_single_loss_heads_have_only_their_head():
    pred = LocalHeads(LossConfig(loss="pred"), num_classes=10, channels=16, size=None)
    sim = LocalHeads(LossConfig(loss="sim"), num_classes=10, channels=16, size=None)
    assert pred.sim_map is None and pred.decoder is not None
    assert sim.decoder is None and sim.classify(torch.randn(2, 16)) is None
    h, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(pred.loss(h, y)[0], losses.pred_loss(pred.decoder(h), y))
    assert torch.allclose(sim.loss(h, y)[0], losses.sim_loss(sim.sim_map(h), losses.similarity_matrix(losses.one_hot(y, 10))))


def test_bio_heads_use_feedback_alignment_and_a_fixed_label_projection():
    torch.manual_seed(0)
    heads = LocalHeads(LossConfig(loss="predsim", bio=True, target_proj_size=16), num_classes=4, channels=8, size=None)
    assert isinstance(heads.decoder, LinearFA) and heads.decoder.out_features == 16
    assert heads.sim_map is None
    assert "projection" in dict(heads.named_buffers()) and "projection" not in dict(heads.named_parameters())
    h, y = torch.randn(6, 8, requires_grad=True), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logits = heads.loss(h, y)
    projected = losses.one_hot(y, 4) @ heads.projection
    expected = 0.01 * losses.bio_pred_loss(logits, losses.bio_targets(projected)) + 0.99 * losses.sim_loss(
        h, losses.similarity_matrix(projected))
    assert torch.allclose(loss, expected)


def test_bio_heads_start_as_the_reference_s():
    """anokland/local-loss (train.py, --bio): the decoder is a LinearFA whose reset_parameters zeroes its bias, and
    whose weight the block then zeroes; its feedback matrix is uniform in +-1/sqrt(in); the label projection is a
    bias-free nn.Linear(classes, P), uniform in +-1/sqrt(classes), never trained."""
    torch.manual_seed(0)
    heads = LocalHeads(LossConfig(loss="predsim", bio=True, target_proj_size=128), num_classes=10, channels=1024, size=None)
    assert torch.count_nonzero(heads.decoder.weight) == 0
    assert torch.count_nonzero(heads.decoder.bias) == 0, "the reference's LinearFA starts with a zero bias"
    for matrix, bound in ((heads.decoder.feedback, 1 / 1024 ** 0.5), (heads.projection, 1 / 10 ** 0.5)):
        assert matrix.abs().max() <= bound and matrix.abs().max() > 0.99 * bound  # uniform on the whole interval
        assert abs(matrix.mean().item()) < 0.05 * bound
    assert not heads.decoder.feedback.requires_grad and not heads.projection.requires_grad


def test_bio_classifier_picks_the_class_whose_code_fits_the_logits_best():
    heads = LocalHeads(LossConfig(loss="pred", bio=True, target_proj_size=3), num_classes=2, channels=2, size=None)
    with torch.no_grad():
        heads.projection.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]))  # codes 101 and 011
    logits = torch.tensor([[5.0, -5.0, 0.0], [-5.0, 5.0, 0.0]])
    assert torch.equal(heads.predictions(logits), torch.tensor([0, 1]))


def test_cheaper_sim_heads_pool_and_narrow_the_map_and_default_to_the_reference():
    """--sim-pool averages k x k positions before the sim head's conv, --sim-dim narrows its map; both off by default."""
    h, y = torch.randn(6, 32, 8, 8), torch.arange(6) % 3
    reference = LocalHeads(LossConfig(loss="sim"), num_classes=3, channels=32, size=8)
    assert reference.sim_pool is None and reference.sim_map.weight.shape == (32, 32, 3, 3)
    cheap = LocalHeads(LossConfig(loss="sim", sim_pool=2, sim_dim=8), num_classes=3, channels=32, size=8)
    assert cheap.sim_map.weight.shape == (8, 32, 3, 3)
    with torch.no_grad():
        cheap.sim_map.weight.copy_(reference.sim_map.weight[:8])
    features = F.conv2d(F.avg_pool2d(h, 2), reference.sim_map.weight[:8], padding=1)  # (6, 8, 4, 4)
    target = losses.similarity_matrix(losses.one_hot(y, 3))
    assert torch.allclose(cheap.loss(h, y)[0], losses.sim_loss(features, target), atol=1e-6)
    linear = LocalHeads(LossConfig(loss="sim", sim_pool=4, sim_dim=5), num_classes=3, channels=32, size=None)
    assert linear.sim_pool is None and linear.sim_map.weight.shape == (5, 32)  # pooling is for feature maps only
    deep = LocalHeads(LossConfig(loss="sim", sim_pool=4), num_classes=3, channels=32, size=2)
    assert deep.loss(torch.randn(6, 32, 2, 2), y)[0].isfinite()  # a kernel larger than the map pools all of it
