"""Sequential trainer: the one-process reference that every pipeline mode must reproduce exactly.

data source -> block 0 -> block 1 -> ... -> output classifier, one batch at a time, in one process.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.observe.alignment import AlignmentLog
from pipeline.block.blocks import Block, evaluate_blocks, learning_rate
from pipeline.persistence.checkpoint import (fingerprint, finish_checkpoint, load_stage_checkpoint, restore_stage, save_stage_checkpoint,
                                 save_weights, stage_state, verify_checkpoint)
from pipeline.config import Config, default_threads
from pipeline.data import BatchSource
from pipeline.run.determinism import use_deterministic
from pipeline.run.resources import check_machine
from pipeline.engine.dfa_stage import DfaOutput
from pipeline.run.faults import Hooks
from pipeline.run.interrupt import StopRequest
from pipeline.observe.memory import MemoryMeter
from pipeline.observe.metrics import MetricsWriter, Throughput, describe_epoch, epoch_record, test_record
from pipeline.model.factories import build_blocks, resolve
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.partition import Placement
from pipeline.observe.progress import progress_bar
from pipeline.engine.roles import Step, WholeBlocks, take_actions
from pipeline.engine.schedule import stage_schedule


class SequentialTrainer:
    """Trains all blocks in one process: per batch each block does forward, local loss, update, then detaches."""

    def __init__(self, cfg: Config, source: BatchSource | None = None, hooks: Hooks | None = None):
        """`hooks`: the faults and stop a test injects (default: what the environment asks for, pipeline/run/faults.py)."""
        self.cfg = cfg
        check_machine(cfg)  # what the config asks of this machine (pipeline/run/resources.py)
        use_deterministic(cfg.run.deterministic)  # before anything touches the GPU (see pipeline/run/determinism.py)
        self.device = torch.device(cfg.run.device)
        torch.set_num_threads(cfg.run.threads or default_threads(1))
        self.source = source or BatchSource(cfg.data, cfg.run.seed, self.device)
        resolved = resolve(cfg, self.source.input_shape, self.source.num_classes)  # one factory call, one dry run
        self.network = resolved[2].fingerprint
        self.blocks: list[Block] = build_blocks(cfg, self.source.input_shape, self.source.num_classes, device=self.device,
                                                resolved=resolved)
        self.watch = NonFiniteWatch(device=self.device).attach(self.blocks)  # read before weights or stats are
        self.memory = MemoryMeter().attach(self.blocks)
        self.throughput = Throughput(cfg.run.warmup_batches)
        self.position = {"epoch": 1, "batch": 0, "step": 0}  # what comes next (see pipeline/persistence/checkpoint.py)
        if cfg.run.resume:
            folder, manifest = verify_checkpoint(cfg.run.checkpoint_dir, cfg, self.network)
            restore_stage(self.blocks, load_stage_checkpoint(folder, 0))
            self.position = dict(manifest["position"])
        self.steps = self.position["step"]
        self.writer: MetricsWriter | None = None  # run()'s
        self.started = time.perf_counter()  # when run() began
        self.test_s = 0.0  # seconds spent in test passes (tests.jsonl)
        self.hooks = Hooks.from_env() if hooks is None else hooks  # a test's faults and stop (pipeline/run/faults.py)
        self.fault = self.hooks.fault(0)
        dfa = cfg.loss.loss == "dfa"
        self.schedule = (stage_schedule(Placement((len(self.blocks),)), 0, dfa=dfa)
                         if cfg.loss.local or dfa else [])  # K = 1: every block trained whole, in order
        self.roles = {"dfa_output": DfaOutput(self.blocks, None)} if dfa else {"blocks": WholeBlocks(self.blocks)}
        self.alignment: AlignmentLog | None = None
        if cfg.run.log_alignment:
            heldout = [(b.x, b.y) for b in itertools.islice(self.source.eval_batches(), cfg.run.alignment_batches)]
            self.alignment = AlignmentLog(heldout, cfg.loss.loss, cfg.run.out)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.schedule:  # local rules and DFA: one stage's schedule (pipeline/engine/schedule.py), taken as a stage takes it
            take_actions(self.schedule, self.roles, Step(None, x, y), send=None)
            return
        # backprop / fa: one loss at the output, its error sent back through every block (through the forward
        # weights, or fixed random ones)
        *hidden, output = self.blocks
        for block in hidden:
            _, x = block.forward_train(x)
        logits, _ = output.forward_train(x)
        bad = output.learn(logits, y)
        for block in hidden:
            block.step(bad)  # skipped with the output's update when its loss is not finite

    def checkpoint(self) -> None:
        """Save a resumable checkpoint at the current position (if the run has a checkpoint folder)."""
        root = self.cfg.run.checkpoint_dir
        self.watch.check()
        if root:
            print_ = fingerprint(self.cfg, self.network)
            entry = save_stage_checkpoint(root, stage_state(self.blocks, 0, 1, self.position, print_))
            finish_checkpoint(root, self.position, 1, [entry], print_)

    def train_epoch(self, epoch: int, start: int = 0, stop: StopRequest | None = None) -> bool:
        """Train on an epoch's batches from `start`; False when a stop request ended it early (after a checkpoint)."""
        for block in self.blocks:
            block.set_learning_rate(learning_rate(block.optim_config, epoch))
            if start == 0:
                block.stats.reset()
        self.throughput.start_epoch()
        bar = progress_bar(self.source.num_train_batches, start, f"epoch {epoch}", self.cfg.run.progress)
        every = self.cfg.run.checkpoint_every if self.cfg.run.checkpoint_unit == "batch" else None
        try:
            for batch in self.source.train_batches(epoch, start):
                self.watch.begin(epoch, batch.index)  # checks the flags of the batches before, every N batches
                with self.fault.around(batch.index, self.blocks), self.memory.saving():
                    self.train_batch(batch.x, batch.y)
                self.throughput.batch_done(len(batch.y))
                self.steps += 1
                self.position = {"epoch": epoch, "batch": batch.index + 1, "step": self.steps}
                eval_every = self.cfg.run.eval_every
                if eval_every and self.steps % eval_every == 0 and batch.index + 1 != self.source.num_train_batches:
                    self.watch.check()
                    self.test(epoch, interim=True)  # the epoch's own test comes after its last batch
                if self.alignment and self.steps % self.cfg.run.log_alignment == 0:
                    self.watch.check()
                    self.alignment.measure(self.blocks, self.steps, epoch)
                if stop and self.hooks.stops_before(epoch, batch.index + 1):  # as if a signal came during this batch
                    stop.event.set()
                if (every and self.steps % every == 0) or (stop and stop.requested):
                    self.checkpoint()
                if stop and stop.requested:
                    return False
                bar.update()
        finally:
            bar.close()
        self.watch.check()  # the epoch's statistics and weights are read next
        return True

    def evaluate(self) -> tuple[list[int | None], int]:
        """Classifier hits of every block on the test split, and the number of test examples."""
        totals: list[torch.Tensor | None] = [None] * len(self.blocks)
        examples = 0
        for batch in self.source.eval_batches():
            _, hits = evaluate_blocks(self.blocks, batch.x, batch.y)
            totals = [h if t is None else t + h for t, h in zip(totals, hits)]
            examples += len(batch.y)
        return [None if t is None else int(t) for t in totals], examples

    def test(self, epoch: int, interim: bool) -> tuple[list[int | None], int]:
        """evaluate(), timed, and its line in tests.jsonl."""
        began = time.perf_counter()
        hits, examples = self.evaluate()
        now = time.perf_counter()
        self.test_s += now - began
        if interim:
            self.throughput.exclude(now - began)
        if self.writer is not None:
            self.writer.test(test_record(epoch, self.steps, interim, hits, examples, now - self.started, self.test_s))
        return hits, examples

    def run(self, stop: StopRequest | None = None) -> dict[str, Any]:
        """Train for cfg.run.epochs, evaluating after each; write metrics and weights; return the summary.
        With `stop`, a signal ends the run at the next batch boundary, after a checkpoint."""
        resumed = self.position["epoch"] if self.cfg.run.resume else None
        writer = MetricsWriter(self.cfg.run.out, resumed_epoch=resumed, tensorboard=self.cfg.run.tensorboard,
                               resumed_step=self.steps)
        self.writer, self.started, self.test_s = writer, time.perf_counter(), 0.0
        started = self.started
        record: dict[str, Any] = {}
        stopped = None
        every_epochs = self.cfg.run.checkpoint_every if self.cfg.run.checkpoint_unit == "epoch" else None
        first = self.position["epoch"]
        for epoch in range(first, self.cfg.run.epochs + 1):
            if not self.train_epoch(epoch, self.position["batch"] if epoch == first else 0, stop):
                stopped = dict(self.position)
                break
            rate = self.throughput.epoch_rate()
            if self.alignment:
                self.alignment.measure(self.blocks, self.steps, epoch, epoch_end=True)
            hits, examples = self.test(epoch, interim=False)
            stats = [block.stats.summary() for block in self.blocks]
            record = epoch_record(epoch, learning_rate(self.cfg.optim, epoch), stats, hits, examples, rate, started)
            writer.epoch(record)
            tqdm.write(describe_epoch(record))
            self.position = {"epoch": epoch + 1, "batch": 0, "step": self.steps}
            if (every_epochs and epoch % every_epochs == 0) or epoch == self.cfg.run.epochs:
                self.checkpoint()
        summary = {
            "mode": "sequential",
            "stopped_at": stopped,
            "skipped_updates": {b.index: b.skipped for b in self.blocks if b.skipped},
            "stages": 1,
            "transport": None,
            "test_error": record.get("test_error"),
            "layer_test_errors": record.get("layer_test_errors"),
            "train_samples_per_s": self.throughput.rate(),
            "wall_s": time.perf_counter() - started,
            "epochs": self.cfg.run.epochs,
            "memory": self.memory.report(self.device),
            "config": self.cfg.to_dict(),
        }
        self.watch.check()
        if self.cfg.run.out:
            save_weights(self.cfg.run.out, self.blocks, stage=0)
        writer.summary(summary)
        if stopped:
            tqdm.write(f"stopped at epoch {stopped['epoch']} batch {stopped['batch']}"
                       + ("; continue with --resume" if self.cfg.run.checkpoint_dir else ""))
        return summary
