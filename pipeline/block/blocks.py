"""Blocks: a layer with its local heads, optimizer, random generator and statistics, trainable on its own.

A user's hidden block is a LocalBlock (layer -> h, heads on h, after -> output); the reference's conv/linear
layer block is a HiddenBlock; a DFA-trained block of either kind learns from the output error instead.

Every block offers the same three steps, used alike by the sequential trainer and by a pipeline stage:

    h, out = block.forward_train(x)   # out is what the next block receives (detach it for local learning)
    block.learn(h, y)                 # local loss -> backward -> this block's optimizer step
    out, hits = block.evaluate(x, y)  # eval mode: output and the block's own classifier's correct count

Forwards run under the block's autocast (pipeline/block/precision.py); a non-finite loss skips its update on the device
and is reported to the process's watch (pipeline/block/nonfinite.py), which is read without a sync per step.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.feedback import direct_feedback
from pipeline.model.heads import LocalHeads
from pipeline.block.epoch_stats import EpochStats
from pipeline.block.nonfinite import NonFiniteLoss, NonFiniteWatch  # noqa: F401 (NonFiniteLoss: also imported from here)
from pipeline.block.optim import learning_rate, make_optimizer  # noqa: F401 (a block's optimizer; imported from here too)
from pipeline.block.precision import Precision
from pipeline.model.seeding import GLOBAL_GENERATORS

if TYPE_CHECKING:
    from pipeline.config import OptimConfig
    from pipeline.observe.memory import MemoryMeter


class Block(nn.Module):
    """What every block has: its position, optimizer, private generator and epoch statistics."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator: torch.Generator | None = None
        self.host_generator: torch.Generator | None = None  # a GPU block's CPU draws (torch.randperm(n) without device=)
        self.stats = EpochStats()
        self.skip_nonfinite = False  # skip an update whose loss is not finite instead of stopping the run
        self.skipped = 0  # updates skipped so far, counted when the watch reads their flags
        self.watch: NonFiniteWatch | None = None  # shared by the blocks of a process; None: each update checked at once
        self.precision = Precision()  # autocast dtype of the forward (pipeline/block/precision.py)
        self.scaler: torch.amp.GradScaler | None = None  # fp16 only; its state_dict() belongs in a checkpoint
        self.optim_config: OptimConfig | None = None  # its optimizer settings (the run's, or its spec's overrides)
        self.part = "whole"  # or, for a block split over two stages (pipeline/engine/remote_heads.py), "layer" or "heads"
        self.partner: int | None = None  # the stage that runs the other half of a split block
        self.memory: MemoryMeter | None = None  # the process's memory accounting (pipeline/observe/memory.py), if any

    def owned_state(self) -> dict[str, torch.Tensor]:
        """The entries of state_dict() this process trains: all of them, or its half of a split block (the heads'
        entries, or all the others); the other half's copy here is never updated."""
        state = self.state_dict()
        if self.part == "whole":
            return state
        return {k: v for k, v in state.items() if k.startswith("heads.") == (self.part == "heads")}

    @contextlib.contextmanager
    def own_randomness(self) -> Iterator[None]:
        """Let the modules of this block draw from its own generator where they use the default one (nn.Dropout in
        a user's layer): the same numbers in any process, whatever else that process draws.

        The default generator of the block's device takes the block generator's state for the duration and hands
        the advanced state back, so it is as if the modules had been given the block's generator. A block on a GPU
        also has a generator of its own for what its modules draw on the CPU, swapped in the same way: every
        generator a block can draw from is its own. The default generators are the process's: one block at a time
        holds them (pipeline/model/seeding.py: GLOBAL_GENERATORS), for stages that are threads of one process.
        """
        generator = self.generator
        if generator is None:
            yield
            return
        with GLOBAL_GENERATORS:
            yield from self._swapped_generators(generator)

    def _swapped_generators(self, generator: torch.Generator) -> Iterator[None]:
        device = generator.device
        default = torch.default_generator if device.type == "cpu" else torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()]
        pairs = [(default, generator)]
        if self.host_generator is not None:
            pairs.append((torch.default_generator, self.host_generator))
        saved = [d.get_state() for d, _ in pairs]
        for d, own in pairs:
            d.set_state(own.get_state())
        try:
            yield
        finally:
            for (d, own), state in zip(pairs, saved):
                own.set_state(d.get_state())
                d.set_state(state)

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Where the block's modules run: under its autocast, drawing from its own generator."""
        with self.precision.autocast(), self.own_randomness():
            yield

    def report(self, bad: torch.Tensor, examples: int, what: str = "loss") -> None:
        """Hand an update's device-side non-finite flag to the watch (a block on its own is checked at once)."""
        if self.watch is not None:
            self.watch.report(self, bad, examples, what)
            return
        alone = NonFiniteWatch(every=1)
        alone.report(self, bad, examples, what)
        alone.check()

    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what learn() takes, the detached output): the forward of a block that learns on its own."""
        state, out = self.forward_train(x)
        return state, out.detach()

    def attach(self, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        self.optimizer, self.generator = optimizer, generator

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the block's (fp32) loss; scaled by the block's loss scale under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, bad: torch.Tensor | None = None) -> None:
        """Apply and clear the gradients accumulated in this block's parameters; where the 0-dim device flag `bad`
        is set, the fused optimizer leaves parameters and state untouched, without the host reading the flag."""
        if self.memory is not None:
            self.memory.before_step()
        if self.scaler is not None:
            if bad is not None:
                _mark_non_finite(self.optimizer, bad)
            self.scaler.step(self.optimizer)  # sets optimizer.found_inf from the gradients itself
            self.scaler.update()
        elif bad is None:
            self.optimizer.step()
        else:
            # the attribute GradScaler.step sets on optimizers with _step_supports_amp_scaling (torch/amp/grad_scaler.py)
            self.optimizer.found_inf = bad.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, loss: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None) -> torch.Tensor:
        """Report, backward and step on this block's loss, then add it to the epoch statistics; the update is
        skipped on the device if the loss is not finite. Returns that flag (0-dim bool, on the device)."""
        bad = ~torch.isfinite(loss.detach())
        self.report(bad, labels.numel())
        self.backward(loss)
        self.step(bad)
        self.stats.add(loss, predictions, labels, bad)
        return bad


def _mark_non_finite(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """fp16: a non-finite loss need not make every gradient non-finite; a NaN written (on the device, where `bad`)
    into the smallest gradient makes the block's GradScaler skip the step as it skips an overflow."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        min(grads, key=torch.Tensor.numel).masked_fill_(bad, float("nan"))


