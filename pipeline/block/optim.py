"""A block's optimizer and the step learning-rate schedule of the reference."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.config import OptimConfig


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer each block owns: adam, amsgrad or sgd, with weight decay."""
    params = list(params)
    # fused kernels: one pass over each parameter's state; on CPU a quarter of a block's step time saved over foreach.
    # They also skip a step on the device when told to ([Note: deferred non-finite check] in pipeline/block/nonfinite.py).
    if cfg.optim == "sgd":
        sgd = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
        if cfg.momentum:
            # Fused SGD allocates its momentum buffers with torch.empty_like on its first step and fills them in the
            # kernel (torch/optim/sgd.py `_fused_sgd`, is_first_step); a first step skipped through found_inf would
            # leave them uninitialised. Zero buffers from the start give the first step's buffer as momentum * 0 +
            # grad = grad, the same bits, and make a skipped first step a true no-op.
            for p in params:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sgd
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.optim == "amsgrad", fused=True)


def learning_rate(cfg: OptimConfig, epoch: int) -> float:
    """Step schedule of the reference: lr * fact ** (milestones passed before this 1-based epoch)."""
    return cfg.lr * cfg.lr_decay_fact ** bisect.bisect_right(cfg.lr_decay_milestones, epoch - 1)
