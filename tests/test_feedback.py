"""Feedback alignment layers: the backward pass uses the fixed random matrix, and that matrix never changes."""

import torch

from pipeline.feedback import LinearFA


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
