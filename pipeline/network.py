"""Networks as lists of lazily built blocks: the public API for defining one, and how a run finds and checks it.

A network is a factory `build(ctx) -> Network`: ctx (a NetworkContext) says the input shape, the classes and the
run's options; the Network lists block specs in order, the output classifier last. Nothing is built by the
factory: each stage process calls `spec.build` only for its own blocks, under a seed derived from the block's
index, so the same factory gives the same block on every rank and in the sequential trainer.

    def build(ctx):
        return Network([BlockSpec(lambda: MyResidualUnit(1, 16), rule=PredSim()),
                        BlockSpec(lambda: MyResidualUnit(16, 32), rule=lambda: MyHead(32, ctx.num_classes)),
                        OutputSpec(lambda: nn.Linear(32 * 28 * 28, ctx.num_classes))])

`--model NAME` takes a built-in (pipeline/models.py), `package.module:build` or `path/to/file.py:build`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.rules import LearningRule, rule_named

if TYPE_CHECKING:
    from pipeline.blocks import Block
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
      (loss, scores) (see pipeline.rules.LocalHead), or None for the run's --loss;
    after: makes what maps h to the block's output (dropout, pooling), applied after the loss;
    optim: this block's optimizer settings over the run's (e.g. {"lr": 1e-3, "weight_decay": 5e-4}).
    Random numbers the modules draw (nn.Dropout) come from the block's own generator.
    """

    layer: Callable[[], nn.Module]
    rule: LearningRule | Callable[[], nn.Module] | None = None
    after: Callable[[], nn.Module] | None = None
    optim: dict[str, Any] = field(default_factory=dict)

    def build(self, ctx: BlockContext) -> Block:
        from pipeline.blocks import LocalBlock, LocalDFABlock
        from pipeline.feedback import feedback_matrix
        from pipeline.seeding import generator

        body = self.layer()
        after = self.after() if self.after is not None else None
        rule = self.rule if self.rule is not None else rule_named(ctx.network.config.loss.loss)
        if not ctx.shaped:
            return LocalBlock(ctx.index, body, None, after)
        cfg = ctx.network.config
        if isinstance(rule, LearningRule) and rule.name == "dfa":
            features = int(torch.Size(ctx.output_shape).numel())
            feedback = feedback_matrix(ctx.network.num_classes, features, generator(cfg.run.seed, "feedback", ctx.index),
                                       cfg.loss.feedback_normalization)
            return LocalDFABlock(ctx.index, body, feedback, after)
        if isinstance(rule, LearningRule):
            heads = rule.heads(ctx.activation_shape, ctx.network.num_classes, cfg.loss)
        else:
            heads = rule() if rule is not None else None
        return LocalBlock(ctx.index, body, heads, after)


@dataclass
class OutputSpec:
    """The output classifier: `layer` makes a module mapping the last block's output to logits (B, classes),
    trained with cross-entropy (scaled by 1 - beta under predsim, as the reference); `flatten` flattens its input."""

    layer: Callable[[], nn.Module]
    flatten: bool = True
    optim: dict[str, Any] = field(default_factory=dict)

    def build(self, ctx: BlockContext) -> Block:
        from pipeline.blocks import OutputBlock
        from pipeline.losses import output_loss_scale

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


# ---- finding a network ---------------------------------------------------------------------------------------

