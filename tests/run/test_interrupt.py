"""Interrupts: the first SIGINT/SIGTERM stops at a batch boundary; a repeat within 2 s is the same interrupt; a
later one aborts a run that cannot reach a boundary, keeping the checkpoints already written."""

import json
import signal
import sys
import time

import pytest

from helpers import OutputWatch, ProcessGroup
from pipeline.run import launcher as local
from pipeline.run.interrupt import ABORT_AFTER_S

RUN = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "32",
       "--batch-size", "32", "--synthetic-train-size", "2000", "--epochs", "1", "--threads", "1", "--no-progress"]


@pytest.mark.timeout(120)
def test_a_second_signal_aborts_a_run_stuck_in_a_batch_and_keeps_its_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = RUN + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "5"]
    with ProcessGroup(args, env={"PIPELINE_FAIL_AT": "0:12:hang"}) as proc:  # batch 12 never ends
        output = OutputWatch(proc)
        output.wait_for("injected hang at batch 12", timeout=60)
        proc.send_signal(signal.SIGINT)
        first = time.monotonic()
        output.wait_for("SIGINT: stopping at the next batch boundary", timeout=10)
        proc.send_signal(signal.SIGINT)  # within the window: the same interrupt (a terminal's and the launcher's)
        time.sleep(ABORT_AFTER_S + 0.3 - (time.monotonic() - first))
        assert proc.poll() is None, "the repeat within the window aborted the run"
        proc.send_signal(signal.SIGINT)
        aborted = time.monotonic()
        _, stderr = output.finish(timeout=20)
        elapsed = time.monotonic() - aborted
    assert proc.returncode == 130 and stderr.rstrip().endswith("interrupted"), stderr[-2000:]
    assert elapsed < 5, elapsed
    # batches 0..11 were trained: the checkpoints of steps 5 and 10 are complete and kept
    positions = [json.loads(m.read_text())["position"] for m in sorted(ckpt.glob("step-*/MANIFEST.json"))]
    assert positions == [{"epoch": 1, "batch": 5, "step": 5}, {"epoch": 1, "batch": 10, "step": 10}]


class _Stage:
    """A stage process as the launcher's signal handler sees it."""

    def __init__(self, pid, alive=True):
        self.pid, self.alive = pid, alive

    def is_alive(self):
        return self.alive


def test_the_launcher_passes_the_first_signal_on_and_aborts_on_a_later_one(monkeypatch):
    sent, clock = [], [100.0]
    monkeypatch.setattr(local.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    monkeypatch.setattr(local.time, "monotonic", lambda: clock[0])
    forward = local._forwarder([_Stage(11), _Stage(12, alive=False), _Stage(13)])

    def handle(signum, frame):  # an unexpected abort fails this test instead of stopping the whole pytest session
        try:
            forward(signum, frame)
        except KeyboardInterrupt:
            raise AssertionError("aborted") from None

    handle(signal.SIGINT, None)
    assert sent == [(11, signal.SIGINT), (13, signal.SIGINT)]  # to every living stage, once
    clock[0] += ABORT_AFTER_S - 0.1
    handle(signal.SIGINT, None)  # the same interrupt arriving twice: nothing more
    assert len(sent) == 2
    clock[0] += 0.2
    with pytest.raises(KeyboardInterrupt):
        forward(signal.SIGTERM, None)
    assert len(sent) == 2
