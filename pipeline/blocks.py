"""Blocks: a layer with its local heads, optimizer, random generator and statistics, trainable on its own.

Every block offers the same three steps, used alike by the sequential trainer and by a pipeline stage:

    h, out = block.forward_train(x)   # out is what the next block receives (detach it for local learning)
    block.learn(h, y)                 # local loss -> backward -> this block's optimizer step
    out, hits = block.evaluate(x, y)  # eval mode: output and the block's own classifier's correct count
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.feedback import LinearFA, direct_feedback
from pipeline.heads import LocalHeads

if TYPE_CHECKING:
    from pipeline.config import OptimConfig


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer each block owns: adam, amsgrad or sgd, with weight decay."""
    params = list(params)
    # fused kernels: one pass over each parameter's state; on CPU a quarter of a block's step time saved over foreach
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.optim == "amsgrad", fused=True)


def learning_rate(cfg: OptimConfig, epoch: int) -> float:
    """Step schedule of the reference: lr * fact ** (milestones passed before this 1-based epoch)."""
    return cfg.lr * cfg.lr_decay_fact ** bisect.bisect_right(cfg.lr_decay_milestones, epoch - 1)


class EpochStats:
    """Sums of a block's training loss and classifier hits over an epoch, kept on the device until read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.hits: torch.Tensor | int = 0
        self.examples = 0
        self.scored = False

    def add(self, loss: torch.Tensor, predictions: torch.Tensor | None, labels: torch.Tensor) -> None:
        n = labels.numel()
        self.loss_sum = self.loss_sum + loss.detach() * n
        if predictions is not None:
            self.hits = self.hits + (predictions == labels).sum()
            self.scored = True
        self.examples += n

    def summary(self) -> dict[str, float | None]:
        """Mean loss and error (percent, None without a classifier) since the last reset."""
        if not self.examples:
            return {"loss": None, "error": None}
        loss = float(self.loss_sum) / self.examples
        error = 100.0 * (1.0 - float(self.hits) / self.examples) if self.scored else None
        return {"loss": loss, "error": error}


class NonFiniteLoss(RuntimeError):
    """A block's loss (or the DFA error it got) is NaN or infinite."""


