"""Training progress on the console: tqdm's bar on a terminal, one plain line per tenth of an epoch in a log file.

Under torchrun, SLURM or nohup stderr is a file, and a bar's carriage-return redraws pile up there (about 13 KB
per MNIST epoch); a log gets at most ten short lines per epoch instead (or one a minute when the length is unknown).
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm


class LineProgress:
    """A progress report for logs: one line each time another `step` of the epoch is done, never a carriage return."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", file: IO[str] | None = None,
                 step: float = 0.1, every_s: float = 60.0):
        self.total, self.n, self.desc = total, initial, desc
        self.file = file if file is not None else sys.stderr
        self.every_s = every_s
        self._chunk = max(1, round(total * step)) if total else None  # batches per line
        self._started = self._last_line = time.perf_counter()
        self._initial = initial

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.perf_counter()
        if self._chunk is not None:
            due = self.n // self._chunk > before // self._chunk or self.n == self.total
        else:
            due = now - self._last_line >= self.every_s
        if due:
            self._last_line = now
            self._write(now)

    def _write(self, now: float) -> None:
        done = self.n - self._initial
        rate = done / (now - self._started) if now > self._started else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} batches{share}, {rate:.1f} batches/s", file=self.file, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm | LineProgress:
    """A tqdm bar when stderr is a terminal, a LineProgress when it is a file or pipe; a silent bar if not `enabled`."""
    if enabled and not _is_terminal(sys.stderr):
        return LineProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, disable=not enabled, dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