def _nonlinearity(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    return nn.LeakyReLU(0.01, inplace=True) if name == "leakyrelu" else nn.ReLU(inplace=True)


def head_loss(heads: nn.Module, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, class scores or None) of a block's heads: the built-in ones or a user's (pipeline/model/rules.py)."""
    out = heads(h, y)
    loss, scores = out if isinstance(out, tuple) else (out, None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"a local head must return a scalar loss (or (loss, scores)), got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss.float().reshape(()), scores


class LocalBlock(Block):
    """A hidden block of a user's network: layer(x) = h, where its heads take their loss; after(h) goes on."""

    _after_in_place: bool | None = None  # whether `after` changes h in place; None until forward_local finds out

    def __init__(self, index: int, layer: nn.Module, heads: nn.Module | None, after: nn.Module | None = None):
        super().__init__(index)
        self.layer = layer
        self.heads = heads
        self.after = after

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """h: the block's activation, where its local loss is taken; in the compute dtype."""
        with self.computing():
            h = self.layer(x)
        return h.to(self.precision.dtype) if isinstance(h, torch.Tensor) else h

    def emit(self, h: torch.Tensor) -> torch.Tensor:
        """What goes on to the next block."""
        if self.after is None:
            return h
        with self.computing():
            return self.after(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emit(self.activation(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        h = self.activation(x)
        return h, self.emit(h)

    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, the detached output): the local loss is taken on h, so nothing after it is ever differentiated, and
        `after` (dropout, pooling) runs without a graph: what it would save for backward (a max pool's input and
        indices) is never kept. The same numbers as forward_train. An `after` that changes h in place (a
        ReLU(inplace=True)) changes what the heads see, and its graph must then stay: the dry run finds out from h's
        version counter (a block built otherwise finds out on its first step, with a graph), and such a block keeps
        running `after` with one."""
        self.train()
        h = self.activation(x)
        if self._after_in_place is not False:  # not known yet, or known to change h in place
            version = h._version
            out = self.emit(h)
            self._after_in_place = h._version != version
            return h, out.detach()
        with torch.no_grad():
            return h, self.emit(h).detach()  # (without `after`, emit gives h itself)

    def learn(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the heads' forward; the built-in heads' loss math is fp32 (LocalHeads.loss); a user's head that draws random
        # numbers draws them from this block's generator too
        with self.computing(), self.memory.part("heads") if self.memory else contextlib.nullcontext():
            loss, scores = head_loss(self.heads, h, y)
        predictions = None
        if scores is not None:
            predict = getattr(self.heads, "predictions", None)
            predictions = predict(scores.detach()) if predict is not None else scores.detach().argmax(1)
        return self.update(loss, y, predictions)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.eval()
        h = self.activation(x)
        return self.emit(h), self.hits(h, y)

    @torch.no_grad()
    def hits(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """How many of a test batch its heads' classifier gets right from h (None without a classifier)."""
        classify = getattr(self.heads, "classify", None)
        with self.precision.autocast():
            predictions = classify(h) if classify is not None else None  # None too for heads without a classifier
        return None if predictions is None else (predictions == y).sum()

    def alignment_weights(self) -> list[torch.Tensor]:
        """The weights whose update direction the alignment angles measure: the layer's."""
        return [p for p in self.layer.parameters() if p.requires_grad]


class HiddenBlock(LocalBlock):
    """layer -> [batch norm] -> nonlinearity = h; local heads learn from h; dropout [-> max pool] of h goes on."""

    def __init__(self, index: int, layer: nn.Module, *, batch_norm: bool, nonlin: str, dropout: float,
                 pool: nn.Module | None, heads: LocalHeads | None, flatten_input: bool):
        Block.__init__(self, index)  # the attributes in the order they always had (parameter and state order)
        conv = isinstance(layer, nn.Conv2d)
        self.layer = layer
        self.norm = (nn.BatchNorm2d(layer.out_channels) if conv else nn.BatchNorm1d(layer.out_features)) if batch_norm else None
        self.nonlin = _nonlinearity(nonlin)
        self.dropout = dropout
        self.channel_dropout = conv  # whole feature maps, like nn.Dropout2d
        self.pool = pool
        self.heads = heads
        self.flatten_input = flatten_input
        self.after = None

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """h: the block's activation before dropout, where its local loss is taken; in the compute dtype."""
        with self.precision.autocast():
            if self.flatten_input:
                x = x.flatten(1)
            h = self.layer(x)
            if self.norm is not None:
                h = self.norm(h)
            # batch norm is on neither of autocast's op lists (https://pytorch.org/docs/stable/amp.html, "Autocast Op
            # Reference"), so it keeps its input's dtype; the cast makes the compute dtype explicit
            return self.nonlin(h).to(self.precision.dtype)

    def emit(self, h: torch.Tensor) -> torch.Tensor:
        """What goes on to the next block: h after dropout (drawn from this block's generator) and pooling."""
        if self.training and self.dropout > 0:
            shape = h.shape[:2] + (1,) * (h.dim() - 2) if self.channel_dropout else h.shape
            keep = 1.0 - self.dropout
            mask = torch.rand(shape, generator=self.generator, device=h.device) < keep
            h = h * mask.to(h.dtype).mul_(1.0 / keep)
        return self.pool(h) if self.pool is not None else h

    def alignment_weights(self) -> list[torch.Tensor]:
        return [self.layer.weight]


class FeedbackTrained:
    """A hidden block trained by direct feedback alignment: the output error e, through this block's fixed random
    matrix B, is the gradient at its output; so its update is (B e) * f'(a) with its own input (Launay et al.)."""

    forward_local = Block.forward_local  # the error enters at the output: the whole block's graph is needed

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        out = self.emit(self.activation(x))
        return out, out  # the output is where the error is injected

    def learn(self, out: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """Apply the DFA update of one batch: `error` is e = softmax(logits) - onehot(y), (B, classes), fp32."""
        bad = ~torch.isfinite(error).all()
        self.report(bad, 0, "the output error")
        feedback = direct_feedback(error, self.feedback, out.shape)  # fp32: scaled before the cast, so no underflow
        if self.scaler is not None:
            feedback = self.scaler.scale(feedback)
        out.backward(feedback.to(out.dtype))
        self.step(bad)
        return bad


class DFABlock(FeedbackTrained, HiddenBlock):
    """The reference's layer block, trained by DFA."""

    def __init__(self, index: int, layer: nn.Module, feedback: torch.Tensor, **kwargs):
        HiddenBlock.__init__(self, index, layer, heads=None, **kwargs)
        self.register_buffer("feedback", feedback)  # (classes, output features): fixed, saved, never trained


class LocalDFABlock(FeedbackTrained, LocalBlock):
    """A user's block, trained by DFA."""

    def __init__(self, index: int, layer: nn.Module, feedback: torch.Tensor, after: nn.Module | None = None):
        LocalBlock.__init__(self, index, layer, None, after)
        self.register_buffer("feedback", feedback)


class OutputBlock(Block):
    """The network's last layer: a classifier (x -> logits) trained with (scaled) cross-entropy."""

    def __init__(self, index: int, layer: nn.Module, *, loss_scale: float, flatten: bool = True):
        super().__init__(index)
        self.layer = layer
        self.loss_scale = loss_scale
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.computing():
            return self.layer(x.flatten(1) if self.flatten else x)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        logits = self(x)
        return logits, logits

    def learn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (fp32) update; returns its device-side non-finite flag, which the hidden blocks of a
        global loss step with (their gradients come from this loss)."""
        loss = F.cross_entropy(logits.float(), y)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        return self.update(loss, y, logits.detach().argmax(1))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        logits = self(x)
        return logits, (logits.argmax(1) == y).sum()


def train_blocks(blocks: list[Block], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One local-learning step of consecutive blocks on a batch, each learning right after its forward (one
    block's graph held at a time); returns the last block's detached output. Each block sees the detached output
    of the one before, so its update depends only on blocks above it."""
    for block in blocks:
        h, x = block.forward_local(x)
        block.learn(h, y)
    return x


def evaluate_blocks(blocks: list[Block], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Eval-mode pass of consecutive blocks: the last output and each block's classifier hits on the batch."""
    hits = []
    for block in blocks:
        x, block_hits = block.evaluate(x, y)
        hits.append(block_hits)
    return x, hits


def forward_for_feedback(blocks: list[Block], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward passes of consecutive DFA blocks: each one's output graph (kept for its update) and the last
    detached output."""
    states = []
    for block in blocks:
        state, out = block.forward_train(x)
        states.append(state)
        x = out.detach()
    return states, x


def learn_from_error(blocks: list[Block], states: list[torch.Tensor], error: torch.Tensor) -> None:
    """Apply one batch's DFA updates, given the output error e of that batch."""
    for block, state in zip(blocks, states):
        block.learn(state, error)
