"""A run's network: find its factory (a built-in or the user's), call it, dry-run it once, build a stage's blocks."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from pipeline.model.dry_run import NetworkShape, block_structure, built, first_line, network_shape
from pipeline.errors import ConfigError
from pipeline.model.network import BlockContext, Network, NetworkContext
from pipeline.block.blocks import head_loss, make_optimizer
from pipeline.data import BatchSource
from pipeline.model.models import MODELS
from pipeline.engine.partition import Placement, format_sizes
from pipeline.block.precision import Precision
from pipeline.model.seeding import generator, seeded_init

if TYPE_CHECKING:
    from pipeline.block.blocks import Block
    from pipeline.config import Config


def load_factory(name: str) -> Callable[[NetworkContext], Network]:
    """The factory of --model `name`: a built-in, `package.module:function` or `path/to/file.py:function`."""

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
            module = _running_script(where) or sys.modules.get(module_name)
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
        raise ConfigError(f"--model {name}: {where} does not import ({type(exc).__name__}: {first_line(exc)})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {name}: {where} has no function '{attr}'")
    return factory


def _running_script(path: str):
    """The module of the script this process runs (`__main__`, or `__mp_main__` in a spawned stage process) if
    it is the file at `path`: its factory is used as it is, never executed a second time."""
    for name in ("__main__", "__mp_main__"):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file) == os.path.abspath(path):
            return module
    return None


def make_network(cfg: Config, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Network, NetworkContext]:
    """Call the run's network factory and check what it returns. It is called under a seed derived from the run's
    only, so a factory that builds its modules up front gives the same weights in every process."""

    ctx = NetworkContext(tuple(input_shape), num_classes, cfg)
    factory = load_factory(cfg.model.name)
    try:
        with seeded_init(cfg.run.seed, "factory"):
            network = factory(ctx)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--model {cfg.model.name}: the factory failed ({type(exc).__name__}: {first_line(exc)})") from None
    if isinstance(network, (list, tuple)):
        network = Network(network)
    if not isinstance(network, Network):
        raise ConfigError(f"--model {cfg.model.name}: the factory returned a {type(network).__name__}, not a Network")
    return network, ctx


def resolve(cfg: Config, input_shape: tuple[int, int, int] | None = None,
            num_classes: int | None = None) -> tuple[Network, NetworkContext, NetworkShape]:
    """The run's network, its context and its dry-run shapes (a dry run on the meta device each call: a run makes
    them once, in its plan, pipeline/run/plan.py, and hands the shapes on)."""
    if input_shape is None or num_classes is None:
        input_shape, num_classes = BatchSource.shape_of(cfg.data)
    network, ctx = make_network(cfg, tuple(input_shape), num_classes)
    shape = network_shape(network, ctx)
    _check_rules(cfg, shape)
    return network, ctx, shape


def _check_rules(cfg: Config, shape: NetworkShape) -> None:
    """DFA blocks learn from the output error, which is computed and sent back only under --loss dfa, and a stage
    then treats each of its hidden blocks as one: a network does not mix DFA with local losses. Under a global loss
    (backprop, fa) no block has heads of its own."""
    hidden = shape.blocks[:-1]
    if cfg.loss.loss == "dfa":
        local = [i for i, b in enumerate(hidden) if not b.feedback]
        if local:
            raise ConfigError(f"--loss dfa trains every hidden block by DFA, but block {local[0]} has a rule of its "
                              f"own: give it rule=DFA() (or None), or train with a local --loss")
    else:
        dfa = [i for i, b in enumerate(hidden) if b.feedback]
        if dfa:
            raise ConfigError(f"block {dfa[0]} is trained by DFA, which needs --loss dfa (the output error is sent "
                              f"back only then) with every hidden block on DFA")
    if not cfg.loss.local:  # backprop, fa: one loss at the output trains every block; heads would never learn
        headed = [i for i, b in enumerate(hidden) if b.heads]
        if headed:
            raise ConfigError(f"--loss {cfg.loss.loss} trains every block from the output's loss, but block "
                              f"{headed[0]} has local heads of its own that would never learn: drop its rule, or "
                              f"train with a local --loss")


def count_blocks(cfg: Config) -> int:
    """Blocks of the run's network, the output classifier included."""
    return len(resolve(cfg)[0])


def fingerprint(cfg: Config) -> str:
    """The structure hash of the run's network (see NetworkShape.fingerprint)."""
    return resolve(cfg)[2].fingerprint


def check_network(cfg: Config) -> tuple[Network, NetworkContext, NetworkShape]:
    """Everything about the run's network that can be judged before a process starts: that the factory imports
    and builds a network whose blocks fit together, and that the stages and the partition fit the network.
    Returns what it resolved."""
    resolved = network, _, _ = resolve(cfg)
    for index, spec in enumerate(network.blocks):
        _optim_config(cfg, spec, index)  # a block's optimizer settings are checked like the run's
    blocks = len(network)
    stages, name = cfg.pipeline.stages, cfg.model.name
    if stages > blocks:
        raise ConfigError(f"--stages {stages} is more than the {blocks} blocks of {name} (output classifier "
                          f"included): use at most {blocks}")
    if isinstance(cfg.pipeline.partition, tuple):
        placement = Placement.parse(cfg.pipeline.partition)
        if sum(placement.sizes) != blocks:
            raise ConfigError(f"--partition sums to {sum(placement.sizes):g} but {name} has {blocks} blocks")
        for index in sorted(placement.split):
            why = splittable(cfg, index, resolved)
            if why:
                raise ConfigError(f"--partition {format_sizes(cfg.pipeline.partition)} puts block {index}'s "
                                  f"heads on another stage than its layer, but {why}")
    return resolved


