"""Interrupts: the first SIGINT/SIGTERM/SIGUSR1 asks the run to checkpoint at a common batch and stop; a later one aborts.

SIGUSR1 is what a batch system sends ahead of a preemption or the end of a job's time (SLURM's --signal=USR1@120).
A run stopped this way exits with EXIT_STOPPED (75, pipeline/run/restarts.py), and the same command continues it
when it has --auto-resume (launch/slurm.sbatch requeues the job on that code).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
ABORT_AFTER_S = 2.0  # a repeat within this window is the same interrupt arriving twice (terminal + launcher)


class StopRequest:
    """Set by a signal; read by the data source (stage 0) or the sequential trainer at each batch boundary."""

    def __init__(self, announce: bool = True) -> None:
        self.event = threading.Event()
        self.announce = announce
        self._first: float | None = None

    def install(self) -> StopRequest:
        """Handle STOP_SIGNALS in this (main) thread from now on."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = now
            self.event.set()
            if self.announce:
                print(f"{signal.Signals(signum).name}: stopping at the next batch boundary (checkpoint first, if any); "
                      f"send it again to abort", file=sys.stderr, flush=True)
        elif now - self._first > ABORT_AFTER_S:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.event.is_set()

