"""Injected faults and stops for the fault and resume tests, as one Hooks object parsed where a run starts.

PIPELINE_FAIL_AT=STAGE:BATCH[:MODE] (MODE raise, the default, hang or nan) makes that stage (0 in a
sequential run) fail at that training batch of every epoch: raise a RuntimeError, sleep as a stuck process
would (it says so on stderr first, so a test knows when the stage is stuck), or make the update of its first
block see a NaN loss (a block with a loss of its own: local heads or the output classifier; not a DFA or
backprop hidden block). PIPELINE_STOP_AT=EPOCH:BATCH acts as if a signal came just before that training batch.

The environment is read once, at a process's edge (Hooks.from_env: a stage process at its start, the sequential
trainer when it is given none); stages, the data stream and the trainer get the Hooks object and read nothing
else. A run whose stages are threads of one process (pipeline/run/in_process.py) is given its Hooks directly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from pipeline.errors import ConfigError

FAULT_ENV = "PIPELINE_FAIL_AT"
STOP_ENV = "PIPELINE_STOP_AT"
MODES = ("raise", "hang", "nan")


@dataclass(frozen=True)
class Hooks:
    """What a test injects into a run: a fault at one stage and batch, a stop before one position; none by default."""

    fail_stage: int | None = None
    fail_batch: int | None = None
    fail_mode: str = "raise"
    stop_at: tuple[int, int] | None = None  # (epoch, batch): as if a signal came just before that training batch
    # what ends an injected hang: a stage process sleeps for good, as a stuck one would (its neighbours must notice);
    # stages as threads are released when their run is aborted, so that no thread is left behind
    release: threading.Event | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.fail_mode not in MODES:
            raise ConfigError(f"{FAULT_ENV}: unknown mode '{self.fail_mode}', choose one of {', '.join(MODES)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Hooks:
        """The hooks PIPELINE_FAIL_AT and PIPELINE_STOP_AT ask for (a ConfigError for a malformed one)."""
        environ = os.environ if environ is None else environ
        fields: dict = {}
        try:
            if environ.get(FAULT_ENV):
                stage, batch, *mode = environ[FAULT_ENV].split(":")
                fields.update(fail_stage=int(stage), fail_batch=int(batch), fail_mode=mode[0] if mode else "raise")
            if environ.get(STOP_ENV):
                epoch, batch = environ[STOP_ENV].split(":")
                fields["stop_at"] = (int(epoch), int(batch))
        except ValueError:
            raise ConfigError(f"{FAULT_ENV} takes STAGE:BATCH[:MODE] and {STOP_ENV} EPOCH:BATCH, got "
                              f"{environ.get(FAULT_ENV)!r} and {environ.get(STOP_ENV)!r}") from None
        return cls(**fields)

    def stops_before(self, epoch: int, batch: int) -> bool:
        """Whether the run is to stop just before training batch `batch` of `epoch`, as if a signal came."""
        return self.stop_at == (epoch, batch)

    def fault(self, rank: int) -> InjectedFault:
        """Stage `rank`'s fault (none where another stage, or no stage, is to fail)."""
        mine = self.fail_stage == rank
        return InjectedFault(rank, self.fail_batch if mine else None, self.fail_mode, self.release)


class InjectedFault:
    """The fault stage `rank` is to suffer at training batch `batch` (its index within every epoch), if any."""

    def __init__(self, rank: int, batch: int | None = None, mode: str = "raise", release: threading.Event | None = None):
        self.rank, self.batch, self.mode, self.release = rank, batch, mode, release

    @contextlib.contextmanager
    def around(self, batch: int, blocks: list) -> Iterator[None]:
        """Wrap the training step of `batch` (its index within the epoch) on this stage's `blocks`."""
        if batch != self.batch:
            yield
            return
        if self.mode == "hang":
            print(f"stage {self.rank}: injected hang at batch {batch} ({FAULT_ENV})", file=sys.stderr, flush=True)
            if self.release is None:
                time.sleep(10 ** 6)  # a stuck stage: its neighbours must notice (--stall-timeout)
            else:
                self.release.wait()
                raise RuntimeError(f"released from the injected hang at batch {batch}: the run was aborted")
        if self.mode == "raise":
            raise RuntimeError(f"injected failure at batch {batch} ({FAULT_ENV})")
        block = blocks[0]
        real = block.update  # every update with a loss (local heads, the output classifier) goes through it
        block.update = lambda loss, labels, predictions: real(loss * float("nan"), labels, predictions)
        try:
            yield
        finally:
            del block.update