def splittable(cfg: Config, index: int, resolved: tuple | None = None) -> str | None:
    """None if block `index`'s heads may run on another stage than its layer, else why not (`resolved`: the
    run's network as resolve gives it, or None to resolve it here)."""
    network, ctx, shape = resolved or resolve(cfg)
    if index == len(shape.blocks) - 1:
        return "it is the output classifier, whose loss is its own"
    if not shape.blocks[index].heads:
        return "it has no local heads" + (" (DFA trains it from the output error)" if shape.blocks[index].feedback else "")
    if cfg.run.precision == "fp16":
        return "--precision fp16 scales the block's loss with one scaler over its layer and heads: use bf16"
    if _heads_draw_random_numbers(cfg, index, network, ctx, shape):
        return ("its heads draw random numbers from the block's generator, which its layer's stage draws from too "
                "(keep them on their layer's stage)")
    return None


def _heads_draw_random_numbers(cfg: Config, index: int, network: Network, ctx: NetworkContext, shape: NetworkShape) -> bool:
    """Whether block `index`'s heads draw from the block's generator (dropout in a user's head): their loss on a
    random batch of 2, built on the CPU, compared with the generator's state before."""
    block = build_blocks(cfg, ctx.input_shape, ctx.num_classes, indices=[index], resolved=(network, ctx, shape))[0]
    before = block.generator.get_state()
    block.train()
    h = torch.randn(2, *shape.blocks[index].activation)
    with block.own_randomness():
        head_loss(block.heads, h, torch.arange(2) % ctx.num_classes)
    return not torch.equal(before, block.generator.get_state())


def build_blocks(cfg: Config, input_shape: tuple[int, int, int], num_classes: int,
                 indices: Sequence[int] | None = None, device: str | torch.device = "cpu",
                 placement: Placement | None = None, rank: int = 0, shape: NetworkShape | None = None,
                 resolved: tuple[Network, NetworkContext, NetworkShape] | None = None) -> list[Block]:
    """Build blocks of the run's network (all, or those at `indices`; with a `placement`, stage `rank`'s, each
    knowing the half it trains of a split block), each under its own seed, so that any process builds the same
    block; parameters are drawn on the CPU and then moved, so a block's initial weights do not depend on the
    device. With the run's dry-run `shape` (its plan's) the factory is called but the dry run is not repeated; with
    all that `resolved` gives (network, context, shape), neither is."""
    if resolved is not None:
        network, ctx, shape = resolved
    elif shape is None:
        network, ctx, shape = resolve(cfg, tuple(input_shape), num_classes)
    else:
        network, ctx = make_network(cfg, tuple(input_shape), num_classes)
    if placement is not None:
        indices = placement.ranges[rank]
    chosen = range(len(network)) if indices is None else list(indices)
    precision = Precision(cfg.run.precision, torch.device(device).type)
    blocks = []
    for index in chosen:
        block = _fresh_block(cfg, network, ctx, shape, index)
        if hasattr(block, "_after_in_place"):  # known from the dry run: no step with a graph to find out
            block._after_in_place = shape.blocks[index].after_in_place
        block.to(device)
        block.skip_nonfinite = cfg.run.skip_nonfinite
        block.precision, block.scaler = precision, precision.scaler()
        block.optim_config = _optim_config(cfg, network.blocks[index], index)
        block.attach(make_optimizer(block.parameters(), block.optim_config),
                     generator(cfg.run.seed, "dropout", index, device=device))
        if torch.device(device).type != "cpu":
            block.host_generator = generator(cfg.run.seed, "host draws", index)
        if placement is not None:  # whole, or the half of a block split with another stage
            block.part, block.partner = placement.part(rank, index), placement.partner(rank, index)
        blocks.append(block)
    return blocks


def weights_checksum(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers, names and bytes: equal exactly when their values are."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def initial_checksums(cfg: Config, indices: Sequence[int],
                      resolved: tuple[Network, NetworkContext, NetworkShape]) -> dict[int, tuple[str, str]]:
    """The checksum and the structure of each block at `indices` as this process builds it from the factory's
    network and the run's dry-run shapes, `resolved` (on the CPU, one at a time, freed after)."""
    network, ctx, shape = resolved
    checked = {}
    for index in indices:
        block = _fresh_block(cfg, network, ctx, shape, index)
        checked[index] = weights_checksum(block), block_structure(block)
    return checked


def _fresh_block(cfg: Config, network: Network, ctx: NetworkContext, shape: NetworkShape, index: int) -> Block:
    """Block `index` as built, under its own seed, on the CPU."""

    seen = shape.blocks[index]
    with seeded_init(cfg.run.seed, "block", index):
        return built(network.blocks[index], BlockContext(index, ctx, seen.input, seen.activation, seen.output))


def _optim_config(cfg: Config, spec: Any, index: int):
    overrides = dict(getattr(spec, "optim", None) or {})
    if not overrides:
        return cfg.optim
    known = {f.name for f in dataclasses.fields(cfg.optim)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"block {index}: unknown optimizer settings {', '.join(unknown)} (choose from {', '.join(sorted(known))})")
    return dataclasses.replace(cfg.optim, **overrides)
