"""A user's network whose blocks take the run's --loss (no rule of their own): trained by DFA in the tests."""

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
