"""Stage 0's input stream: each epoch's training batches, then its test batches, then END, with control markers.

    data source ──► TRAIN x N ── [EVAL x M] ── [ALIGN] ── [CHECKPOINT] ── EVAL x M ── [CHECKPOINT] ──► … ──► END
"""

from __future__ import annotations

import itertools
import threading
from typing import Iterator

from pipeline.config import Config
from pipeline.data import BatchSource
from pipeline.run.faults import Hooks
from pipeline.transport.message import Kind, Message


def data_messages(source: BatchSource, cfg: Config, start: dict | None = None,
                  stop: threading.Event | None = None, hooks: Hooks = Hooks()) -> Iterator[Message]:
    """Stage 0's input stream: each epoch's training batches, then its test batches, then END.

    Also: a test pass every --eval-every steps within an epoch (its last message's meta says "interim"); an ALIGN
    message (held-out batches) every --log-alignment steps and at each epoch's end; a CHECKPOINT marker every
    --checkpoint-every batches or epochs and at the end; and, once `stop` is set, a last CHECKPOINT and END at the
    next batch boundary (or where `hooks` stop the run, as if a signal came). A resumed run starts at `start` (a
    checkpoint position).
    """
    run = cfg.run
    align_every = run.log_alignment
    heldout = [t for b in itertools.islice(source.eval_batches(), run.alignment_batches) for t in (b.x, b.y)] if align_every else []
    every = run.checkpoint_every
    # the step of the last checkpoint (a resumed run's is the one it resumed from): a stop right after it needs none
    checkpointed: list[int] = [start["step"]] if start else []
    start = start or {"epoch": 1, "batch": 0, "step": 0}
    step = start["step"]

    def test_pass(epoch: int, interim: bool) -> Iterator[Message]:
        last = source.num_eval_batches - 1
        for batch in source.eval_batches():
            meta = {"last": True, "step": step, "interim": interim} if batch.index == last else {}
            yield Message(Kind.EVAL, epoch, batch.index, [batch.x, batch.y], meta)

    def checkpoint(epoch: int, batch: int, stopping: bool = False) -> Message:
        checkpointed[:] = [step]
        return Message(Kind.CHECKPOINT, meta={"position": {"epoch": epoch, "batch": batch, "step": step}, "stop": stopping})

    for epoch in range(start["epoch"], run.epochs + 1):
        batches = source.num_train_batches
        for batch in source.train_batches(epoch, start["batch"] if epoch == start["epoch"] else 0):
            if stop is not None and hooks.stops_before(epoch, batch.index):
                stop.set()
            if stop is not None and stop.is_set():
                if run.checkpoint_dir and checkpointed != [step]:
                    yield checkpoint(epoch, batch.index, stopping=True)
                yield Message(Kind.END, meta={"stopped_at": {"epoch": epoch, "batch": batch.index, "step": step}})
                return
            meta = {"batches": batches} if batch.index == 0 else {}
            yield Message(Kind.TRAIN, epoch, batch.index, [batch.x, batch.y], meta)
            step += 1
            if run.eval_every and step % run.eval_every == 0 and batch.index + 1 != batches:  # the epoch's own comes next
                yield from test_pass(epoch, interim=True)
            if align_every and step % align_every == 0:
                yield Message(Kind.ALIGN, epoch, step, list(heldout), {"epoch_end": False})
            # not after the run's last batch: the end of the run's checkpoint comes at the same step, and two
            # checkpoints must never share a step's folder (their writes overlap: pipeline/persistence/checkpoint_writer.py)
            final = epoch == run.epochs and batch.index + 1 == batches
            if run.checkpoint_dir and every and run.checkpoint_unit == "batch" and step % every == 0 and not final:
                yield checkpoint(epoch, batch.index + 1)
        if align_every:
            yield Message(Kind.ALIGN, epoch, step, list(heldout), {"epoch_end": True})
        yield from test_pass(epoch, interim=False)
        due = every and run.checkpoint_unit == "epoch" and epoch % every == 0
        if run.checkpoint_dir and (due or epoch == run.epochs):
            yield checkpoint(epoch + 1, 0)
    yield Message(Kind.END)
