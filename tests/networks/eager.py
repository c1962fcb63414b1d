"""A factory that builds its modules up front (as one does to wrap a model one already has): every process must
still get the same weights, and one whose weights differ between processes must be refused."""

import os

import torch
from torch import nn

import pipeline as lp


def build(ctx: lp.NetworkContext) -> lp.Network:
    channels, classes = ctx.input_shape[0], ctx.num_classes
    stem = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    middle = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    last = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
    classifier = nn.Linear(16 * 7 * 7, classes)
    return lp.Network([lp.BlockSpec(lambda: stem), lp.BlockSpec(lambda: middle, after=lambda: nn.Dropout(0.1)),
                       lp.BlockSpec(lambda: last), lp.OutputSpec(lambda: classifier)])


def by_process(ctx: lp.NetworkContext) -> lp.Network:
    """Seeds its own draws from the process id: the same structure everywhere, other weights in every process."""
    torch.manual_seed(os.getpid())
    return build(ctx)
