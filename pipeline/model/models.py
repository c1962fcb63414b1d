"""The built-in networks (the reference's mlp, VGG layouts and ResNets), written with the public network API.

Each is a factory `build(ctx) -> Network` registered under its --model name in MODELS, exactly like a user's
network given as --model path/to/file.py:build. The mlp and VGG blocks are the reference's layer blocks
(StandardBlock: conv or linear -> batch norm -> nonlinearity, dropout and max pooling after the local loss);
the ResNets' blocks are whole residual units (pipeline/model/resnet.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.network import BlockContext, Network, NetworkContext
from pipeline.model.rules import DFA, LearningRule, rule_named
from pipeline.model import resnet
from pipeline.block.blocks import DFABlock, HiddenBlock, OutputBlock
from pipeline.model.feedback import Conv2dFA, LinearFA
from pipeline.model.losses import output_loss_scale

# Convolution widths; "M" is a 2x2 max pool, folded into the preceding block's output (anokland/local-loss).
VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg6a": [128, "M", 256, "M", 512, "M", 512],
    "vgg6b": [128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8a": [128, 256, "M", 256, 512, "M", 512, "M", 512],
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


@dataclass
class StandardBlock:
    """The reference's layer block: [flatten] -> conv (kernel, stride, padding kernel // 2) or linear -> [batch
    norm] -> nonlinearity = h, where the local loss is taken; then dropout (whole feature maps for a conv) and an
    optional 2x2 max pool. Batch norm, nonlinearity and dropout follow the run's --batch-norm, --nonlin, --dropout;
    its rule is the run's --loss unless `rule` is given; --loss fa uses feedback-alignment layers."""

    kind: str  # "conv" or "linear"
    inputs: int
    outputs: int
    kernel: int = 3
    stride: int = 1
    pool: bool = False
    flatten_input: bool = False
    rule: LearningRule | None = None
    optim: dict[str, Any] = field(default_factory=dict)

    def build(self, ctx: BlockContext):

        cfg = ctx.network.config
        fa = cfg.loss.loss == "fa"
        if self.kind == "conv":
            layer = (Conv2dFA if fa else nn.Conv2d)(self.inputs, self.outputs, self.kernel, stride=self.stride,
                                                    padding=self.kernel // 2)
        else:
            layer = (LinearFA if fa else nn.Linear)(self.inputs, self.outputs)
        common = dict(batch_norm=cfg.model.batch_norm, nonlin=cfg.model.nonlin, dropout=cfg.model.dropout,
                      pool=nn.MaxPool2d(2, 2) if self.pool else None, flatten_input=self.flatten_input)
        rule = self.rule or rule_named(cfg.loss.loss)
        if ctx.shaped and isinstance(rule, DFA):
            return DFABlock(ctx.index, layer, rule.feedback(ctx), **common)
        heads = rule.heads(ctx.activation_shape, ctx.network.num_classes, cfg.loss) if ctx.shaped and rule else None
        return HiddenBlock(ctx.index, layer, heads=heads, **common)


@dataclass
class StandardOutput:
    """The reference's output classifier: flatten -> linear (zero-initialised under a local rule, as the
    reference; feedback alignment under --loss fa)."""

    inputs: int
    optim: dict[str, Any] = field(default_factory=dict)
    is_output = True

    def build(self, ctx: BlockContext):

        loss = ctx.network.config.loss
        layer = (LinearFA if loss.loss == "fa" else nn.Linear)(self.inputs, ctx.network.num_classes)
        if loss.local:
            nn.init.zeros_(layer.weight)
        return OutputBlock(ctx.index, layer, loss_scale=output_loss_scale(loss.loss, loss.beta), flatten=True)


def _classifier_layers(ctx: NetworkContext, features: int, first: bool) -> list:
    """The fully connected part: hidden linear blocks of the run's widths, then the output classifier."""
    model = ctx.model
    blocks: list = []
    for width in model.hidden_sizes or (model.num_hidden,) * model.num_layers:
        blocks.append(StandardBlock("linear", features, width, flatten_input=first and not blocks))
        features = width
    return blocks + [StandardOutput(features)]


def mlp(ctx: NetworkContext) -> Network:
    """--num-layers hidden linear blocks of --num-hidden units (or --hidden-sizes), then the classifier."""
    channels, height, width = ctx.input_shape
    if ctx.model.num_layers < 1:
        raise ConfigError(f"--num-layers must be >= 1 for mlp, got {ctx.model.num_layers}")
    return Network(_classifier_layers(ctx, channels * height * width, first=True))


def vgg(name: str) -> Callable[[NetworkContext], Network]:
    """A VGG layout of the reference: conv blocks (widths times --feat-mult), then --num-layers linear blocks."""

    def build(ctx: NetworkContext) -> Network:
        channels, size, _ = ctx.input_shape
        narrowest = min(item for item in VGG_LAYOUTS[name] if isinstance(item, int))
        if int(narrowest * ctx.model.feat_mult) < 1:
            raise ConfigError(f"--feat-mult {ctx.model.feat_mult} leaves a {name} layer with no feature maps: use "
                              f"at least {1 / narrowest:g}")
        blocks: list[StandardBlock] = []
        for item in VGG_LAYOUTS[name]:
            if item == "M":
                blocks[-1].pool = True
                size //= 2
                continue
            width = int(item * ctx.model.feat_mult)
            if not blocks and size > 64:  # large inputs (STL-10): a 7x7 stride-2 first convolution
                size //= 2
                blocks.append(StandardBlock("conv", channels, width, kernel=7, stride=2))
            else:
                blocks.append(StandardBlock("conv", channels, width))
            channels = width
        return Network(blocks + _classifier_layers(ctx, channels * size * size, first=True))

    build.__doc__ = f"{name}: {VGG_LAYOUTS[name]} (the reference's layout) then the classifier."
    return build


def _registry() -> dict[str, Callable[[NetworkContext], Network]]:

    models: dict[str, Callable[[NetworkContext], Network]] = {"mlp": mlp}
    models.update({name: vgg(name) for name in VGG_LAYOUTS})
    models.update(resnet.MODELS)
    return models


MODELS = _registry()
