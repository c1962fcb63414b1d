"""A stage's loop in one process: its input stream, when buffers go back, and backpressure between stages."""

import queue
import threading
import time

import pytest
import torch

from helpers import small_config
from pipeline.engine.partition import Placement
from pipeline.data import BatchSource
from pipeline.transport.message import Kind
from pipeline.model.factories import build_blocks
from pipeline.engine.stage import Stage, data_messages, release_after
from pipeline.transport.base import Channel, Links


class MemoryChannel(Channel):
    """Both ends of an in-process link that holds one message, like a zmq socket with a high-water mark of 1."""

    def __init__(self):
        self.queue = queue.Queue(maxsize=1)

    def send(self, msg):
        self.queue.put(msg)

    def recv(self):
        return self.queue.get()


def test_stage_zero_streams_epochs_of_train_then_eval_batches_then_end():
    cfg = small_config(run__epochs=2, data__synthetic_train_size=70, data__synthetic_test_size=40)
    stream = list(data_messages(BatchSource(cfg.data, 0), cfg))
    kinds = [(m.kind, m.epoch, m.index) for m in stream]
    expected = [(kind, epoch, i) for epoch in (1, 2) for kind, n in ((Kind.TRAIN, 3), (Kind.EVAL, 2)) for i in range(n)]
    assert kinds == expected + [(Kind.END, 0, 0)]
    assert stream[0].meta == {"batches": 3} and stream[4].meta == {"last": True, "step": 3, "interim": False}
    assert stream[3].meta == {}
    assert [len(m.tensors[1]) for m in stream[:5]] == [32, 32, 6, 32, 8]


def test_no_two_checkpoints_share_a_step(tmp_path):
    """Checkpoints are written in the background, so two at one step would share (and race for) its folder: the
    last batch's periodic one gives way to the end of the run's, a stop right after one (or right after the
    checkpoint a run resumed from) adds none."""
    import threading

    cfg = small_config(run__epochs=2, data__synthetic_train_size=128, data__synthetic_test_size=32,
                       run__checkpoint_dir=str(tmp_path), run__checkpoint_every=2)  # 4 batches an epoch: steps 2..8

    def positions(start=None, stop_before=None):
        stop, found = threading.Event(), []
        for m in data_messages(BatchSource(cfg.data, 0), cfg, start, stop):
            if m.kind == Kind.CHECKPOINT:
                found.append(m.meta["position"])
            if m.kind == Kind.TRAIN and (m.epoch, m.index + 1) == stop_before:
                stop.set()  # a signal: stop before the next batch
        return found

    assert [p["step"] for p in positions()] == [2, 4, 6, 8]  # 8: the end of the run's (3, 0), not (2, 4) too
    assert positions()[-1] == {"epoch": 3, "batch": 0, "step": 8}
    assert [p["step"] for p in positions(stop_before=(1, 2))] == [2]  # stopped right after step 2's
    resumed = {"epoch": 1, "batch": 2, "step": 2}
    assert positions(start=resumed, stop_before=None)[0]["step"] == 4
    stop = threading.Event()
    stop.set()  # stopped at once after resuming: the checkpoint it resumed from is that position's
    assert [m.kind for m in data_messages(BatchSource(cfg.data, 0), cfg, resumed, stop)] == [Kind.END]


def test_buffers_go_back_only_after_both_users_are_done():
    released = []
    countdown = release_after(2, lambda: released.append(True))
    countdown()
    assert released == []
    countdown()
    assert released == [True]


def _stages(cfg, slow_learning_s=0.0):
    link = MemoryChannel()
    spec_shape, classes = (1, 28, 28), 10
    first = build_blocks(cfg, spec_shape, classes, indices=[0, 1])
    second = build_blocks(cfg, spec_shape, classes, indices=[2])
    if slow_learning_s:
        for block in second:
            learn = block.learn
            block.learn = lambda h, y, learn=learn: (time.sleep(slow_learning_s), learn(h, y))
    cpu = torch.device("cpu")
    source = BatchSource(cfg.data, cfg.run.seed)
    placement = Placement((2, 1))
    s0 = Stage(cfg, 0, 2, first, placement, links=Links(outbox=link), source=source, device=cpu, host="test")
    s1 = Stage(cfg, 1, 2, second, placement, links=Links(inbox=link), source=None, device=cpu, host="test")
    return s0, s1


def _run_in_threads(*stages):
    results, errors = {}, []

    def body(stage):
        try:
            results[stage.rank] = stage.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(s,)) for s in stages]
    for t in threads:
        t.start()
    return threads, results, errors


