"""The loss math on inputs small enough to work out by hand."""

import math

import pytest
import torch

from pipeline.model import losses


def test_identical_rows_are_fully_similar():
    row = torch.tensor([1.0, 2.0, 4.0, -3.0])
    r = losses.similarity_matrix(torch.stack([row, row, row]))
    assert torch.allclose(r, torch.ones(3, 3))


def test_orthogonal_centred_rows_give_identity():
    rows = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 2.0, -2.0]])  # zero mean, orthogonal
    assert torch.allclose(losses.similarity_matrix(rows), torch.eye(2))


def test_opposite_rows_are_minus_one_and_clamped():
    rows = torch.tensor([[3.0, -1.0, 0.0], [-3.0, 1.0, 0.0]])
    r = losses.similarity_matrix(rows)
    assert torch.allclose(r, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert r.max() <= 1.0 and r.min() >= -1.0


def test_row_mean_is_removed_before_the_cosine():
    # [1, 2, 3] and [11, 12, 13] differ only by an offset: after centring they are identical.
    r = losses.similarity_matrix(torch.tensor([[1.0, 2.0, 3.0], [11.0, 12.0, 13.0]]))
    assert r[0, 1].item() == pytest.approx(1.0, abs=1e-6)


def test_one_hot_label_similarity_is_one_or_minus_one_ninth():
    # centred one-hot rows e_a - 0.1: same class -> 1; different classes -> -0.1 / 0.9 = -1/9.
    y = torch.tensor([0, 0, 3])
    r = losses.similarity_matrix(losses.one_hot(y, 10))
    expected = torch.tensor([[1.0, 1.0, -1 / 9], [1.0, 1.0, -1 / 9], [-1 / 9, -1 / 9, 1.0]])
    assert torch.allclose(r, expected, atol=1e-6)


def test_feature_maps_reduce_to_channel_std():
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 2, 2)  # C = 4 > 3 channels, H = 2 > 1: std reduction applies
    stds = maps.flatten(2).std(dim=2)  # (3, 4)
    assert torch.allclose(losses.similarity_matrix(maps), losses.similarity_matrix(stds))
    # a hand-made case: channel stds (1, 0, 0, 0) vs (0, 1, 0, 0) after centring -> cos = -1/3
    a = torch.zeros(1, 4, 2, 2)
    a[0, 0] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    b = torch.zeros(1, 4, 2, 2)
    b[0, 1] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    r = losses.similarity_matrix(torch.cat([a, b]))
    assert r[0, 1].item() == pytest.approx(-1 / 3, abs=1e-6)


@pytest.mark.parametrize("shape", [(3, 3, 4, 4), (3, 8, 1, 4)])
def test_few_channels_or_single_row_maps_are_flattened(shape):
    torch.manual_seed(1)
    maps = torch.randn(*shape)
    assert torch.allclose(losses.similarity_matrix(maps), losses.similarity_matrix(maps.flatten(1)))


def test_std_reduction_can_be_switched_off():
    torch.manual_seed(2)
    maps = torch.randn(3, 8, 4, 4)
    off = losses.similarity_matrix(maps, use_std=False)
    assert torch.allclose(off, losses.similarity_matrix(maps.flatten(1)))
    assert not torch.allclose(off, losses.similarity_matrix(maps))


def test_sim_loss_is_zero_when_features_match_label_similarity():
    y = torch.tensor([1, 0, 1, 2])
    target = losses.similarity_matrix(losses.one_hot(y, 3))
    features = 5.0 * losses.one_hot(y, 3) + 2.0  # scaled and shifted one-hot: same similarity
    assert losses.sim_loss(features, target).item() == pytest.approx(0.0, abs=1e-10)
    assert losses.sim_loss(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]), target).item() > 0.1


def test_sim_loss_is_mean_squared_difference():
    # features rows: identical pair -> R = ones(2,2); target identity -> off-diagonals differ by 1: MSE = 2/4.
    features = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    assert losses.sim_loss(features, torch.eye(2)).item() == pytest.approx(0.5, abs=1e-6)


def test_predsim_weighting():
    pred, sim = torch.tensor(2.0), torch.tensor(10.0)
    assert losses.predsim(pred, sim, 0.99).item() == pytest.approx(0.01 * 2 + 0.99 * 10)
    assert losses.predsim(pred, sim, 0.0).item() == pytest.approx(2.0)
    assert losses.predsim(pred, sim, 1.0).item() == pytest.approx(10.0)


def test_pred_loss_of_zero_logits_is_log_classes():
    assert losses.pred_loss(torch.zeros(4, 10), torch.tensor([0, 1, 2, 3])).item() == pytest.approx(math.log(10))


def test_bio_targets_are_the_sign_of_the_label_projection():
    projection = torch.tensor([[0.5, -0.2, 0.1], [-0.1, 0.3, 0.2]])  # (classes=2, P=3)
    y = torch.tensor([0, 1, 0])
    projected = losses.project_labels(losses.one_hot(y, 2), projection)
    assert torch.equal(projected, projection[y])
    assert torch.equal(losses.bio_targets(projected), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))


def test_bio_pred_loss_is_bce_with_logits():
    logits, targets = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert losses.bio_pred_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_output_loss_is_scaled_only_under_predsim():
    assert losses.output_loss_scale("predsim", 0.99) == pytest.approx(0.01)
    assert losses.output_loss_scale("pred", 0.99) == 1.0
    assert losses.output_loss_scale("backprop", 0.99) == 1.0
