"""Feedback alignment layers: the backward pass uses the fixed random matrix, and that matrix never changes."""

import pytest
import torch

from helpers import small_config
from pipeline.block.blocks import DFABlock
from pipeline.model.feedback import Conv2dFA, LinearFA, feedback_matrix, output_error
from pipeline.model.factories import build_blocks


def test_linear_fa_forward_is_an_ordinary_linear_layer():
    torch.manual_seed(0)
    layer = LinearFA(3, 2)
    x = torch.randn(4, 3)
    assert torch.allclose(layer(x), x @ layer.weight.t() + layer.bias)


def test_linear_fa_input_gradient_uses_the_feedback_matrix():
    layer = LinearFA(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.feedback.copy_(torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    grad_out = torch.tensor([[1.0, 10.0]])
    layer(x).backward(grad_out)
    # by hand: dx = grad_out @ B = [10*3, 0, 1*2]; dW = grad_out^T x; db = grad_out
    assert torch.equal(x.grad, torch.tensor([[30.0, 0.0, 2.0]]))
    assert torch.equal(layer.weight.grad, torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]))
    assert torch.equal(layer.bias.grad, torch.tensor([1.0, 10.0]))


def test_feedback_matrix_is_a_buffer_not_a_parameter():
    layer = LinearFA(5, 4)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight", "bias"}
    assert "feedback" in layer.state_dict()
    before = layer.feedback.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(8, 5)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.feedback, before)


def test_conv_fa_sends_the_error_back_through_the_fixed_kernel():
    torch.manual_seed(0)
    layer = Conv2dFA(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    grad_out = torch.randn(2, 3, 5, 5)
    layer(x).backward(grad_out)
    # by the definition: the input gradient of a convolution whose kernel is the feedback kernel,
    # the weight gradient of the real one
    x2 = x.detach().clone().requires_grad_(True)
    feedback_kernel = layer.feedback.clone().requires_grad_(True)
    torch.nn.functional.conv2d(x2, feedback_kernel, padding=1).backward(grad_out)
    weight = layer.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.conv2d(x.detach(), weight, layer.bias.detach(), padding=1).backward(grad_out)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, grad_out.sum((0, 2, 3)))


def test_output_error_is_softmax_minus_one_hot():
    logits, y = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1, 0])
    e = output_error(logits, y)
    p = torch.softmax(logits, 1)
    assert torch.allclose(e, p - torch.eye(2)[y])
    assert torch.allclose(e.sum(1), torch.zeros(2), atol=1e-7)


def test_dfa_update_is_feedback_times_derivative_times_input():
    """dW = ((B e) * f'(a))^T x / batch for a tanh layer with no batch norm or dropout, by hand."""
    cfg = small_config(loss="dfa", model__nonlin="tanh", model__batch_norm=False, model__dropout=0.0,
                       model__num_layers=1, model__num_hidden=4, optim__optim="sgd", optim__lr=1.0)
    block = build_blocks(cfg, (1, 3, 3), 3)[0]  # 9 inputs -> 4 units, feedback (3, 4)
    assert isinstance(block, DFABlock) and block.feedback.shape == (3, 4)
    x = torch.randn(5, 1, 3, 3)
    error = output_error(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    w, b = block.layer.weight.detach().clone(), block.layer.bias.detach().clone()
    a = x.flatten(1) @ w.t() + b
    delta = (error @ block.feedback) * (1 - torch.tanh(a) ** 2) / 5  # (B, 4)
    out, _ = block.forward_train(x)
    block.learn(out, error)  # plain SGD with lr 1: the weights move by exactly minus the update
    assert torch.allclose(w - block.layer.weight, delta.t() @ x.flatten(1), atol=1e-6)
    assert torch.allclose(b - block.layer.bias, delta.sum(0), atol=1e-6)


def test_feedback_matrices_come_from_the_seed_and_never_change():
    cfg = small_config(loss="dfa", model__num_hidden=64)
    first, again = build_blocks(cfg, (1, 28, 28), 10), build_blocks(cfg, (1, 28, 28), 10)
    other = build_blocks(small_config(loss="dfa", model__num_hidden=64, run__seed=99), (1, 28, 28), 10)
    assert torch.equal(first[0].feedback, again[0].feedback) and torch.equal(first[1].feedback, again[1].feedback)
    assert not torch.equal(first[0].feedback, first[1].feedback)  # each layer its own matrix
    assert not torch.equal(first[0].feedback, other[0].feedback)
    before = first[0].feedback.clone()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(3):
        out, _ = first[0].forward_train(x)
        first[0].learn(out, output_error(torch.randn(16, 10), y))
    assert torch.equal(first[0].feedback, before)
    assert "feedback" in first[0].state_dict()


def test_feedback_normalization_scales_entries_to_width_times_classes():
    g = torch.Generator().manual_seed(0)
    normalized = feedback_matrix(10, 800, g, normalized=True)
    raw = feedback_matrix(10, 800, torch.Generator().manual_seed(0), normalized=False)
    assert normalized.var().item() == pytest.approx(1 / (800 * 10), rel=0.05)
    assert raw.var().item() == pytest.approx(1.0, rel=0.05)
