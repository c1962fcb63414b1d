"""Local heads of a hidden block: the prediction and similarity-matching losses that train it on its own."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.model import losses
from pipeline.model.feedback import LinearFA
from pipeline.block.precision import float32_math

if TYPE_CHECKING:
    from pipeline.config import LossConfig


def decoder_pool(channels: int, size: int, limit: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Average-pool kernel, padding and resulting feature count that bring C*size*size to at most `limit`.

    Like the reference: the kernel doubles in height, then width, in turn, until the features fit
    (or the kernel covers the map); padding centres the ceil-sized output.
    """
    kernel_h = kernel_w = 1
    out_h = out_w = size
    while channels * out_h * out_w > limit and kernel_h < size:
        kernel_h *= 2
        out_h = math.ceil(size / kernel_h)
        if channels * out_h * out_w > limit:
            kernel_w *= 2
            out_w = math.ceil(size / kernel_w)
    pad_h = (kernel_h * (out_h - size // kernel_h)) // 2
    pad_w = (kernel_w * (out_w - size // kernel_w)) // 2
    pooled_h = (size + 2 * pad_h - kernel_h) // kernel_h + 1
    pooled_w = (size + 2 * pad_w - kernel_w) // kernel_w + 1
    return (kernel_h, kernel_w), (pad_h, pad_w), channels * pooled_h * pooled_w


class LocalHead(nn.Module):
    """Base of a user's local head: trains the block it sits on from that block's activation alone.

    forward(h, y) returns the block's loss (a scalar), or (loss, scores) with class scores (B, classes) from which
    its training error is counted. scores(h) gives the class scores of an activation without labels (test error,
    early exit); None (the default) when the head does not classify.
    """

    def forward(self, h: torch.Tensor, y: torch.Tensor):  # noqa: D102 (documented on the class)
        raise NotImplementedError

    def scores(self, h: torch.Tensor) -> torch.Tensor | None:
        return None

    def predictions(self, scores: torch.Tensor) -> torch.Tensor:
        """Classes from scores (B, classes): their argmax."""
        return scores.argmax(1)

    def classify(self, h: torch.Tensor) -> torch.Tensor | None:
        """Class predictions (B,) for activation h, or None when the head does not classify."""
        scores = self.scores(h)
        return None if scores is None else self.predictions(scores)

    def class_scores(self, h: torch.Tensor) -> torch.Tensor | None:
        """fp32 scores whose argmax is the prediction (early exit reads their softmax)."""
        scores = self.scores(h)
        return None if scores is None else scores.float()


class LocalHeads(LocalHead):
    """The heads of one hidden block and its local loss.

    features: the block's activation h before dropout, (B, C, H, W) for conv blocks, (B, F) for linear ones.
    - pred: [average pool] -> linear classifier (zero-initialised) -> cross-entropy;
      bio: -> feedback-alignment linear to a fixed random projection of the labels -> BCE with its sign.
    - sim:  [average pool, --sim-pool] -> 3x3 conv (conv blocks) / bias-free linear (linear blocks), as wide as the
      block or --sim-dim -> similarity matrix vs the labels';
      bio: no learned map (conv blocks: the average-pooled features) vs the projected labels' similarity.
    """

    def __init__(self, cfg: LossConfig, num_classes: int, channels: int, size: int | None):
        super().__init__()
        self.loss_name, self.bio, self.beta = cfg.loss, cfg.bio, cfg.beta
        self.similarity_std = cfg.similarity_std
        self.uses_pred = cfg.loss in ("pred", "predsim")
        self.uses_sim = cfg.loss in ("sim", "predsim")
        conv = size is not None
        self.pool: nn.Module | None = None
        features = channels
        if conv:
            kernel, padding, features = decoder_pool(channels, size, cfg.dim_in_decoder)
            if kernel != (1, 1):
                self.pool = nn.AvgPool2d(kernel, padding=padding)
        self.decoder: nn.Linear | None = None
        if self.uses_pred:
            self.decoder = LinearFA(features, cfg.target_proj_size) if self.bio else nn.Linear(features, num_classes)
            nn.init.zeros_(self.decoder.weight)
            if self.bio:  # the reference's LinearFA starts with a zero bias too (its nn.Linear decoder does not)
                nn.init.zeros_(self.decoder.bias)
        self.sim_map: nn.Module | None = None
        self.sim_pool: nn.Module | None = None
        if self.uses_sim and not self.bio:
            width = min(cfg.sim_dim, channels) if cfg.sim_dim else channels  # --sim-dim: at most that wide
            self.sim_map = nn.Conv2d(channels, width, 3, padding=1, bias=False) if conv else nn.Linear(channels, width, bias=False)
            if conv and min(cfg.sim_pool, size) > 1:  # --sim-pool: fewer positions to convolve and to keep
                self.sim_pool = nn.AvgPool2d(min(cfg.sim_pool, size), ceil_mode=True)
        if self.bio:  # fixed random label projection (classes, P), drawn like a bias-free nn.Linear(classes, P)
            bound = 1.0 / math.sqrt(num_classes)
            self.register_buffer("projection", torch.empty(num_classes, cfg.target_proj_size).uniform_(-bound, bound))
        self.num_classes = num_classes

    def _pooled(self, h: torch.Tensor) -> torch.Tensor:
        return (self.pool(h) if self.pool is not None else h).flatten(1)

    def _label_targets(self, y: torch.Tensor) -> torch.Tensor:
        labels = losses.one_hot(y, self.num_classes).to(self.projection.dtype if self.bio else torch.float32)
        return losses.project_labels(labels, self.projection) if self.bio else labels

    def loss(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's local loss (fp32) on activation h and labels y (B,), and the pred head's logits (fp32) if any.

        The heads' layers run under the caller's autocast; the loss math runs in fp32 on float copies of their
        outputs (pipeline/block/precision.py says why). Under fp32 the copies are the tensors themselves.
        """
        logits = features = pred = sim = None
        if self.uses_pred:
            logits = self.decoder(self._pooled(h))
        if self.uses_sim:
            if self.bio:
                features = self.pool(h) if self.pool is not None else h
            else:
                features = self.sim_map(self.sim_pool(h) if self.sim_pool is not None else h)
        with float32_math(h.device.type):
            targets = self._label_targets(y)  # (B, classes) one-hot, or (B, P) projected
            if logits is not None:
                logits = logits.float()
                pred = losses.bio_pred_loss(logits, losses.bio_targets(targets)) if self.bio else losses.pred_loss(logits, y)
            if features is not None:
                target_similarity = losses.similarity_matrix(targets, self.similarity_std)
                sim = losses.sim_loss(features.float(), target_similarity, self.similarity_std)
            if pred is not None and sim is not None:
                return losses.predsim(pred, sim, self.beta), logits
        return (pred if pred is not None else sim), logits

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.loss(h, y)

    def scores(self, h: torch.Tensor) -> torch.Tensor | None:
        """The pred head's logits on activation h, or None without a pred head."""
        return self.decoder(self._pooled(h)) if self.uses_pred else None

    def class_scores(self, h: torch.Tensor) -> torch.Tensor | None:
        """fp32 scores whose argmax is the prediction (under bio: each class code's summed logits)."""
        logits = self.scores(h)
        if logits is None:
            return None
        with float32_math(logits.device.type):  # as predictions(): the code sums in fp32 under any autocast
            logits = logits.float()
            return logits @ losses.bio_targets(self.projection).t() if self.bio else logits

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Class predictions from the pred head's logits.

        Under bio the head predicts the binarised label projection; the class chosen is the one whose code
        has the lowest BCE, i.e. the largest sum of the logits where the code is 1 (summed in fp32).
        """
        if self.bio:
            with float32_math(logits.device.type):
                return (logits.float() @ losses.bio_targets(self.projection).t()).argmax(1)
        return logits.argmax(1)
