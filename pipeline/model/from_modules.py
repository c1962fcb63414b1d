"""Models one already has as networks: an nn.Sequential, or a model whose children run in order (torchvision's
ResNet and VGG), cut into blocks where the user says, each hidden block with a learning rule, the last the output.

    def build(ctx):   # --model path/to/file.py:build
        return lp.from_modules(lambda: torchvision.models.resnet18(num_classes=ctx.num_classes),
                               starts=["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"])

Given a function that makes the model, it is made once on the meta device (nothing is allocated), and each block
materializes only its own children: every stage process allocates its own blocks and nothing else. They are then
initialised by each module's reset_parameters() (PyTorch's default initialisation of every layer), under the
block's seed, in the sequential trainer and in every stage alike; a model's own initialisation code, which runs in
its constructor, is not replayed. Given a model already built, its children are used as they are: every process
holds the whole model, whose weights are the same everywhere because the factory runs under the run's seed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.network import BlockSpec, Network, OutputSpec


def from_modules(model: nn.Module | Callable[[], nn.Module], starts: Sequence[str | int] | None = None, *,
                 rules: Any = None) -> Network:
    """A Network of `model`'s children in order, cut into blocks.

    model: an nn.Module, or a function of no arguments that makes one (built lazily, see the module's docstring).
      An nn.Sequential's children are its steps; another model's are its named children in the order they were
      registered, with a flatten added before the first one that is (or begins with) an nn.Linear, as the forward
      of torchvision's ResNet and VGG does. Models whose forward does more between its children do not fit.
    starts: the children (names or positions) where blocks begin; None for one block per child. The first block
      begins at the first child; the last block is the output classifier.
    rules: the hidden blocks' learning rule: None (the run's --loss), one rule for all, or a list with one per
      hidden block (each as BlockSpec's `rule`: a LearningRule, a head factory, or None).
    """
    lazy = not isinstance(model, nn.Module)
    if lazy:
        if not callable(model):
            raise ConfigError(f"from_modules takes an nn.Module or a function that makes one, not a {type(model).__name__}")
        with torch.device("meta"):
            model = model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"from_modules: the function made a {type(model).__name__}, not an nn.Module")
    children = _children(model)
    groups = _groups(children, starts)
    if len(groups) < 2:
        raise ConfigError("from_modules: the model gives one block; it needs at least one hidden block and the output")
    hidden = len(groups) - 1
    if rules is None or not isinstance(rules, (list, tuple)):
        rules = [rules] * hidden
    if len(rules) != hidden:
        raise ConfigError(f"from_modules: {len(rules)} rules for {hidden} hidden blocks")
    layers = [_maker(OrderedDict(group), lazy) for group in groups]
    return Network([BlockSpec(layer, rule=rule) for layer, rule in zip(layers, rules)]
                   + [OutputSpec(layers[-1], flatten=False)])


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    children = list(model.named_children())
    if not children:
        raise ConfigError(f"from_modules: the {type(model).__name__} has no children to cut into blocks")
    if isinstance(model, nn.Sequential):
        return children
    for position, (_, child) in enumerate(children):
        first = child[0] if isinstance(child, nn.Sequential) and len(child) else child
        if isinstance(first, nn.Linear):
            return children[:position] + [("flatten", nn.Flatten())] + children[position:]
    return children


def _groups(children: list[tuple[str, nn.Module]], starts: Sequence[str | int] | None) -> list[list[tuple[str, nn.Module]]]:
    """The children cut where `starts` says (names, or positions among the children as listed)."""
    names = [name for name, _ in children]
    if starts is None:
        return [[child] for child in children]
    positions = []
    for start in starts:
        if isinstance(start, int) and not isinstance(start, bool):
            if not 0 <= start < len(children):
                raise ConfigError(f"from_modules: start {start} is not a child's position (0..{len(children) - 1})")
            positions.append(start)
        elif start in names:
            positions.append(names.index(start))
        else:
            raise ConfigError(f"from_modules: no child named {start!r} (the children: {', '.join(names)})")
    positions = sorted(set(positions) | {0})
    return [children[a:b] for a, b in zip(positions, positions[1:] + [len(children)])]


def _maker(children: OrderedDict, lazy: bool) -> Callable[[], nn.Module]:
    """The layer factory of one block: its children as one nn.Sequential."""
    if not lazy:
        part = nn.Sequential(children)
        return lambda: part

    def materialize() -> nn.Module:
        part = copy.deepcopy(nn.Sequential(children))  # on the meta device
        device = torch.get_default_device()
        if device.type == "meta":  # the dry run: shapes only
            return part
        shared = len({id(p) for p in part.parameters()}) < len(list(part.named_parameters(remove_duplicate=False)))
        if shared:  # to_empty would give each use a tensor of its own: the tie would be lost without a word
            raise ConfigError("from_modules: a block shares parameters between its modules (tied weights), which "
                              "lazy building cannot keep: pass the model built, not a function")
        part.to_empty(device=device)
        _initialise(part)
        return part

    return materialize


def _initialise(part: nn.Module) -> None:
    """Draw every parameter and buffer afresh with its module's reset_parameters(); a module that owns tensors but
    has no such method would keep uninitialised memory, and is refused."""
    for name, module in part.named_modules():
        owned = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not owned:
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise ConfigError(f"from_modules: {type(module).__name__} ({name}) has parameters or buffers but no "
                              f"reset_parameters() to initialise them lazily: pass the model built, not a function")
        reset()
