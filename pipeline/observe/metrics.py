"""Metrics: steady-state throughput, per-epoch records in metrics.jsonl, and summary.json at the end of a run."""

from __future__ import annotations

import json
import os
import time
from typing import Any
from pipeline.observe.tensorboard_log import TensorBoardLog


class Throughput:
    """Training samples per second in steady state: each epoch's first `warmup` batches (at least the first: the
    pipeline fill) are excluded.

    Call start_epoch() before an epoch's batches and batch_done(n) as each training batch completes.
    """

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = max(1, warmup)
        self.samples = 0
        self.seconds = 0.0
        self._first: float | None = None
        self._last: float | None = None
        self._epoch_samples = 0
        self._seen = 0
        self._excluded = 0.0  # seconds within this epoch's window spent on something else (interim tests)

    def start_epoch(self) -> None:
        self._close_epoch()
        self._first = self._last = None
        self._epoch_samples = self._seen = 0
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a test pass between two training batches) out of the epoch's window."""
        if self._first is not None:
            self._excluded += seconds

    def batch_done(self, n: int) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._seen < self.warmup:
            return
        if self._first is None:
            self._first = now
        else:
            self._epoch_samples += n
        self._last = now

    def _close_epoch(self) -> None:
        if self._first is not None and self._last is not None and self._last > self._first:
            self.samples += self._epoch_samples
            self.seconds += self._last - self._first - self._excluded
            self._first = None

    def epoch_rate(self) -> float | None:
        if self._first is None or self._last is None or self._last <= self._first:
            return None
        return self._epoch_samples / (self._last - self._first - self._excluded)

    def rate(self) -> float | None:
        self._close_epoch()
        return self.samples / self.seconds if self.seconds > 0 else None


def error_percent(hits: int, examples: int) -> float:
    """The error in percent at the precision it has: the exact fraction, rounded to 4 decimals (10.4297, never
    10.429687499999996), so that evaluate reproduces what a run wrote."""
    return round(100 * (examples - hits) / examples, 4)


def layer_errors(hits: list[int | None], examples: int) -> list[float | None]:
    """Test error (percent) of each block's classifier; None for a block without one."""
    return [None if h is None else error_percent(h, examples) for h in hits]


class MetricsWriter:
    """Writes metrics.jsonl (one line per epoch), tests.jsonl (one line per test pass: --eval-every's and each
    epoch's) and summary.json into the run's --out folder, if any, and the epochs' scalars as TensorBoard events
    into `tensorboard`, if given."""

    def __init__(self, out_dir: str | None, resumed_epoch: int | None = None, tensorboard: str | None = None,
                 resumed_step: int = 0):
        """A run resumed in (or at the start of) `resumed_epoch`, at `resumed_step`, keeps the epochs and the tests
        recorded before it; lines after it, written by a run that went on past its last checkpoint before it
        failed, are dropped."""
        self.out_dir = out_dir
        self.tensorboard = None
        if tensorboard:

            self.tensorboard = TensorBoardLog(tensorboard)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            # an epoch's own test comes after its last batch's checkpoint: it is kept only from an earlier epoch
            for name, before in (("metrics.jsonl", lambda r: r["epoch"] < resumed_epoch),
                                 ("tests.jsonl", lambda r: r["step"] <= resumed_step if r["interim"] else r["epoch"] < resumed_epoch)):
                path = os.path.join(out_dir, name)
                kept = []
                if resumed_epoch is not None and os.path.exists(path):
                    with open(path) as f:
                        kept = [line for line in f if line.strip() and before(json.loads(line))]
                with open(path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(path + ".tmp", path)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.tensorboard:
            self.tensorboard.epoch(record)
        if self.out_dir:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def test(self, record: dict[str, Any]) -> None:
        if self.out_dir:
            with open(os.path.join(self.out_dir, "tests.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        if self.tensorboard:
            self.tensorboard.summary(summary)
        if self.out_dir:
            path = os.path.join(self.out_dir, "summary.json")
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(path + ".tmp", path)


def describe_epoch(record: dict[str, Any]) -> str:
    """One console line for an epoch."""
    layers = "/".join("-" if e is None else f"{e:.2f}" for e in record["layer_test_errors"][:-1])
    rate = record.get("train_samples_per_s")
    rate_text = f", {rate:.0f} samples/s" if rate else ""
    return (f"epoch {record['epoch']}: test error {record['test_error']:.2f}%"
            f" (local classifiers {layers or '-'}), train loss {record['train_loss']:.4f}{rate_text}")


def epoch_record(epoch: int, lr: float, train_stats: list[dict[str, float | None]], hits: list[int | None],
                 examples: int, rate: float | None, started: float) -> dict[str, Any]:
    """The metrics.jsonl line of an epoch; the output classifier is the last block."""
    errors = layer_errors(hits, examples)
    return {
        "epoch": epoch,
        "lr": lr,
        "test_error": errors[-1],
        "layer_test_errors": errors,
        "train_loss": train_stats[-1]["loss"],
        "train_error": train_stats[-1]["error"],
        "layer_train_losses": [s["loss"] for s in train_stats],
        "layer_train_errors": [s["error"] for s in train_stats],
        "train_samples_per_s": rate,
        "wall_s": time.perf_counter() - started,
    }


def test_record(epoch: int, step: int, interim: bool, hits: list[int | None], examples: int, wall_s: float,
                test_s: float) -> dict[str, Any]:
    """The tests.jsonl line of a test pass (interim: within an epoch, --eval-every's; else the epoch's own): wall_s
    since training began (in this run attempt), test_s of it spent testing (so far)."""
    errors = layer_errors(hits, examples)
    return {"epoch": epoch, "step": step, "interim": interim, "wall_s": round(wall_s, 4), "test_s": round(test_s, 4),
            "test_error": errors[-1], "layer_test_errors": errors}
