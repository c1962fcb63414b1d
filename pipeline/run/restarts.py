"""Restarts: a run that resumes by itself after a fault or a preemption, and the record of what it trained again.

    attempt 0 ──► a stage dies ──► (launcher) restart ──► attempt 1 resumes from the newest complete checkpoint
                                                          (none yet: from the start, and it says so)

The attempt number comes from TORCHELASTIC_RESTART_COUNT, which torchrun's elastic agent sets in every worker of
a worker group it (re)starts, 0 the first time; the local launcher (pipeline/run/launcher.py) sets it the same way. Every
stage counts the training steps it has finished in its own small file beside the checkpoints (a write of 8 bytes
per batch into the page cache, which outlives a killed process), so a restarted run can tell how many batches each
stage trains a second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import sys

from pipeline.persistence.checkpoint import latest_checkpoint
from pipeline.config import Config, ConfigError

EXIT_STOPPED = 75  # sysexits.h's EX_TEMPFAIL: stopped early by a signal, checkpointed; the same command continues
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
PROGRESS = "progress"  # checkpoint_dir/progress/stage-K: steps that stage finished; restarts.jsonl: the history


def attempt() -> int:
    """Which start of this run's processes this is: 0, then 1 after the first restart, and so on."""
    try:
        return max(0, int(os.environ.get(RESTART_ENV, "0")))
    except ValueError:
        return 0


def resolve_resume(cfg: Config, number: int, say: bool = True) -> Config:
    """With --auto-resume, or on a restart: resume when checkpoint_dir holds a complete checkpoint, else start from
    the beginning and say so on stderr. Every process of a torchrun group decides alike: they all read the same
    folder before any of them can train (the process group forms first)."""
    if cfg.run.resume or not (cfg.run.auto_resume or number > 0):
        return cfg
    why = f"restart {number}" if number else "--auto-resume"
    try:
        folder, manifest = latest_checkpoint(cfg.run.checkpoint_dir) if cfg.run.checkpoint_dir else (None, None)
    except ConfigError:
        folder = None
    if folder is None:
        where = f"under {cfg.run.checkpoint_dir}" if cfg.run.checkpoint_dir else "(no --checkpoint-dir)"
        if say:
            print(f"{why}: no complete checkpoint {where}: training from the start", file=sys.stderr, flush=True)
        return cfg
    p = manifest["position"]
    if say:
        print(f"{why}: resuming from {folder} (epoch {p['epoch']}, batch {p['batch']})", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))


def _progress_folder(cfg: Config) -> str | None:
    return os.path.join(cfg.run.checkpoint_dir, PROGRESS) if cfg.run.checkpoint_dir else None


class ProgressFile:
    """The number of training steps a stage has finished, in checkpoint_dir/progress/stage-K (nothing without a
    checkpoint folder). One pwrite of 8 bytes per batch: no fsync, the page cache keeps it past a kill -9."""

    def __init__(self, cfg: Config, rank: int, start_step: int = 0):
        folder = _progress_folder(cfg)
        self.fd = None
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            self.fd = os.open(os.path.join(folder, f"stage-{rank}"), os.O_WRONLY | os.O_CREAT, 0o644)
            self.finished(start_step)  # never an earlier attempt's (or run's) count

    def finished(self, steps: int) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, struct.pack("<q", steps), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _steps_reached(folder: str, world: int) -> list[int | None]:
    reached = []
    for rank in range(world):
        try:
            with open(os.path.join(folder, f"stage-{rank}"), "rb") as f:
                reached.append(struct.unpack("<q", f.read(8))[0])
        except (OSError, struct.error):
            reached.append(None)
    return reached


def mark_stopped(cfg: Config, position: dict) -> None:
    """The last stage of a run stopped by a signal leaves a note: torchrun takes the stages' EXIT_STOPPED for a
    failure and restarts them (when the signal reached the workers, not its agent), and the restart must stop too."""
    folder = _progress_folder(cfg)
    if folder is not None:
        with open(os.path.join(folder, "stopped.json"), "w") as f:
            json.dump(position, f)


def stopped_before(cfg: Config, number: int) -> dict | None:
    """On a restart: where a signal stopped the attempt before it, if one did (then this one must not train on)."""
    folder = _progress_folder(cfg)
    if number == 0 or folder is None:
        return None
    try:
        with open(os.path.join(folder, "stopped.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record_start(cfg: Config, number: int) -> None:
    """Called once per start of the run (by the local launcher, or by rank 0 under torchrun) before any stage
    trains: a restart appends what the attempt before it reached, and how much of it is trained again, to
    checkpoint_dir/progress/restarts.jsonl; a fresh start (no resume) clears that history."""
    folder = _progress_folder(cfg)
    if folder is None:
        return
    os.makedirs(folder, exist_ok=True)
    history = os.path.join(folder, "restarts.jsonl")
    if number == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "stopped.json"))
        if not cfg.run.resume:
            open(history, "w").close()
        return
    position = latest_checkpoint(cfg.run.checkpoint_dir)[1]["position"] if cfg.run.resume else None
    resumed_step = position["step"] if position else 0
    reached = _steps_reached(folder, cfg.pipeline.stages)
    entry = {"attempt": number, "resumed_from": position, "steps_reached": reached,
             "batches_trained_again": [None if r is None else max(0, r - resumed_step) for r in reached]}
    with open(history, "a") as f:
        f.write(json.dumps(entry) + "\n")


def restart_history(cfg: Config) -> dict:
    """summary.json's "restarts": how many, and each one's checkpoint and batches trained again per stage."""
    folder = _progress_folder(cfg)
    path = os.path.join(folder, "restarts.jsonl") if folder else None
    entries = []
    if path and os.path.exists(path):
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    return {"count": len(entries) if folder else attempt(), "history": entries}
