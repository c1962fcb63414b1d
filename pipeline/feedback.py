"""Feedback alignment: layers whose backward pass uses fixed random weights instead of the forward weights."""

from __future__ import annotations

import math

import torch
from torch import nn


class _LinearFeedbackAlignment(torch.autograd.Function):
    """y = x W^T + b forward; the input's gradient goes back through the fixed matrix B, not W."""

    @staticmethod
    def forward(ctx, inputs, weight, feedback, bias):
        ctx.save_for_backward(inputs, feedback)
        ctx.has_bias = bias is not None
        out = inputs @ weight.t()  # (B, out)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        inputs, feedback = ctx.saved_tensors
        grad_inputs = grad_out @ feedback if ctx.needs_input_grad[0] else None  # (B, in)
        grad_weight = grad_out.t() @ inputs if ctx.needs_input_grad[1] else None  # (out, in)
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
