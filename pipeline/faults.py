"""Injected faults for the fault tests: stage k raises, hangs or gets a non-finite loss at a chosen training batch.

PIPELINE_FAIL_AT=STAGE:BATCH[:MODE] (MODE raise, the default, hang or nan) makes that stage (0 in a
sequential run) fail at that training batch of every epoch: raise a RuntimeError, sleep as a stuck process
would (it says so on stderr first, so a test knows when the stage is stuck), or make the update of its first
block see a NaN loss (a block with a loss of its own: local heads or the output classifier; not a DFA or
backprop hidden block). Nothing happens without the variable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

FAULT_ENV = "PIPELINE_FAIL_AT"
MODES = ("raise", "hang", "nan")


class InjectedFault:
    """The fault a test asked stage `rank` to suffer, if any."""

    def __init__(self, rank: int):
        self.rank = rank
        self.batch: int | None = None
        self.mode = "raise"
        parts = os.environ.get(FAULT_ENV, "").split(":")
        if len(parts) >= 2 and int(parts[0]) == rank:
            self.batch, self.mode = int(parts[1]), parts[2] if len(parts) > 2 else "raise"
            if self.mode not in MODES:
                raise ValueError(f"{FAULT_ENV}: unknown mode '{self.mode}', choose one of {', '.join(MODES)}")

    @contextlib.contextmanager
    def around(self, batch: int, blocks: list) -> Iterator[None]:
        """Wrap the training step of `batch` (its index within the epoch) on this stage's `blocks`."""
        if batch != self.batch:
            yield
            return
        if self.mode == "hang":
            print(f"stage {self.rank}: injected hang at batch {batch} ({FAULT_ENV})", file=sys.stderr, flush=True)
            time.sleep(10 ** 6)  # a stuck stage: its neighbours must notice (--stall-timeout)
        if self.mode == "raise":
            raise RuntimeError(f"injected failure at batch {batch} ({FAULT_ENV})")
        block = blocks[0]
        real = block.update  # every update with a loss (local heads, the output classifier) goes through it
        block.update = lambda loss, labels, predictions: real(loss * float("nan"), labels, predictions)
        try:
            yield
        finally:
            del block.update
