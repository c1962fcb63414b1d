"""ResNets and wide ResNets of the reference (anokland/local-loss), one pipeline block per residual unit.

Each residual unit keeps its shortcut inside its block, so one tensor crosses every block boundary, and its
local heads learn from the unit's output (after the addition and the nonlinearity). The reference instead puts
a local loss on every convolution of a unit; here the unit's convolutions learn together from the unit's one
loss. Widths are multiplied by --feat-mult; the output classifier average-pools the last feature maps to 1x1
(the reference's 4x4 pool on 32x32 inputs, for any input size).

Wide ResNets (WRN-depth-widen) differ from the reference's more: their units are post-activation (conv, batch
norm, relu, --dropout, conv, batch norm, + shortcut, relu; the reference's are pre-activation), and the adapted
"...a" variants keep only the reference's widths (the first group as wide as the second) with no dropout, and the
same average-pooling classifier (the reference's has dropout before every convolution and a 2x2 max pool).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.network import BlockSpec, Network, NetworkContext, OutputSpec
from pipeline.model.feedback import Conv2dFA, LinearFA


def _conv(ctx: NetworkContext, inputs: int, outputs: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Module:

    kind = Conv2dFA if ctx.config.loss.loss == "fa" else nn.Conv2d
    return kind(inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _norm(ctx: NetworkContext, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if ctx.model.batch_norm else nn.Identity()


class ResidualUnit(nn.Module):
    """relu(branch(x) + shortcut(x)); the shortcut is a strided 1x1 convolution (with batch norm) where the shape
    changes, the identity otherwise."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def basic_unit(ctx: NetworkContext, inputs: int, planes: int, stride: int) -> ResidualUnit:
    branch = nn.Sequential(_conv(ctx, inputs, planes, 3, stride), _norm(ctx, planes), nn.ReLU(),
                           _conv(ctx, planes, planes, 3), _norm(ctx, planes))
    return ResidualUnit(branch, _shortcut(ctx, inputs, planes, stride))


def bottleneck_unit(ctx: NetworkContext, inputs: int, planes: int, stride: int) -> ResidualUnit:
    outputs = 4 * planes
    branch = nn.Sequential(_conv(ctx, inputs, planes, 1), _norm(ctx, planes), nn.ReLU(),
                           _conv(ctx, planes, planes, 3, stride), _norm(ctx, planes), nn.ReLU(),
                           _conv(ctx, planes, outputs, 1), _norm(ctx, outputs))
    return ResidualUnit(branch, _shortcut(ctx, inputs, outputs, stride))


def wide_unit(ctx: NetworkContext, inputs: int, planes: int, stride: int, dropout: float) -> ResidualUnit:
    branch = nn.Sequential(_conv(ctx, inputs, planes, 3, bias=True), _norm(ctx, planes), nn.ReLU(),
                           *([nn.Dropout(dropout)] if dropout else []),
                           _conv(ctx, planes, planes, 3, stride, bias=True), _norm(ctx, planes))
    return ResidualUnit(branch, _shortcut(ctx, inputs, planes, stride))


def _shortcut(ctx: NetworkContext, inputs: int, outputs: int, stride: int) -> nn.Module:
    if stride == 1 and inputs == outputs:
        return nn.Identity()
    return nn.Sequential(_conv(ctx, inputs, outputs, 1, stride), _norm(ctx, outputs))


def _stem(ctx: NetworkContext, outputs: int, dropout: bool = True) -> BlockSpec:
    """The first block: a 3x3 convolution, batch norm, relu."""
    channels = ctx.input_shape[0]
    return BlockSpec(lambda: nn.Sequential(_conv(ctx, channels, outputs, 3), _norm(ctx, outputs), nn.ReLU()),
                     after=_dropout(ctx) if dropout else None)


def _dropout(ctx: NetworkContext) -> Callable[[], nn.Module] | None:
    """--dropout on whole feature maps after each block's local loss (drawn from the block's own generator)."""
    return (lambda: nn.Dropout2d(ctx.model.dropout)) if ctx.model.dropout else None


def _head(ctx: NetworkContext, features: int) -> OutputSpec:
    def layer() -> nn.Module:

        loss = ctx.config.loss
        linear = (LinearFA if loss.loss == "fa" else nn.Linear)(features, ctx.num_classes)
        if loss.local:
            nn.init.zeros_(linear.weight)  # as the reference's output layer under local learning
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)

    return OutputSpec(layer, flatten=False)


def _width(ctx: NetworkContext, planes: int) -> int:
    width = int(planes * ctx.model.feat_mult)
    if width < 1:
        raise ConfigError(f"--feat-mult {ctx.model.feat_mult} leaves a {ctx.model.name} layer with no feature maps: "
                          f"use at least {1 / planes:g}")
    return width


def resnet(unit: str, counts: list[int]) -> Callable[[NetworkContext], Network]:
    expansion = 4 if unit == "bottleneck" else 1
    make = bottleneck_unit if unit == "bottleneck" else basic_unit

    def build(ctx: NetworkContext) -> Network:
        inputs = _width(ctx, 64)
        blocks: list = [_stem(ctx, inputs)]
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            planes = _width(ctx, planes)
            for position in range(count):
                stride = 2 if stage > 0 and position == 0 else 1
                blocks.append(BlockSpec(lambda i=inputs, p=planes, s=stride: make(ctx, i, p, s), after=_dropout(ctx)))
                inputs = planes * expansion
        return Network(blocks + [_head(ctx, inputs)])

    return build


def wide_resnet(depth: int, widen: int, adapted: bool = False) -> Callable[[NetworkContext], Network]:
    """WRN-depth-widen: 3 groups of (depth - 4) / 6 units; "adapted" (the "a" variants): the stem and first group
    widen times wider, no dropout (see the module docstring for how these differ from the reference's)."""
    per_group = (depth - 4) // 6

    def build(ctx: NetworkContext) -> Network:
        widths = [16 * widen, 16 * widen, 32 * widen, 64 * widen] if adapted else [16, 16 * widen, 32 * widen, 64 * widen]
        inputs = _width(ctx, widths[0])
        blocks: list = [_stem(ctx, inputs, dropout=False)]  # the reference's wide stem has no dropout
        inner = 0.0 if adapted else ctx.model.dropout
        for group, planes in enumerate(widths[1:]):
            planes = _width(ctx, planes)
            for position in range(per_group):
                stride = 2 if group > 0 and position == 0 else 1
                blocks.append(BlockSpec(lambda i=inputs, p=planes, s=stride: wide_unit(ctx, i, p, s, inner)))
                inputs = planes
        return Network(blocks + [_head(ctx, inputs)])

    return build


MODELS: dict[str, Callable[[NetworkContext], Network]] = {
    "resnet18": resnet("basic", [2, 2, 2, 2]),
    "resnet34": resnet("basic", [3, 4, 6, 3]),
    "resnet50": resnet("bottleneck", [3, 4, 6, 3]),
    "resnet101": resnet("bottleneck", [3, 4, 23, 3]),
    "resnet152": resnet("bottleneck", [3, 8, 36, 3]),
    **{f"wresnet{d}-{k}{'a' if a else ''}": wide_resnet(d, k, a)
       for d, k in ((10, 8), (16, 4), (16, 8), (28, 10), (40, 10)) for a in (False, True)},
}
