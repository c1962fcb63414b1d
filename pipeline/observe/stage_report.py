"""What a stage reports: its timings and facts (stage_stats), and, on the last stage, the run's summary.json."""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engine.partition import as_sizes
from pipeline.run.restarts import restart_history

if TYPE_CHECKING:
    from pipeline.engine.stage import Stage


def stage_size(blocks: list, rank: int) -> int | float | str:
    """How many blocks a stage holds, as --partition writes it: the half of a split block counts as a half, marked h
    where it is the block's heads and its layer runs on the next stage."""
    size = as_sizes([sum(2 if b.part == "whole" else 1 for b in blocks)])[0]
    heads_first = any(b.part == "heads" and b.partner == rank + 1 for b in blocks)
    return f"{size:g}h" if heads_first else size


def stage_report(stage: Stage) -> dict[str, Any]:
    """Where a stage's wall time went, how full its input queue was, and what it ran."""
    wall = time.perf_counter() - stage.started
    io, compute = stage.io, stage.timer.total()
    inbox = stage.links.inbox
    return {
        "stage": stage.rank,
        "blocks": [b.index for b in stage.blocks],
        "host": stage.host,
        "device": str(stage.device),
        "pid": os.getpid(),
        "wall_s": wall,
        "compute_s": compute,
        "wait_s": io.wait_s,
        "blocked_s": io.blocked_s,
        "send_s": io.send_s,
        "busy_fraction": compute / wall if wall > 0 else 0.0,
        "mean_queue_depth": io.depth_sum / max(1, io.messages),
        "max_queue_depth": io.depth_max,
        "messages": io.messages,
        "sent_messages": io.sent_messages,
        "bytes_per_message": io.sent_bytes / io.sent_messages if io.sent_messages else None,
        "inbox": getattr(inbox, "address", None),  # zmq: the ipc:// or tcp:// address this stage received on
        "receive_buffers": getattr(getattr(inbox, "pool", None), "allocated", None),
        "receive_buffer_bytes": getattr(getattr(inbox, "pool", None), "allocated_bytes", None),
        "rejected_messages": getattr(inbox, "rejected", None),
        "size": stage_size(stage.blocks, stage.rank),
        "parts": {str(b.index): b.part for b in stage.blocks if b.part != "whole"},
        "dfa_delay_mean": None, "dfa_delay_max": None, "heads_delay_mean": None, "heads_delay_max": None,
        **{key: value for role in stage.roles.values() for key, value in role.report().items()},  # the delays seen
        "error_wait_s": io.error_wait_s,
        "checkpoint_s": [round(s, 4) for s in stage.checkpoint_s],  # each checkpoint's stall of the compute thread
        "checkpoint_write_s": [round(s, 4) for s in stage.checkpoints.write_s],  # and its write, on the writer thread
        # keyed by the block index as a string, as in summary.json: the report travels on in END's msgpack
        # header, whose maps take string keys only (pipeline/transport/message.py)
        "skipped_updates": {str(b.index): b.skipped for b in stage.blocks if b.skipped},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(stage.device) / 2**20 if stage.device.type == "cuda" else None,
        "memory": stage.memory.report(stage.device),  # what the process holds, by kind (pipeline/observe/memory.py)
        **stage.notes,
    }


def run_summary(stage: Stage, stages: list[dict[str, Any]], stopped: dict | None) -> dict[str, Any]:
    """The last stage's summary of the run, every stage's report in it."""
    return {
        "mode": "pipeline",
        "stopped_at": stopped,
        "restarts": restart_history(stage.cfg),
        "stages": stage.world,
        "transport": stage.cfg.pipeline.transport,
        "partition": [s["size"] for s in stages],
        "test_error": stage.record.get("test_error"),
        "layer_test_errors": stage.record.get("layer_test_errors"),
        "train_samples_per_s": stage.throughput.rate(),
        "wall_s": time.perf_counter() - stage.started,
        "epochs": stage.cfg.run.epochs,
        "busy_fraction": [s["busy_fraction"] for s in stages],
        # the stage that needs most: the per-device peak a pipeline must fit
        "memory": max((dict(s["memory"], stage=s["stage"]) for s in stages), key=lambda m: m["accounted_peak_bytes"]),
        "stage_stats": stages,
        "config": stage.cfg.to_dict(),
    }
