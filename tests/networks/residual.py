"""A user's network: a small residual CNN with a custom local head (the example of docs/your-own-network.md)."""

import torch
import torch.nn.functional as F
from torch import nn

import pipeline as lp


class Residual(nn.Module):
    """relu(conv-bn-relu-conv-bn(x) + shortcut(x)): the skip connection stays inside the block."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))


class SmoothedHead(lp.LocalHead):
    """A custom local loss: label-smoothed cross-entropy of a linear classifier on the pooled features."""

    def __init__(self, channels, classes):
        super().__init__()
        self.classifier = nn.Linear(channels, classes)

    def scores(self, h):
        return self.classifier(h.mean((2, 3)))

    def forward(self, h, y):
        scores = self.scores(h)
        return F.cross_entropy(scores, y, label_smoothing=0.1), scores


def build(ctx: lp.NetworkContext) -> lp.Network:
    channels, classes = ctx.input_shape[0], ctx.num_classes
    return lp.Network([
        lp.BlockSpec(lambda: Residual(channels, 16), rule=lambda: SmoothedHead(16, classes)),
        lp.BlockSpec(lambda: Residual(16, 32, stride=2), rule=lp.PredSim(), after=lambda: nn.Dropout2d(0.1)),
        lp.BlockSpec(lambda: Residual(32, 32, stride=2), optim={"lr": 2e-3}),  # the run's --loss, a larger step
        lp.OutputSpec(lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)), flatten=False),
    ])
