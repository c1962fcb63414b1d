"""Models as plain lists of blocks (mlp, vgg8b, vgg11b as in the reference), ready to be cut into stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from pipeline.blocks import Block, DFABlock, HiddenBlock, OutputBlock, make_optimizer
from pipeline.feedback import Conv2dFA, LinearFA, feedback_matrix
from pipeline.heads import LocalHeads
from pipeline.losses import output_loss_scale
from pipeline.precision import Precision
from pipeline.seeding import generator, seeded_init

if TYPE_CHECKING:
    from pipeline.config import Config, ModelConfig

# Convolution widths; "M" is a 2x2 max pool, folded into the preceding block's output.
VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
}


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Shape of one block before it is built: conv (size set) or linear (size None), or the output classifier."""

    kind: str  # "conv", "linear" or "output"
    inputs: int  # input channels or features
    outputs: int  # output channels, features or classes
    size: int | None = None  # conv: spatial size of the block's activation (before pooling)
    kernel: int = 3
    stride: int = 1
    pool: bool = False
    flatten_input: bool = False

    def output_features(self) -> int:
        """Features a block hands on: what the next block reads, and the width of a DFA feedback matrix."""
        if self.kind != "conv":
            return self.outputs
        side = self.size // 2 if self.pool else self.size
        return self.outputs * side * side


def plan_blocks(model: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> list[BlockPlan]:
    """The block list of a model for inputs (C, H, W): hidden blocks in order, then the output classifier."""
    channels, size, _ = input_shape
    plans: list[BlockPlan] = []
    if model.name in VGG_LAYOUTS:
        for item in VGG_LAYOUTS[model.name]:
            if item == "M":
                last = plans[-1]
                plans[-1] = BlockPlan(last.kind, last.inputs, last.outputs, last.size, last.kernel, last.stride, pool=True)
                size //= 2
                continue
            width = int(item * model.feat_mult)
            if not plans and size > 64:  # large inputs (STL-10): a 7x7 stride-2 first convolution
                size //= 2
                plans.append(BlockPlan("conv", channels, width, size, kernel=7, stride=2))
            else:
                plans.append(BlockPlan("conv", channels, width, size))
            channels = width
    features = channels * size * size
    widths = model.hidden_sizes or (model.num_hidden,) * model.num_layers
    for layer, width in enumerate(widths):
        plans.append(BlockPlan("linear", features, width, flatten_input=layer == 0))
        features = width
    plans.append(BlockPlan("output", features, num_classes, flatten_input=True))
    return plans


def count_blocks(model: ModelConfig) -> int:
    """Blocks of a model, the output classifier included (independent of the input shape)."""
    convs = sum(isinstance(item, int) for item in VGG_LAYOUTS.get(model.name, []))
    return convs + model.num_layers + 1


def _build(plan: BlockPlan, index: int, cfg: Config, num_classes: int) -> Block:
    rule = cfg.loss.loss
    fa = rule == "fa"
    if plan.kind == "output":
        return OutputBlock(index, plan.inputs, plan.outputs, loss_scale=output_loss_scale(rule, cfg.loss.beta),
                           zero_init=cfg.loss.local, feedback_alignment=fa)
    if plan.kind == "conv":
        layer = (Conv2dFA if fa else nn.Conv2d)(plan.inputs, plan.outputs, plan.kernel, stride=plan.stride, padding=plan.kernel // 2)
    else:
        layer = (LinearFA if fa else nn.Linear)(plan.inputs, plan.outputs)
    common = dict(batch_norm=cfg.model.batch_norm, nonlin=cfg.model.nonlin, dropout=cfg.model.dropout,
                  pool=nn.MaxPool2d(2, 2) if plan.pool else None, flatten_input=plan.flatten_input)
    if rule == "dfa":
        feedback = feedback_matrix(num_classes, plan.output_features(), generator(cfg.run.seed, "feedback", index),
                                   cfg.loss.feedback_normalization)
        return DFABlock(index, layer, feedback, **common)
    heads = LocalHeads(cfg.loss, num_classes, plan.outputs, plan.size) if cfg.loss.local else None
    return HiddenBlock(index, layer, heads=heads, **common)


def build_blocks(cfg: Config, input_shape: tuple[int, int, int], num_classes: int,
                 indices: Iterable[int] | None = None, device: str | torch.device = "cpu") -> list[Block]:
    """Build blocks (all, or those at `indices`), each from its own seed so any process builds the same block.

    Parameters are drawn on the CPU and then moved, so a block's initial weights do not depend on the device.
    """
    plans = plan_blocks(cfg.model, input_shape, num_classes)
    chosen = range(len(plans)) if indices is None else list(indices)
    precision = Precision(cfg.run.precision, torch.device(device).type)
    blocks = []
    for index in chosen:
        with seeded_init(cfg.run.seed, "block", index):
            block = _build(plans[index], index, cfg, num_classes)
        block.to(device)
        block.skip_nonfinite = cfg.run.skip_nonfinite
        block.precision, block.scaler = precision, precision.scaler()
        block.attach(make_optimizer(block.parameters(), cfg.optim), generator(cfg.run.seed, "dropout", index, device=device))
        blocks.append(block)
    return blocks
