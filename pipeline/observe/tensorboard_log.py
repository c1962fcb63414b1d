"""TensorBoard event files of a run (`--tensorboard DIR`, the optional extra `pip install -e .[tensorboard]`).

The process that keeps the run's metrics (the sequential trainer, or a pipeline's last stage) writes, per epoch:
test_error/layer_k and test_error/output, train_loss/block_k, train_error/block_k, samples_per_s and lr; at the
end: busy_fraction/stage_k of every stage and the final test error.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pipeline.errors import ConfigError

MISSING = "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' (or pip install tensorboard)"


def check_available() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(MISSING)


def _name(index: int, count: int, kind: str) -> str:
    return "output" if index == count - 1 else f"{kind}_{index}"


class TensorBoardLog:
    """Scalars of each epoch record and of the summary, through torch.utils.tensorboard's SummaryWriter."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def epoch(self, record: dict[str, Any]) -> None:
        step = record["epoch"]
        errors = record["layer_test_errors"]
        for i, error in enumerate(errors):
            if error is not None:
                self.writer.add_scalar(f"test_error/{_name(i, len(errors), 'layer')}", error, step)
        for key, tag in (("layer_train_losses", "train_loss"), ("layer_train_errors", "train_error")):
            values = record.get(key) or []
            for i, value in enumerate(values):
                if value is not None:
                    self.writer.add_scalar(f"{tag}/{_name(i, len(values), 'block')}", value, step)
        if record.get("train_samples_per_s") is not None:
            self.writer.add_scalar("samples_per_s", record["train_samples_per_s"], step)
        self.writer.add_scalar("lr", record["lr"], step)
        self.writer.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        step = summary.get("epochs") or 0
        for k, busy in enumerate(summary.get("busy_fraction") or []):
            if busy is not None:
                self.writer.add_scalar(f"busy_fraction/stage_{k}", busy, step)
        if summary.get("test_error") is not None:
            self.writer.add_scalar("final/test_error", summary["test_error"], step)
        if summary.get("train_samples_per_s") is not None:
            self.writer.add_scalar("final/samples_per_s", summary["train_samples_per_s"], step)
        self.writer.close()
