"""Networks a user might get wrong, one factory each: every one must be refused with one line naming the problem."""

import os

import torch
from torch import nn

import pipeline as lp


def _out(features, ctx):
    return lp.OutputSpec(lambda: nn.Linear(features, ctx.num_classes))


def mismatch(ctx):  # block 1 expects 32 channels, block 0 gives 16
    return lp.Network([lp.BlockSpec(lambda: nn.Conv2d(1, 16, 3, padding=1)),
                       lp.BlockSpec(lambda: nn.Conv2d(32, 8, 3, padding=1)), _out(8 * 28 * 28, ctx)])


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, x  # a skip connection leaking out of the block


def tuple_output(ctx):
    return lp.Network([lp.BlockSpec(_Pair), _out(8 * 28 * 28, ctx)])


def nothing_to_train(ctx):
    return lp.Network([lp.BlockSpec(lambda: nn.Conv2d(1, 8, 3, padding=1)), lp.BlockSpec(lambda: nn.MaxPool2d(2)),
                       _out(8 * 14 * 14, ctx)])


def wrong_logits(ctx):
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32))),
                       lp.OutputSpec(lambda: nn.Linear(32, 7))])


def not_a_network(ctx):
    return {"layers": [nn.Linear(784, 10)]}


def no_output(ctx):
    return lp.Network([lp.BlockSpec(lambda: nn.Linear(784, 10))])


def by_rank(ctx):  # reads what differs between the stage processes
    width = 16 + int(os.environ.get("RANK", "0"))
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, width))),
                       lp.BlockSpec(lambda: nn.Linear(width, 16)),
                       _out(16, ctx)])


def fewer_by_rank(ctx):  # one block fewer on stage 1: its build fails where the others' succeed
    hidden = [lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16)))]
    if os.environ.get("RANK", "0") != "1":
        hidden.append(lp.BlockSpec(lambda: nn.Linear(16, 16)))
    return lp.Network([*hidden, _out(16, ctx)])


def pooled_by_rank(ctx):  # the same parameters everywhere, but stage 2's block 0 halves its output (no parameter)
    after = (lambda: nn.MaxPool1d(2)) if os.environ.get("RANK", "0") == "2" else None
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16)), after=after),
                       lp.BlockSpec(lambda: nn.Linear(16, 16)), _out(16, ctx)])


def failing(ctx):
    raise KeyError("num_blocks")


def bad_head(ctx):  # the loss is a vector
    class VectorLoss(lp.LocalHead):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(32, 10)

        def forward(self, h, y):
            return torch.nn.functional.cross_entropy(self.linear(h), y, reduction="none")

    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), rule=VectorLoss),
                       _out(32, ctx)])


def bad_optim(ctx):  # a misspelt optimizer setting
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), optim={"learning_rate": 1}),
                       _out(32, ctx)])


def mixed_rules(ctx):  # DFA beside a local loss
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), rule=lp.PredSim()),
                       lp.BlockSpec(lambda: nn.Linear(32, 32), rule=lp.DFA()), _out(32, ctx)])


def heads_under_backprop(ctx):  # a local head that a global loss would never train
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32)), rule=lp.PredSim()),
                       _out(32, ctx)])


class _NoisyHead(lp.LocalHead):
    """A head that draws random numbers (dropout) from the block's generator, which its layer's stage draws from too."""

    def __init__(self, features, classes):
        super().__init__()
        self.drop, self.classifier = nn.Dropout(0.5), nn.Linear(features, classes)

    def scores(self, h):
        return self.classifier(self.drop(h.flatten(1)))

    def forward(self, h, y):
        return nn.functional.cross_entropy(self.scores(h), y)


def noisy_heads(ctx):  # fine in one process; its heads cannot leave their layer's stage
    return lp.Network([lp.BlockSpec(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 16)), rule=lambda: _NoisyHead(16, ctx.num_classes)),
                       lp.BlockSpec(lambda: nn.Linear(16, 16)), _out(16, ctx)])
