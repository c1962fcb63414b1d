"""Networks as lists of lazily built blocks: the public API for defining one.

A network is a factory `build(ctx) -> Network`: ctx (a NetworkContext) says the input shape, the classes and the
run's options; the Network lists block specs in order, the output classifier last. A spec builds nothing until
asked: each stage process allocates only its own blocks, each under a seed derived from its index, so the same
factory gives the same block on every rank and in the sequential trainer. (Every process also calls the factory
and runs the network once on the meta device, which allocates nothing: a factory should be cheap and have no
side effects.)

    def build(ctx):
        return Network([BlockSpec(lambda: MyResidualUnit(1, 16), rule=PredSim()),
                        BlockSpec(lambda: MyResidualUnit(16, 32), rule=lambda: MyHead(32, ctx.num_classes)),
                        OutputSpec(lambda: nn.Linear(32 * 28 * 28, ctx.num_classes))])

`--model NAME` takes a built-in (pipeline/model/models.py), `package.module:function` or `path/to/file.py:function`.
pipeline/model/factories.py finds the factory and builds a stage's blocks; pipeline/model/dry_run.py runs the network once on
the meta device (shapes, checks, a structure fingerprint) before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.rules import DFA, LearningRule, rule_named
from pipeline.block.blocks import LocalBlock, LocalDFABlock, OutputBlock
from pipeline.model.losses import output_loss_scale

if TYPE_CHECKING:
    from pipeline.block.blocks import Block
    from pipeline.config import Config


@dataclass(frozen=True)
class NetworkContext:
    """What a network factory may build from: the input shape (C, H, W), the classes and the run's config."""

    input_shape: tuple[int, int, int]
    num_classes: int
    config: Config

    @property
    def model(self):
        return self.config.model


@dataclass(frozen=True)
class BlockContext:
    """What a spec builds one block from: its index, the shapes around it (per example) and the run."""

    index: int
    network: NetworkContext
    input_shape: tuple[int, ...]
    activation_shape: tuple[int, ...] | None = None  # where its local loss is taken; None in the shape pass
    output_shape: tuple[int, ...] | None = None  # what it hands on

    @property
    def shaped(self) -> bool:
        return self.activation_shape is not None


@dataclass
class BlockSpec:
    """A hidden block of a user's network, built lazily.

    layer: makes the module(s) mapping the block's input to its activation h (the local loss is taken on h);
    rule: a LearningRule (PredSim(), Pred(), Sim(), DFA()), a factory of a head module (h, y) -> loss or
      (loss, scores) (see pipeline.model.heads.LocalHead), or None for the run's --loss;
    after: makes what maps h to the block's output (dropout, pooling), applied after the loss;
    optim: this block's optimizer settings over the run's (e.g. {"lr": 1e-3, "weight_decay": 5e-4}).
    Random numbers the modules draw (nn.Dropout) come from the block's own generator.
    """

    layer: Callable[[], nn.Module]
    rule: LearningRule | Callable[[], nn.Module] | None = None
    after: Callable[[], nn.Module] | None = None
    optim: dict[str, Any] = field(default_factory=dict)

    def build(self, ctx: BlockContext) -> Block:

        body = self.layer()
        after = self.after() if self.after is not None else None
        rule = self.rule if self.rule is not None else rule_named(ctx.network.config.loss.loss)
        if not ctx.shaped:
            return LocalBlock(ctx.index, body, None, after)
        if rule is not None and not isinstance(rule, LearningRule):
            rule = rule()  # a factory of a user's head (or a rule's constructor passed uncalled, as rule=PredSim)
        cfg = ctx.network.config
        if isinstance(rule, DFA):
            return LocalDFABlock(ctx.index, body, rule.feedback(ctx), after)
        if isinstance(rule, LearningRule):
            heads = rule.heads(ctx.activation_shape, ctx.network.num_classes, cfg.loss)
        elif rule is None or isinstance(rule, nn.Module):
            heads = rule
        else:
            raise ConfigError(f"its rule made a {type(rule).__name__}, not a head module (h, y) -> loss")
        return LocalBlock(ctx.index, body, heads, after)


@dataclass
class OutputSpec:
    """The output classifier: `layer` makes a module mapping the last block's output to logits (B, classes),
    trained with cross-entropy (scaled by 1 - beta under predsim, as the reference); `flatten` flattens its input."""

    layer: Callable[[], nn.Module]
    flatten: bool = True
    optim: dict[str, Any] = field(default_factory=dict)

    def build(self, ctx: BlockContext) -> Block:

        loss = ctx.network.config.loss
        return OutputBlock(ctx.index, self.layer(), loss_scale=output_loss_scale(loss.loss, loss.beta), flatten=self.flatten)


class Network:
    """An ordered list of block specs, the output classifier (an OutputSpec) last."""

    def __init__(self, blocks: Sequence[Any]):
        self.blocks = list(blocks)
        if not self.blocks:
            raise ConfigError("the network has no blocks")
        for index, spec in enumerate(self.blocks):
            if not callable(getattr(spec, "build", None)):
                raise ConfigError(f"block {index} is a {type(spec).__name__}, not a block spec (BlockSpec, OutputSpec, ...)")
        kinds = [getattr(spec, "is_output", isinstance(spec, OutputSpec)) for spec in self.blocks]
        if not kinds[-1] or any(kinds[:-1]):
            raise ConfigError("the network's last block, and only that one, must be its output classifier (OutputSpec)")

    def __len__(self) -> int:
        return len(self.blocks)