class Block(nn.Module):
    """What every block has: its position, optimizer, private generator and epoch statistics."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator: torch.Generator | None = None
        self.stats = EpochStats()
        self.skip_nonfinite = False  # skip an update whose loss is not finite instead of stopping the run
        self.skipped = 0

    def finite(self, value: torch.Tensor, what: str = "loss") -> bool:
        """True if the update may go ahead; False to skip it (--skip-nonfinite); else NonFiniteLoss."""
        if bool(torch.isfinite(value).all()):
            return True
        if self.skip_nonfinite:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            return False
        raise NonFiniteLoss(f"block {self.index}: {what} is not finite (use --skip-nonfinite to skip such updates)")

    def attach(self, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        self.optimizer, self.generator = optimizer, generator

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Apply and clear the gradients accumulated in this block's parameters."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _nonlinearity(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    return nn.LeakyReLU(0.01, inplace=True) if name == "leakyrelu" else nn.ReLU(inplace=True)


class HiddenBlock(Block):
    """layer -> [batch norm] -> nonlinearity = h; local heads learn from h; dropout [-> max pool] of h goes on."""

    def __init__(self, index: int, layer: nn.Module, *, batch_norm: bool, nonlin: str, dropout: float,
                 pool: nn.Module | None, heads: LocalHeads | None, flatten_input: bool):
        super().__init__(index)
        conv = isinstance(layer, nn.Conv2d)
        self.layer = layer
        self.norm = (nn.BatchNorm2d(layer.out_channels) if conv else nn.BatchNorm1d(layer.out_features)) if batch_norm else None
        self.nonlin = _nonlinearity(nonlin)
        self.dropout = dropout
        self.channel_dropout = conv  # whole feature maps, like nn.Dropout2d
        self.pool = pool
        self.heads = heads
        self.flatten_input = flatten_input

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """h: the block's activation before dropout, where its local loss is taken."""
        if self.flatten_input:
            x = x.flatten(1)
        h = self.layer(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.nonlin(h)

    def emit(self, h: torch.Tensor) -> torch.Tensor:
        """What goes on to the next block: h after dropout (drawn from this block's generator) and pooling."""
        if self.training and self.dropout > 0:
            shape = h.shape[:2] + (1,) * (h.dim() - 2) if self.channel_dropout else h.shape
            keep = 1.0 - self.dropout
            mask = torch.rand(shape, generator=self.generator, device=h.device) < keep
            h = h * mask.to(h.dtype).mul_(1.0 / keep)
        return self.pool(h) if self.pool is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emit(self.activation(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        h = self.activation(x)
        return h, self.emit(h)

    def learn(self, h: torch.Tensor, y: torch.Tensor) -> None:
        loss, logits = self.heads.loss(h, y)
        if not self.finite(loss):
            return
        loss.backward()
        self.step()
        self.stats.add(loss, None if logits is None else self.heads.predictions(logits.detach()), y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.eval()
        h = self.activation(x)
        predictions = self.heads.classify(h) if self.heads is not None else None
        hits = None if predictions is None else (predictions == y).sum()
        return self.emit(h), hits


class DFABlock(HiddenBlock):
    """A hidden block trained by direct feedback alignment: the output error e, through this block's fixed random
    matrix B, is the gradient at its output; so its update is (B e) * f'(a) with its own input (Launay et al.)."""

    def __init__(self, index: int, layer: nn.Module, feedback: torch.Tensor, **kwargs):
        super().__init__(index, layer, heads=None, **kwargs)
        self.register_buffer("feedback", feedback)  # (classes, output features): fixed, saved, never trained

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        out = self.emit(self.activation(x))
        return out, out  # the output is where the error is injected

    def learn(self, out: torch.Tensor, error: torch.Tensor) -> None:
        """Apply the DFA update of one batch: `error` is e = softmax(logits) - onehot(y), (B, classes)."""
        if not self.finite(error, "the output error"):
            return
        out.backward(direct_feedback(error, self.feedback, out.shape))
        self.step()


class OutputBlock(Block):
    """The network's last layer: a linear classifier trained with (scaled) cross-entropy."""

    def __init__(self, index: int, in_features: int, num_classes: int, *, loss_scale: float, zero_init: bool,
                 feedback_alignment: bool = False):
        super().__init__(index)
        self.layer = (LinearFA if feedback_alignment else nn.Linear)(in_features, num_classes)
        if zero_init:
            nn.init.zeros_(self.layer.weight)
        self.loss_scale = loss_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.train()
        logits = self(x)
        return logits, logits

    def learn(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(logits, y)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        if not self.finite(loss):
            return
        loss.backward()
        self.step()
        self.stats.add(loss, logits.detach().argmax(1), y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.eval()
        logits = self(x)
        return logits, (logits.argmax(1) == y).sum()


def train_blocks(blocks: list[Block], x: torch.Tensor, y: torch.Tensor, hand_off=None) -> torch.Tensor:
    """One local-learning step of consecutive blocks on a batch; returns the last block's detached output.

    Each block sees the detached output of the one before, so its update depends only on blocks above it.
    Without `hand_off` each block learns right after its forward (least memory). With it, all blocks run
    forward first, `hand_off(output)` is called (a stage sends the batch downstream there), then they learn:
    the same numbers, but the next stage can start sooner.
    """
    pending = []
    for block in blocks:
        h, out = block.forward_train(x)
        x = out.detach()
        if hand_off is None:
            block.learn(h, y)
        else:
            pending.append((block, h))
    if hand_off is not None:
        hand_off(x)
        for block, h in pending:
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
