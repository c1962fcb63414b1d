"""A user's network whose blocks take the run's --loss (no rule of their own): trained by DFA in the tests."""

import torch
from torch import nn

import pipeline as lp
from networks.residual import Residual


def build(ctx: lp.NetworkContext) -> lp.Network:
    channels, classes = ctx.input_shape[0], ctx.num_classes
    return lp.Network([
        lp.BlockSpec(lambda: Residual(channels, 8)),
        lp.BlockSpec(lambda: Residual(8, 16, stride=2), after=lambda: nn.Dropout2d(0.1)),
        lp.BlockSpec(lambda: Residual(16, 16, stride=2)),
        lp.OutputSpec(lambda: nn.Linear(16 * 7 * 7, classes)),
    ])


class _Scaled(nn.Module):
    """A layer whose construction and forward read tensor values (.item()), which the meta device cannot run."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 32)
        self.scale = float(torch.linspace(0.5, 1.0, 3)[1].item())

    def forward(self, x):
        return self.linear(x.flatten(1)) * self.scale * (1.0 if x.abs().max().item() >= 0 else 0.0)


def data_dependent(ctx: lp.NetworkContext) -> lp.Network:
    return lp.Network([lp.BlockSpec(_Scaled), lp.OutputSpec(lambda: nn.Linear(32, ctx.num_classes))])


class _NormedHead(lp.LocalHead):
    """A head with batch norm: it trains in training mode and classifies in eval mode."""

    def __init__(self, features, classes):
        super().__init__()
        self.norm, self.classifier = nn.BatchNorm1d(features), nn.Linear(features, classes)

    def scores(self, h):
        return self.classifier(self.norm(h))

    def forward(self, h, y):
        scores = self.scores(h)
        return nn.functional.cross_entropy(scores, y), scores


def normed_heads(ctx: lp.NetworkContext) -> lp.Network:
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU()),
                                    rule=lambda: _NormedHead(32, ctx.num_classes)),
                       lp.OutputSpec(lambda: nn.Linear(32, ctx.num_classes))])


def in_place_after(ctx: lp.NetworkContext) -> lp.Network:
    """A block whose `after` changes its activation in place (the heads then learn from relu(h))."""
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), after=lambda: nn.ReLU(inplace=True)),
                       lp.OutputSpec(lambda: nn.Linear(32, ctx.num_classes))])
