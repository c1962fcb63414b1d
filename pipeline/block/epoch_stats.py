"""A block's training statistics over an epoch: summed loss and classifier hits, kept on the device until read."""

from __future__ import annotations

import torch

from pipeline.observe.metrics import error_percent


class EpochStats:
    """Sums of a block's training loss and classifier hits over an epoch, kept on the device until read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.hits: torch.Tensor | int = 0
        self.examples = 0
        self.scored = False

    def add(self, loss: torch.Tensor, predictions: torch.Tensor | None, labels: torch.Tensor,
            bad: torch.Tensor | None = None) -> None:
        """Add one update; where the device flag `bad` is set its loss and hits count as zero (the watch that reads
        the flag takes its examples out again), so nothing here waits for the device."""
        n = labels.numel()
        loss_sum = loss.detach() * n
        if bad is not None:
            loss_sum = torch.where(bad, 0.0, loss_sum)
        self.loss_sum = self.loss_sum + loss_sum
        if predictions is not None:
            hits = (predictions == labels).sum()
            self.hits = self.hits + (hits if bad is None else torch.where(bad, 0, hits))
            self.scored = True
        self.examples += n

    def summary(self) -> dict[str, float | None]:
        """Mean loss and error (percent, None without a classifier) since the last reset."""
        if not self.examples:
            return {"loss": None, "error": None}
        loss = float(self.loss_sum) / self.examples
        error = error_percent(int(self.hits), self.examples) if self.scored else None
        return {"loss": loss, "error": error}
