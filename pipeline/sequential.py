"""Sequential trainer: the one-process reference that every pipeline mode must reproduce exactly.

data source -> block 0 -> block 1 -> ... -> output classifier, one batch at a time, in one process.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.alignment import AlignmentLog
from pipeline.blocks import Block, NonFiniteLoss, evaluate_blocks, forward_for_feedback, learn_from_error, learning_rate, train_blocks
from pipeline.checkpoint import save_weights
from pipeline.config import Config, default_threads
from pipeline.data import BatchSource
from pipeline.feedback import output_error
from pipeline.metrics import MetricsWriter, Throughput, describe_epoch, epoch_record
from pipeline.models import build_blocks


class SequentialTrainer:
    """Trains all blocks in one process: per batch each block does forward, local loss, update, then detaches."""

    def __init__(self, cfg: Config, source: BatchSource | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.run.device)
        torch.set_num_threads(cfg.run.threads or default_threads(1))
        self.source = source or BatchSource(cfg.data, cfg.run.seed, self.device)
        self.blocks: list[Block] = build_blocks(cfg, self.source.input_shape, self.source.num_classes, device=self.device)
        self.throughput = Throughput()
        self.steps = 0
        self.alignment: AlignmentLog | None = None
        if cfg.run.log_alignment:
            heldout = [(b.x, b.y) for b in itertools.islice(self.source.eval_batches(), cfg.run.alignment_batches)]
            self.alignment = AlignmentLog(heldout, cfg.loss.loss, cfg.run.out)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rule = self.cfg.loss.loss
        if self.cfg.loss.local:
            train_blocks(self.blocks, x, y)
            return
        # backprop / fa: one loss at the output, its error sent back through every block (through the forward
        # weights, or fixed random ones); dfa: the output error goes straight to every block instead.
        *hidden, output = self.blocks
        if rule == "dfa":
            states, x = forward_for_feedback(hidden, x)
            logits, _ = output.forward_train(x)
            output.learn(logits, y)
            learn_from_error(hidden, states, output_error(logits, y))
            return
        for block in hidden:
            _, x = block.forward_train(x)
        logits, _ = output.forward_train(x)
        output.learn(logits, y)
        for block in hidden:
            block.step()

    def train_epoch(self, epoch: int) -> None:
        lr = learning_rate(self.cfg.optim, epoch)
        for block in self.blocks:
            block.set_learning_rate(lr)
            block.stats.reset()
        self.throughput.start_epoch()
        bar = tqdm(total=self.source.num_train_batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                   disable=not self.cfg.run.progress, dynamic_ncols=True)
        for batch in self.source.train_batches(epoch):
            try:
                self.train_batch(batch.x, batch.y)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"epoch {epoch} batch {batch.index}, {exc}") from None
            self.throughput.batch_done(len(batch.y))
            self.steps += 1
            if self.alignment and self.steps % self.cfg.run.log_alignment == 0:
                self.alignment.measure(self.blocks, self.steps, epoch)
            bar.update()
        bar.close()

    def evaluate(self) -> tuple[list[int | None], int]:
        """Classifier hits of every block on the test split, and the number of test examples."""
        totals: list[torch.Tensor | None] = [None] * len(self.blocks)
        examples = 0
        for batch in self.source.eval_batches():
            _, hits = evaluate_blocks(self.blocks, batch.x, batch.y)
            totals = [h if t is None else t + h for t, h in zip(totals, hits)]
            examples += len(batch.y)
        return [None if t is None else int(t) for t in totals], examples

    def run(self) -> dict[str, Any]:
        """Train for cfg.run.epochs, evaluating after each; write metrics and weights; return the summary."""
        writer = MetricsWriter(self.cfg.run.out)
        started = time.perf_counter()
        record: dict[str, Any] = {}
        for epoch in range(1, self.cfg.run.epochs + 1):
            self.train_epoch(epoch)
            if self.alignment:
                self.alignment.measure(self.blocks, self.steps, epoch, epoch_end=True)
            rate = self.throughput.epoch_rate()
            hits, examples = self.evaluate()
            stats = [block.stats.summary() for block in self.blocks]
            record = epoch_record(epoch, learning_rate(self.cfg.optim, epoch), stats, hits, examples, rate, started)
            writer.epoch(record)
            tqdm.write(describe_epoch(record))
        summary = {
            "mode": "sequential",
            "skipped_updates": {b.index: b.skipped for b in self.blocks if b.skipped},
            "stages": 1,
            "transport": None,
            "test_error": record["test_error"],
            "layer_test_errors": record["layer_test_errors"],
            "train_samples_per_s": self.throughput.rate(),
            "wall_s": time.perf_counter() - started,
            "epochs": self.cfg.run.epochs,
            "config": self.cfg.to_dict(),
        }
        if self.cfg.run.out:
            save_weights(self.cfg.run.out, self.blocks, stage=0)
        writer.summary(summary)
        return summary
