"""Checkpoint writer: a stage's part of a checkpoint written and made durable on a thread of its own.

    compute thread:  settle ──► snapshot (a host copy of its state) ──► CHECKPOINT marker on ──► next batch
    writer thread:                   └──► stage-K.pt durable ──► stage-K.json (its manifest entry) durable
                                          last stage: every stage-*.json there ──► MANIFEST.json durable ──► prune

The compute thread stops only for the snapshot: a copy of the weights, optimizer and generator states to host
memory (for a GPU stage a device-to-host copy). Writing, fsyncing and hashing happen while it trains on; one write
is in flight per stage at a time, so at most one snapshot is held. The manifest is written only once every stage's
file and entry are durable (pipeline/persistence/checkpoint.py): a checkpoint is complete then, or never. Measured in
benchmarks/README.md ("Checkpoint stall").
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.persistence.checkpoint import finish_checkpoint, read_entries, save_stage_checkpoint, write_entry


def host_copy(value: Any) -> Any:
    """A copy of a state (nested dicts, lists and tensors) in host memory that later training cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


class CheckpointWriter:
    """Writes stage `rank`'s parts of checkpoints under `root` in the background; the last stage completes them.
    `patience_s`: how long the last stage waits for the other stages' entries (a stage that died leaves the
    checkpoint incomplete, and so unused)."""

    def __init__(self, root: str, rank: int, world: int, patience_s: float, token: str = ""):
        """`token`: the run attempt's, the same on every stage: entries left by another attempt or run (a crash
        in the middle of a checkpoint, a reused folder) are not taken for this checkpoint's."""
        self.root, self.rank, self.world, self.patience_s, self.token = root, rank, world, patience_s, token
        self.write_s: list[float] = []  # each write's seconds on the writer thread
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def submit(self, state: dict, size: Any, print_: dict) -> None:
        """Write `state` (a stage_state, already a host copy) with its placement size; returns at once."""
        self.wait()  # one write in flight: a second checkpoint waits for the first
        self._thread = threading.Thread(target=self._write, args=(state, size, print_), daemon=True,
                                        name=f"stage{self.rank}-checkpoint")
        self._thread.start()

    def _write(self, state: dict, size: Any, print_: dict) -> None:
        try:
            started = time.perf_counter()
            position = state["position"]
            entry = save_stage_checkpoint(self.root, state)
            entry.update(size=size, token=self.token, position=position)  # size: a resumed auto run keeps the placement
            write_entry(self.root, position, entry)
            if self.rank == self.world - 1:
                files = read_entries(self.root, position, self.world, self.patience_s, self.token)
                folder = finish_checkpoint(self.root, position, self.world, files, print_)
                tqdm.write(f"checkpoint {folder} (epoch {position['epoch']}, next batch {position['batch']})")
            self.write_s.append(time.perf_counter() - started)
        except BaseException as exc:  # carried to the compute thread at its next checkpoint or at the end
            self._failure = exc

    def wait(self) -> None:
        """Until the write in flight is done (and, on the last stage, its checkpoint complete); its failure, raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