@pytest.mark.timeout(60)
def test_a_fast_stage_is_held_back_by_a_slow_one():
    depth = 2
    cfg = small_config(pipeline__stages=2, pipeline__queue_depth=depth, data__synthetic_train_size=640, data__synthetic_test_size=32)
    s0, s1 = _stages(cfg, slow_learning_s=0.1)
    threads, results, errors = _run_in_threads(s0, s1)
    lead = 0
    while any(t.is_alive() for t in threads):
        lead = max(lead, s0.io.messages - s1.io.messages)
        time.sleep(0.001)
    assert not errors
    # ahead by at most: its own batch, its send queue (D) and send thread, the link, the next stage's feed thread
    # and input queue (D)
    assert depth <= lead <= 2 * depth + 4, lead
    report = s0.report()
    assert report["blocked_s"] > 0.5 * report["wall_s"], report  # the fast stage spent its time blocked, not running ahead
    summary = results[1]
    assert [s["stage"] for s in summary["stage_stats"]] == [0, 1]
    assert summary["stage_stats"][1]["busy_fraction"] > summary["stage_stats"][0]["busy_fraction"]


@pytest.mark.timeout(60)
def test_an_error_in_the_feed_thread_reaches_the_compute_thread():
    cfg = small_config(pipeline__stages=2)
    s0, s1 = _stages(cfg)

    class BrokenChannel(Channel):
        def send(self, msg):
            raise AssertionError("unused")

        def recv(self):
            raise ConnectionError("link to stage 0 lost")

    s1.inbox = s1.links.inbox = BrokenChannel()
    with pytest.raises(ConnectionError, match="link to stage 0 lost"):
        s1.run()


@pytest.mark.timeout(120)
def test_a_non_finite_loss_in_a_pipeline_stage_stops_the_run_naming_stage_batch_and_block(tmp_path):
    """In a 2-stage run the first stage's block 0 diverges at batch 1 (lr 1e30): the run exits 1 and says where."""
    import subprocess
    import sys

    small = ["--dataset", "synthetic", "--synthetic-train-size", "256", "--synthetic-test-size", "32", "--batch-size",
             "32", "--num-hidden", "16", "--no-progress", "--threads", "1"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *small, "--stages", "2", "--transport", "local",
                           "--optim", "sgd", "--lr", "1e30", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1, proc.stderr
    assert "error: stage 0, epoch 1 batch 1, block 0: loss is not finite" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "summary.json").exists()


# stage 1 hangs at batch 10 (stages as threads: the hang ends when the run is aborted, pipeline/run/faults.py)
STALLS = [
    # stage 1 takes no more batches: stage 0's queue fills up, then its compute thread cannot hand one on
    ("room to send", dict(pipeline__queue_depth=1), "stage 0 waited 3 s for stage 1 to take a batch (--stall-timeout)"),
    # stage 1 (the last) never sends batch 10's error back
    ("a DFA error", dict(loss="dfa", pipeline__dfa_sync=True),
     "stage 0 waited 3 s for the error of batch 10 from the last stage (--stall-timeout)"),
    # stage 1 runs block 1's heads and never sends batch 10's dL/dh back
    ("dL/dh", dict(pipeline__partition=(1.5, 1.5)),
     "stage 0 waited 3 s for dL/dh of block 1, batch 10, from stage 1 (--stall-timeout)"),
    # stage 1 runs block 1's layer (its heads first, on stage 0) and never sends batch 10's h back
    ("h", dict(pipeline__partition=("1.5h", 1.5)),
     "stage 0 waited 3 s for h of block 1, batch 10, from stage 1 (--stall-timeout)")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("waiting_for,options,message", STALLS, ids=[s[0] for s in STALLS])
def test_each_wait_of_a_stage_notices_a_stuck_neighbour(waiting_for, options, message):
    """The stall timeout on every wait a stage makes: for room to send, and for each kind of remote gradient.
    (Stuck stage processes over dist and zmq: tests/run/test_launch.py.)"""
    from pipeline.engine.stage import StallError
    from pipeline.run.faults import Hooks
    from pipeline.run.in_process import StageFailed, run_in_process

    cfg = small_config(stages=2, data__synthetic_train_size=2000, pipeline__stall_timeout=3.0, **options)
    started = time.monotonic()
    with pytest.raises(StageFailed) as failed:
        run_in_process(cfg, Hooks(fail_stage=1, fail_batch=10, fail_mode="hang"))
    rank, first = failed.value.failures[0]
    assert (rank, type(first)) == (0, StallError) and str(first).startswith(message), str(first)
    assert time.monotonic() - started < 12  # the hung stage was released, not waited for (3 s, then a 10 s grace)
