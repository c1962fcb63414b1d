"""The dry run of a network: one forward of a tiny batch (on the meta device) gives every block's shapes, checks
that the blocks fit together, and fingerprints the structure so that ranks can compare what they built."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.model.network import BlockContext, Network, NetworkContext
from pipeline.block.blocks import Block, FeedbackTrained, head_loss
from pipeline.model.seeding import seeded_init



def first_line(exc: BaseException) -> str:
    """An exception's message, short enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass(frozen=True)
class BlockShape:
    """One block as the dry run saw it (shapes per example, without the batch dimension)."""

    input: tuple[int, ...]
    activation: tuple[int, ...]
    output: tuple[int, ...]
    parameters: int  # trainable, heads included
    similarity: bool  # its heads compare B x B similarity matrices (memory grows with the batch squared)
    feedback: bool  # trained by DFA (from the output error) rather than by heads of its own
    heads: bool  # has local heads (a local rule or a user's head)
    structure: str  # parameter and buffer names and shapes, for the fingerprint
    batch_norm: bool = False  # has a batch norm (it cannot train on a batch of one)
    after_in_place: bool = False  # its `after` changes the activation in place (see LocalBlock.forward_local)


@dataclass(frozen=True)
class NetworkShape:
    blocks: list[BlockShape]

    @property
    def fingerprint(self) -> str:
        """A hash of every block's type, shapes, and parameter and buffer names and shapes: two ranks whose
        factories built networks that differ in any of these get different fingerprints (a change that keeps all of
        them, such as another nonlinearity, is not seen)."""
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

        with seeded_init(0, "dry run"):
            return _dry_run(network, ctx, torch.device("cpu"))
    except _BlockFailed as failed:
        raise ConfigError(str(failed)) from None


class _BlockFailed(Exception):
    pass


def blocks_unlike_plan(network: Network, ctx: NetworkContext, indices: list[int], planned: NetworkShape) -> list[int] | None:
    """The blocks at `indices` that this process's factory builds otherwise than the plan's dry run saw them (their
    shapes, parameters or structure): a dry run of just those blocks on the meta device, each from its planned
    input. None where they cannot run there (data-dependent code): the caller compares what it built instead."""
    try:
        seen = _dry_run(network, ctx, torch.device("meta"), indices, planned).blocks
    except ConfigError:  # a block that does not take its planned input
        return list(indices)
    except Exception:
        return None
    return [index for index, shape in zip(indices, seen) if shape != planned.blocks[index]]


def _dry_run(network: Network, ctx: NetworkContext, device: torch.device, indices: list[int] | None = None,
             planned: NetworkShape | None = None) -> NetworkShape:

    shapes = []
    x = torch.zeros(DRY_BATCH, *ctx.input_shape, device=device)
    last = len(network) - 1
    for index in range(len(network)) if indices is None else indices:
        spec = network.blocks[index]
        if planned is not None:  # each block alone, from the input the plan says it gets
            x = torch.zeros(DRY_BATCH, *planned.blocks[index].input, device=device)
        where = "the network's input" if index == 0 else f"block {index - 1}'s output"
        in_shape = tuple(x.shape[1:])
        with torch.device(device), torch.no_grad():
            bare = built(spec, BlockContext(index, ctx, in_shape), strict=device.type != "meta")
            bare.eval()
            try:
                h = out = bare(x) if index == last else bare.activation(x)
            except Exception as exc:
                if device.type == "meta":
                    raise
                raise _BlockFailed(f"block {index} cannot take {where}, shape {in_shape} per example "
                                   f"({type(exc).__name__}: {first_line(exc)})") from None
            in_place = False
            if index < last:
                _tensor(h, index, "its layer")
                try:
                    version = h._version
                    out = bare.emit(h)
                    in_place = h._version != version
                except Exception as exc:
                    if device.type == "meta":
                        raise
                    raise _BlockFailed(f"block {index}'s `after` cannot take its activation, shape {tuple(h.shape[1:])} "
                                       f"per example ({type(exc).__name__}: {first_line(exc)})") from None
            _tensor(out, index, "the classifier" if index == last else "its `after`")
            if index == last and tuple(out.shape) != (DRY_BATCH, ctx.num_classes):
                raise ConfigError(f"the output block (block {index}) gives shape {tuple(out.shape[1:])} per example; "
                                  f"it must give {ctx.num_classes} logits, one per class")
            if not any(p.requires_grad for p in bare.parameters()):
                raise ConfigError(f"block {index} has nothing to train: its modules have no parameters (fold a "
                                  f"parameter-free step such as pooling into a neighbour's layer or `after`)")
            shaped = BlockContext(index, ctx, in_shape, tuple(h.shape[1:]), tuple(out.shape[1:]))
            block = bare if index == last else built(spec, shaped, strict=device.type != "meta")
            if getattr(block, "heads", None) is not None:
                _try_heads(block, h, index, device)
        heads = getattr(block, "heads", None)
        shapes.append(BlockShape(in_shape, shaped.activation_shape, shaped.output_shape,
                                 sum(p.numel() for p in block.parameters() if p.requires_grad),
                                 bool(getattr(heads, "uses_sim", False)), isinstance(block, FeedbackTrained), heads is not None,
                                 block_structure(block),
                                 any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in block.modules()),
                                 in_place))
        x = out
    return NetworkShape(shapes)


def block_structure(block: Block) -> str:
    """A block's type and its parameters' and buffers' names and shapes (what the fingerprint hashes): a stage
    compares the blocks it built with the run's dry run by it."""
    return f"{type(block).__name__}[{';'.join(f'{name}{tuple(t.shape)}' for name, t in block.state_dict().items())}]"


def _try_heads(block: Block, h: torch.Tensor, index: int, device: torch.device) -> None:
    """The block's heads on its dry-run activation: a loss that is not a scalar, or heads that cannot take the
    activation, are found here rather than at the first training batch."""

    labels = torch.zeros(h.shape[0], dtype=torch.int64, device=device)
    try:
        head_loss(block.heads.eval(), h, labels)
    except TypeError as exc:
        raise ConfigError(f"block {index}'s head: {exc}") from None
    except Exception as exc:
        if device.type == "meta":
            raise
        raise _BlockFailed(f"block {index}'s head cannot take its activation of shape {tuple(h.shape[1:])} per "
                           f"example ({type(exc).__name__}: {first_line(exc)})") from None


def built(spec: Any, ctx: BlockContext, strict: bool = True) -> Block:
    """spec.build(ctx), checked to be a Block. Not `strict` (the meta-device pass), an exception other than a
    ConfigError propagates as it is, so that the network is tried again on the CPU."""

    try:
        block = spec.build(ctx)
    except ConfigError as exc:
        raise ConfigError(f"block {ctx.index}: {exc}") from None
    except Exception as exc:
        if not strict:
            raise
        raise ConfigError(f"block {ctx.index} cannot be built ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(block, Block):
        raise ConfigError(f"block {ctx.index}'s spec built a {type(block).__name__}, not a Block")
    return block


def _tensor(value: Any, index: int, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"block {index}: {what} returned a {type(value).__name__}, not a tensor (a block hands "
                          f"one tensor on; keep a skip connection inside the block)")
