"""Learning rules a block can take: the local losses (pred, sim, predsim, their bio variant), DFA, or a user's head.

A rule is lazy: it builds a block's heads once the block's activation shape is known, so that each stage process
builds only the heads of its own blocks. A user's head is any module mapping (activation h, labels y) to a loss,
or to (loss, class scores) to have its layer's test error reported (see pipeline/model/heads.py's LocalHead).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.feedback import feedback_matrix
from pipeline.model.heads import LocalHeads
from pipeline.model.seeding import generator

if TYPE_CHECKING:
    from pipeline.config import LossConfig


class LearningRule:
    """How a hidden block learns; `heads(shape, ...)` builds its heads for an activation of `shape` (C, H, W) or (F,)."""

    name = ""

    def heads(self, shape: tuple[int, ...], num_classes: int, loss: LossConfig) -> nn.Module | None:
        raise NotImplementedError


@dataclass(frozen=True)
class LocalLoss(LearningRule):
    """pred, sim or predsim heads (Nøkland & Eidnes); None fields take the run's --beta, --bio, ... values."""

    name: str = "predsim"
    bio: bool | None = None
    beta: float | None = None

    def heads(self, shape: tuple[int, ...], num_classes: int, loss: LossConfig) -> nn.Module:

        overrides = {"loss": self.name} | {k: v for k, v in (("bio", self.bio), ("beta", self.beta)) if v is not None}
        cfg = dataclasses.replace(loss, **overrides)
        if len(shape) == 3:
            channels, height, width = shape
            if height != width:
                raise ConfigError(f"the {self.name} heads need square feature maps, got {height}x{width}")
            return LocalHeads(cfg, num_classes, channels, height)
        if len(shape) == 1:
            return LocalHeads(cfg, num_classes, shape[0], None)
        raise ConfigError(f"the {self.name} heads take (C, H, W) or (F,) activations, got shape {tuple(shape)}")


def PredSim(bio: bool | None = None, beta: float | None = None) -> LocalLoss:
    """(1 - beta) * pred + beta * sim: the paper's rule."""
    return LocalLoss("predsim", bio, beta)


def Pred(bio: bool | None = None) -> LocalLoss:
    """Average pool -> linear classifier -> cross-entropy."""
    return LocalLoss("pred", bio)


def Sim(bio: bool | None = None) -> LocalLoss:
    """MSE between the similarity matrices of the (mapped) activation and of the labels."""
    return LocalLoss("sim", bio)


@dataclass(frozen=True)
class DFA(LearningRule):
    """Direct feedback alignment: the output error through a fixed random matrix is the block's output gradient."""

    name: str = "dfa"

    def heads(self, shape, num_classes, loss):
        return None

    @staticmethod
    def feedback(ctx) -> torch.Tensor:
        """The fixed random matrix (classes, output features) of the block `ctx` (a BlockContext) builds, drawn from
        its own seed, so every process draws the same one."""

        cfg = ctx.network.config
        features = math.prod(ctx.output_shape)
        return feedback_matrix(ctx.network.num_classes, features, generator(cfg.run.seed, "feedback", ctx.index),
                               cfg.loss.feedback_normalization)


def rule_named(name: str) -> LearningRule | None:
    """The rule of --loss `name` for blocks that do not choose one (None for backprop and fa: one global loss)."""
    if name == "dfa":
        return DFA()
    if name in ("pred", "sim", "predsim"):
        return LocalLoss(name)
    return None
