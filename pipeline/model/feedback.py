"""Feedback alignment (FA layers) and direct feedback alignment (DFA): errors carried by fixed random matrices."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.observe.memory import saved_tensors_hooks_under_meter


class _LinearFeedbackAlignment(torch.autograd.Function):
    """y = x W^T + b forward; the input's gradient goes back through the fixed matrix B, not W.

    Under autocast the forward's matmul runs in the autocast dtype (autocast reaches the ops inside a Function's
    forward) and the bias is added in that dtype, as nn.Linear's addmm does; the backward, which runs without
    autocast, computes in grad_out's dtype and autograd casts each gradient to its input's dtype. Under fp32
    every cast below is the tensor itself.
    """

    @staticmethod
    def forward(ctx, inputs, weight, feedback, bias):
        ctx.save_for_backward(inputs, feedback)
        ctx.has_bias = bias is not None
        out = inputs @ weight.t()  # (B, out)
        return out + bias.to(out.dtype) if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, feedback = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_inputs = grad_out @ feedback.to(dtype) if ctx.needs_input_grad[0] else None  # (B, in)
        grad_weight = grad_out.t() @ inputs.to(dtype) if ctx.needs_input_grad[1] else None  # (out, in)
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_inputs, grad_weight, None, grad_bias


class LinearFA(nn.Linear):
    """A linear layer trained by feedback alignment: its backward weights B are random and never learn.

    B is a buffer (saved with the module, not optimised), drawn like the forward weights:
    uniform in +-1/sqrt(in_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        bound = 1.0 / math.sqrt(in_features)
        self.register_buffer("feedback", torch.empty(out_features, in_features).uniform_(-bound, bound))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return _LinearFeedbackAlignment.apply(inputs, self.weight, self.feedback, self.bias)


class _Conv2dFeedbackAlignment(torch.autograd.Function):
    """conv2d forward; the input's gradient goes back through the fixed random kernel, not the weights.
    (Mixed precision as in _LinearFeedbackAlignment: the backward computes in grad_out's dtype.)"""

    @staticmethod
    def forward(ctx, inputs, weight, feedback, bias, stride, padding):
        ctx.save_for_backward(inputs, feedback)
        ctx.stride, ctx.padding, ctx.weight_shape = stride, padding, weight.shape
        ctx.has_bias = bias is not None
        return F.conv2d(inputs, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        inputs, feedback = ctx.saved_tensors
        grad_inputs = grad_weight = grad_bias = None
        dtype = grad_out.dtype
        if ctx.needs_input_grad[0]:
            grad_inputs = torch.nn.grad.conv2d_input(inputs.shape, feedback.to(dtype), grad_out, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.nn.grad.conv2d_weight(inputs.to(dtype), ctx.weight_shape, grad_out, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_inputs, grad_weight, None, grad_bias, None, None


class Conv2dFA(nn.Conv2d):
    """A convolution trained by feedback alignment: a fixed random kernel carries the error to its input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        self.register_buffer("feedback", torch.empty_like(self.weight).uniform_(-bound, bound))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return _Conv2dFeedbackAlignment.apply(inputs, self.weight, self.feedback, self.bias, self.stride, self.padding)


def output_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The DFA error e = softmax(logits) - onehot(labels), (B, classes): the cross-entropy gradient per example,
    in fp32 whatever the logits' dtype (pipeline/block/precision.py)."""
    error = torch.softmax(logits.detach().float(), dim=1)
    error[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return error


def feedback_matrix(classes: int, features: int, generator: torch.Generator, normalized: bool = True) -> torch.Tensor:
    """A fixed random DFA feedback matrix B (classes, features), Gaussian.

    Normalised as in Launay et al. (principled DFA training): entries of variance 1 / (features * classes),
    so that B e has the same scale whatever the layer's width; otherwise standard normal.
    """
    matrix = torch.randn(classes, features, generator=generator, device=generator.device)  # also under a meta default
    return matrix / math.sqrt(features * classes) if normalized else matrix


def direct_feedback(error: torch.Tensor, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B e for a batch, shaped like the layer output it is injected at, averaged over the batch like a mean loss."""
    return (error @ matrix).view(shape) / error.shape[0]


@contextlib.contextmanager
def keep_weights_at_forward(parameters) -> Iterator[None]:
    """Inside: autograd saves its own copy of any parameter a backward pass will need.

    Asynchronous DFA applies a batch's error a few batches after its forward pass, when the optimizer has already
    stepped the parameters in place; with these copies the update is the one the forward-time weights give
    (a delayed gradient), instead of an autograd error. Parameters that are not saved (a linear layer's weight
    when its input is detached) are not copied.
    """
    storages = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() in storages:
            return tensor.detach().clone()
        return tensor

    with saved_tensors_hooks_under_meter(pack):  # the memory meter, if one counts, still sees every saved tensor
        yield
