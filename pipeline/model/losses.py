"""Local loss math: similarity matrices, the pred / sim / predsim losses and the bio label targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPSILON = 1e-8  # keeps the row normalisation finite for constant rows


def similarity_matrix(features: torch.Tensor, use_std: bool = True) -> torch.Tensor:
    """Adjusted cosine similarity between the rows of a batch, shape (B, B), clamped to [-1, 1].

    Feature maps (B, C, H, W) with C > 3 channels and more than one row (H > 1) are first reduced to the
    per-channel standard deviation over positions (B, C), unless `use_std` is off; anything else is flattened.
    Each row then has its mean removed and is scaled to unit L2 norm.
    """
    if features.dim() == 4 and use_std and features.size(1) > 3 and features.size(2) > 1:
        rows = features.flatten(2).std(dim=2)  # (B, C)
    else:
        rows = features.flatten(1)  # (B, D)
    centred = rows - rows.mean(dim=1, keepdim=True)
    norms = centred.pow(2).sum(dim=1, keepdim=True).sqrt()
    unit = centred / (EPSILON + norms)
    return (unit @ unit.t()).clamp(-1.0, 1.0)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot encoding (B, num_classes) of integer labels (B,)."""
    return F.one_hot(labels, num_classes).to(torch.float32)


def sim_loss(features: torch.Tensor, target_similarity: torch.Tensor, use_std: bool = True) -> torch.Tensor:
    """Similarity-matching loss: MSE between the features' similarity matrix and a target one."""
    return F.mse_loss(similarity_matrix(features, use_std), target_similarity)


def pred_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Prediction loss of a local classifier: cross-entropy against the labels."""
    return F.cross_entropy(logits, labels)


def bio_pred_loss(logits: torch.Tensor, binary_targets: torch.Tensor) -> torch.Tensor:
    """Prediction loss of the bio variant: BCE-with-logits against the binarised label projection."""
    return F.binary_cross_entropy_with_logits(logits, binary_targets)


def predsim(pred: torch.Tensor, sim: torch.Tensor, beta: float) -> torch.Tensor:
    """The predsim mixture `(1 - beta) * pred + beta * sim`."""
    return (1.0 - beta) * pred + beta * sim


def project_labels(labels_one_hot: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Fixed random projection of one-hot labels (B, classes) @ (classes, P) -> (B, P), used by the bio variant."""
    return labels_one_hot @ projection


def bio_targets(projected_labels: torch.Tensor) -> torch.Tensor:
    """Binarised projected labels: 1 where the projection is positive, else 0 (the bio pred head's target)."""
    return (projected_labels > 0).to(projected_labels.dtype)


def output_loss_scale(loss: str, beta: float) -> float:
    """Weight of the output classifier's cross-entropy: (1 - beta) under predsim, as in the reference, else 1."""
    return 1.0 - beta if loss == "predsim" else 1.0