def load_factory(name: str) -> Callable[[NetworkContext], Network]:
    """The factory of --model `name`: a built-in, `package.module:function` or `path/to/file.py:function`."""
    from pipeline.models import MODELS

    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise ConfigError(f"unknown --model '{name}': choose one of {', '.join(MODELS)}, or give your own as "
                          f"package.module:function or path/to/file.py:function")
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"--model {name}: no file {where}")
            module_name = "pipeline_user_network_" + hashlib.blake2b(os.path.abspath(where).encode(), digest_size=6).hexdigest()
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, where)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--model {name}: {where} does not import ({type(exc).__name__}: {_first_line(exc)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {name}: {where} has no function '{attr}'")
    return factory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def make_network(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Network, NetworkContext]:
    """Call the run's network factory (cheap: nothing is built) and check what it returns."""
    ctx = NetworkContext(tuple(input_shape), num_classes, cfg)
    factory = load_factory(cfg.model.name)
    try:
        network = factory(ctx)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--model {cfg.model.name}: the factory failed ({type(exc).__name__}: {_first_line(exc)})") from None
    if isinstance(network, (list, tuple)):
        network = Network(network)
    if not isinstance(network, Network):
        raise ConfigError(f"--model {cfg.model.name}: the factory returned a {type(network).__name__}, not a Network")
    return network, ctx


# ---- shapes, checks and the structure fingerprint ------------------------------------------------------------

@dataclass(frozen=True)
class BlockShape:
    """One block as the dry run saw it (shapes per example, without the batch dimension)."""

    input: tuple[int, ...]
    activation: tuple[int, ...]
    output: tuple[int, ...]
    parameters: int  # trainable, heads included
    similarity: bool  # its heads compare B x B similarity matrices (memory grows with the batch squared)
    structure: str  # parameter and buffer names and shapes, for the fingerprint


@dataclass(frozen=True)
class NetworkShape:
    blocks: list[BlockShape]

    @property
    def fingerprint(self) -> str:
        """A hash of every block's structure: equal on two ranks iff their factories built the same network."""
        text = "\n".join(f"{b.input}->{b.activation}->{b.output}:{b.structure}" for b in self.blocks)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


DRY_BATCH = 2


def network_shape(network: Network, ctx: NetworkContext) -> NetworkShape:
    """Every block's shapes from one dry forward of a tiny batch, on the meta device (nothing is allocated); a
    network that cannot run there (data-dependent code) is run on the CPU instead. Raises a ConfigError that
    names the block for a network whose blocks do not fit together."""
    try:
        return _dry_run(network, ctx, torch.device("meta"))
    except ConfigError:
        raise
    except Exception:
        pass
    try:
        from pipeline.seeding import seeded_init

        with seeded_init(0, "dry run"):
            return _dry_run(network, ctx, torch.device("cpu"))
    except _BlockFailed as failed:
        raise ConfigError(str(failed)) from None


class _BlockFailed(Exception):
    pass


def _dry_run(network: Network, ctx: NetworkContext, device: torch.device) -> NetworkShape:
    shapes = []
    x = torch.zeros(DRY_BATCH, *ctx.input_shape, device=device)
    last = len(network) - 1
    for index, spec in enumerate(network.blocks):
        where = "the network's input" if index == 0 else f"block {index - 1}'s output"
        in_shape = tuple(x.shape[1:])
        with torch.device(device), torch.no_grad():
            bare = _built(spec, BlockContext(index, ctx, in_shape))
            bare.eval()
            try:
                if index == last:
                    h = out = bare(x)
                else:
                    h = bare.activation(x)
                    _tensor(h, index, "its layer")
                    out = bare.emit(h)
            except ConfigError:
                raise
            except Exception as exc:
                if device.type == "meta":
                    raise
                raise _BlockFailed(f"block {index} cannot take {where}, shape {in_shape} per example "
                                   f"({type(exc).__name__}: {_first_line(exc)})") from None
            _tensor(out, index, "the classifier" if index == last else "its `after`")
            if index == last and tuple(out.shape) != (DRY_BATCH, ctx.num_classes):
                raise ConfigError(f"the output block (block {index}) gives shape {tuple(out.shape[1:])} per example; "
                                  f"it must give {ctx.num_classes} logits, one per class")
            if not any(p.requires_grad for p in bare.parameters()):
                raise ConfigError(f"block {index} has nothing to train: its modules have no parameters (fold a "
                                  f"parameter-free step such as pooling into a neighbour's layer or `after`)")
            shaped = BlockContext(index, ctx, in_shape, tuple(h.shape[1:]), tuple(out.shape[1:]))
            block = bare if index == last else _built(spec, shaped)
            if getattr(block, "heads", None) is not None:
                _try_heads(block, h, index, device)
        heads = getattr(block, "heads", None)
        structure = ";".join(f"{name}{tuple(t.shape)}" for name, t in block.state_dict().items())
        shapes.append(BlockShape(in_shape, shaped.activation_shape, shaped.output_shape,
                                 sum(p.numel() for p in block.parameters() if p.requires_grad),
                                 bool(getattr(heads, "uses_sim", False)), f"{type(block).__name__}[{structure}]"))
        x = out
    return NetworkShape(shapes)


def _try_heads(block: Block, h: torch.Tensor, index: int, device: torch.device) -> None:
    """The block's heads on its dry-run activation: a loss that is not a scalar, or heads that cannot take the
    activation, are found here rather than at the first training batch."""
    from pipeline.blocks import head_loss

    labels = torch.zeros(h.shape[0], dtype=torch.int64, device=device)
    try:
        head_loss(block.heads.eval(), h, labels)
    except TypeError as exc:
        raise ConfigError(f"block {index}'s head: {exc}") from None
    except Exception as exc:
        if device.type == "meta":
            raise
        raise _BlockFailed(f"block {index}'s head cannot take its activation of shape {tuple(h.shape[1:])} per "
                           f"example ({type(exc).__name__}: {_first_line(exc)})") from None


def _built(spec: Any, ctx: BlockContext) -> Block:
    from pipeline.blocks import Block

    try:
        block = spec.build(ctx)
    except ConfigError as exc:
        raise ConfigError(f"block {ctx.index}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"block {ctx.index} cannot be built ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(block, Block):
        raise ConfigError(f"block {ctx.index}'s spec built a {type(block).__name__}, not a Block")
    return block


def _tensor(value: Any, index: int, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"block {index}: {what} returned a {type(value).__name__}, not a tensor (a block hands "
                          f"one tensor on; keep a skip connection inside the block)")


# ---- a run's network ---------------------------------------------------------------------------------------------

_SHAPES: dict[str, tuple[Network, NetworkContext, NetworkShape]] = {}


def resolve(cfg: Config, input_shape: tuple[int, int, int] | None = None,
            num_classes: int | None = None) -> tuple[Network, NetworkContext, NetworkShape]:
    """The run's network, its context and its dry-run shapes (once per process and config)."""
    import json

    if input_shape is None or num_classes is None:
        from pipeline.data import BatchSource

        input_shape, num_classes = BatchSource.shape_of(cfg.data)
    key = json.dumps([cfg.to_dict(), list(input_shape), num_classes], sort_keys=True, default=str)
    if key not in _SHAPES:
        network, ctx = make_network(cfg, input_shape, num_classes)
        _SHAPES[key] = network, ctx, network_shape(network, ctx)
    return _SHAPES[key]


def count_blocks(cfg: Config) -> int:
    """Blocks of the run's network, the output classifier included."""
    return len(resolve(cfg)[0])


def fingerprint(cfg: Config) -> str:
    """The structure hash of the run's network (see NetworkShape.fingerprint)."""
    return resolve(cfg)[2].fingerprint


def check_network(cfg: Config) -> None:
    """Everything about the run's network that can be judged before a process starts: that the factory imports
    and builds a network whose blocks fit together, and that the stages and the partition fit the network."""
    blocks = count_blocks(cfg)
    stages, name = cfg.pipeline.stages, cfg.model.name
    if stages > blocks:
        raise ConfigError(f"--stages {stages} is more than the {blocks} blocks of {name} (output classifier "
                          f"included): use at most {blocks}")
    if isinstance(cfg.pipeline.partition, tuple) and sum(cfg.pipeline.partition) != blocks:
        raise ConfigError(f"--partition sums to {sum(cfg.pipeline.partition)} but {name} has {blocks} blocks")


def build_blocks(cfg: Config, input_shape: tuple[int, int, int], num_classes: int,
                 indices: Sequence[int] | None = None, device: str | torch.device = "cpu") -> list[Block]:
    """Build blocks of the run's network (all, or those at `indices`), each under its own seed, so that any
    process builds the same block; parameters are drawn on the CPU and then moved, so a block's initial weights
    do not depend on the device."""
    from pipeline.blocks import make_optimizer
    from pipeline.precision import Precision
    from pipeline.seeding import generator, seeded_init

    network, ctx, shape = resolve(cfg, tuple(input_shape), num_classes)
    chosen = range(len(network)) if indices is None else list(indices)
    precision = Precision(cfg.run.precision, torch.device(device).type)
    blocks = []
    for index in chosen:
        spec, seen = network.blocks[index], shape.blocks[index]
        with seeded_init(cfg.run.seed, "block", index):
            block = _built(spec, BlockContext(index, ctx, seen.input, seen.activation, seen.output))
        block.to(device)
        block.skip_nonfinite = cfg.run.skip_nonfinite
        block.precision, block.scaler = precision, precision.scaler()
        block.optim_config = _optim_config(cfg, spec, index)
        block.attach(make_optimizer(block.parameters(), block.optim_config),
                     generator(cfg.run.seed, "dropout", index, device=device))
        blocks.append(block)
    return blocks


def _optim_config(cfg: Config, spec: Any, index: int):
    overrides = dict(getattr(spec, "optim", None) or {})
    if not overrides:
        return cfg.optim
    known = {f.name for f in dataclasses.fields(cfg.optim)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"block {index}: unknown optimizer settings {', '.join(unknown)} (choose from {', '.join(sorted(known))})")
    return dataclasses.replace(cfg.optim, **overrides)
