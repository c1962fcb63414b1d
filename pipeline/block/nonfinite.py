"""Non-finite guard: each update's device-side NaN/Inf flag, read for all blocks of a process in one transfer.

    watch = NonFiniteWatch(device=device).attach(blocks)
    for each batch:  watch.begin(epoch, batch)   # then the blocks' updates, each reporting its flag
    a late update of an earlier batch (asynchronous DFA):  with watch.at(epoch, batch): learn_from_error(...)
    before reading weights or statistics (epoch end, evaluation, checkpoint, end of run):  watch.check()
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch

if TYPE_CHECKING:
    from pipeline.block.blocks import Block

# [Note: deferred non-finite check]
# Why: `bool(torch.isfinite(loss))` after every block's loss is a host sync: on a GPU the CPU waits there until
# the GPU has caught up, once per block per step, so the CPU can never queue the next kernels ahead and CPU and GPU
# work one after the other instead of overlapped.
# How: an update computes `bad = ~isfinite(loss)` on the device and always runs backward and its optimizer step;
# the fused optimizers (make_optimizer) skip the step inside their kernel where `optimizer.found_inf` is 1 and roll
# their step counter back (torch/optim/adam.py `_fused_adam`: `_foreach_sub_(state_steps, found_inf)`; sgd.py
# `_fused_sgd`), the mechanism torch.amp.GradScaler drives them with. Epoch statistics add the update's loss and
# hits through torch.where(bad, 0, ...), so they too stay on the device. The flags are reported here and read all
# at once by check(): every `every` batches (a trainer calls begin() per batch) and before anything reads the
# weights or statistics. A bad flag then either raises NonFiniteLoss naming the first bad update, or, under
# --skip-nonfinite, counts it in `block.skipped` and takes its examples out of the block's statistics.
# Guaranteed: a bad update never reaches the weights or the optimizer state (bit for bit: as if it were not made;
# batch norm's running statistics are no update, its forward sets them, with or without this guard);
# the run stops within `every` batches of the first bad one, naming its epoch, batch and block exactly, and no
# checkpoint, evaluation or saved weight comes from a state after it. On the CPU a sync costs nothing, so there
# `every` is 1 by default and a run stops at the batch after the bad one, as it did when each update was checked.

DEFAULT_EVERY = {"cpu": 1, "cuda": 32}


class NonFiniteLoss(RuntimeError):
    """A block's loss (or the DFA error it got) is NaN or infinite."""


class _Flag(NamedTuple):
    epoch: int | None
    batch: int | None
    block: Block
    what: str
    bad: torch.Tensor  # 0-dim bool, on the block's device
    examples: int  # examples the update added to the block's epoch statistics


class NonFiniteWatch:
    """The pending non-finite flags of the blocks of one process, checked every `every` batches."""

    def __init__(self, every: int | None = None, device: str | torch.device = "cpu", where: str = ""):
        self.every = every if every is not None else DEFAULT_EVERY.get(torch.device(device).type, 32)
        if self.every < 1:
            raise ValueError(f"a non-finite watch checks every >= 1 batches, got {self.every}")
        self.where = where  # prefix of its messages, e.g. "stage 2, "
        self.epoch: int | None = None
        self.batch: int | None = None
        self._pending: list[_Flag] = []
        self._batches = 0  # batches begun since the last check

    def attach(self, blocks: list[Block]) -> NonFiniteWatch:
        """Make these blocks report to this watch."""
        for block in blocks:
            block.watch = self
        return self

    def begin(self, epoch: int, batch: int) -> None:
        """The updates that follow belong to this batch; every `every` batches the pending flags are checked first."""
        if self._batches >= self.every:
            self.check()
        self.epoch, self.batch = epoch, batch
        self._batches += 1

    @contextlib.contextmanager
    def at(self, epoch: int, batch: int) -> Iterator[None]:
        """Updates made inside belong to an earlier batch (a pipelined DFA update that arrived late)."""
        saved = self.epoch, self.batch
        self.epoch, self.batch = epoch, batch
        try:
            yield
        finally:
            self.epoch, self.batch = saved

    def report(self, block: Block, bad: torch.Tensor, examples: int, what: str = "loss") -> None:
        """Keep one update's flag (no sync) until the next check."""
        self._pending.append(_Flag(self.epoch, self.batch, block, what, bad, examples))

    def check(self) -> None:
        """Read every pending flag in one host transfer; count the bad ones (--skip-nonfinite) or raise on the first."""
        pending, self._pending, self._batches = self._pending, [], 0
        if not pending:
            return
        flags = torch.stack([flag.bad for flag in pending]).tolist()  # the one device-to-host copy
        for flag, bad in zip(pending, flags):
            if not bad:
                continue
            if not flag.block.skip_nonfinite:
                at = "" if flag.epoch is None else f"epoch {flag.epoch} batch {flag.batch}, "
                raise NonFiniteLoss(f"{self.where}{at}block {flag.block.index}: {flag.what} is not finite "
                                    "(use --skip-nonfinite to skip such updates)")
            flag.block.skipped += 1
            flag.block.stats.examples -= flag.examples  # its loss and hits were added as zeros
