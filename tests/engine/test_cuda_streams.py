"""The GPU stream design, checked on CPU: which thread waits on which stream, and where the CPU blocks.

A recording stand-in for CUDA streams (same interface as pipeline/engine/cuda_streams.py) and a stand-in for
torch.distributed whose Work.wait() notes the stream current in the calling thread: with NCCL that stream is
what a wait holds up. The real DistChannel, StageIO and Stage run on top of them.
"""

import itertools
import queue
import threading
from collections import defaultdict

import pytest
import torch

from helpers import small_config
from pipeline.engine.partition import Placement
from pipeline.engine.cuda_streams import NoStreams
from pipeline.data import BatchSource
from pipeline.model.factories import build_blocks
from pipeline.engine.stage import Stage
from pipeline.transport import dist as dist_transport
from pipeline.transport.base import Links


class RecordingStreams(NoStreams):
    """Streams as names, current per thread; records hand-offs and host waits."""

    enabled = True
    _names = itertools.count()

    def __init__(self):
        self.local = threading.local()
        self.accepted, self.made = [], []

    def current(self):
        return getattr(self.local, "stream", "default")

    def new_stream(self):
        name = f"stream{next(self._names)}"
        self.made.append((threading.current_thread().name, name))
        return name

    def using(self, stream):
        streams = self

        class Scope:
            def __enter__(self):
                self.before = streams.current()
                if stream is not None:  # as torch.cuda.stream(None): no change
                    streams.local.stream = stream

            def __exit__(self, *exc):
                streams.local.stream = self.before

        return Scope()

    def record(self):
        return ("event", self.current())

    def accept(self, tensors, ready):
        self.accepted.append((threading.current_thread().name, self.current(), ready))



class FakeWork:
    def __init__(self, fake, action):
        self.fake, self.action = fake, action

    def wait(self):
        self.fake.waits.append((threading.current_thread().name, self.fake.streams_of_thread()))
        self.action()


class FakeDist:
    """Point-to-point over in-memory queues; a group is a tuple ending in its two ranks."""

    def __init__(self):
        self.boxes = defaultdict(queue.Queue)
        self.waits = []
        self.streams_of_thread = lambda: "default"  # set by _run: the stream current in the calling thread

    def isend(self, tensor, dst, group):
        self.boxes[(group, dst)].put(tensor.clone())
        return FakeWork(self, lambda: None)  # returns at once, as NCCL's does for the CPU

    def irecv(self, tensor, src, group):
        low, high = group[-2:]
        dst = high if src == low else low
        return FakeWork(self, lambda: tensor.copy_(self.boxes[(group, dst)].get(timeout=30)))

    def recv(self, tensor, src, group):
        self.irecv(tensor, src, group).wait()


def _two_stages(monkeypatch, cfg):
    fake = FakeDist()
    monkeypatch.setattr(dist_transport, "dist", fake)
    fake.device_syncs = []  # torch.cuda.synchronize() blocks the CPU on every stream of the device
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: fake.device_syncs.append(threading.current_thread().name))
    cpu = torch.device("cpu")
    link, errors = (0, 1), ("errors", 0, 1)
    stage_links = [Links(outbox=dist_transport.DistChannel(1, link, cpu, cpu)),
                   Links(inbox=dist_transport.DistChannel(0, link, cpu, cpu))]
    if cfg.loss.loss == "dfa":
        stage_links[0].feedback_in = dist_transport.DistChannel(1, errors, cpu, cpu)
        stage_links[1].feedback_out = [dist_transport.DistChannel(0, errors, cpu, cpu)]
    streams = [RecordingStreams(), RecordingStreams()]
    blocks = [build_blocks(cfg, (1, 28, 28), 10, indices=[0, 1]), build_blocks(cfg, (1, 28, 28), 10, indices=[2])]
    source = BatchSource(cfg.data, cfg.run.seed)
    stages = [Stage(cfg, k, 2, blocks[k], Placement((2, 1)), links=stage_links[k], source=source if k == 0 else None, device=cpu,
                    host="test", streams=streams[k]) for k in range(2)]
    return fake, stages, streams


def _run(stages, fake, streams):
    errors = []

    def body(stage):
        try:
            stage.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(s,), name=f"compute{s.rank}") for s in stages]

    def current_for_thread():  # the stream current in the calling thread, from its own stage's recorder
        name = threading.current_thread().name
        owner = streams[0] if name.startswith(("stage0", "compute0")) else streams[1]
        return owner.current()

    fake.streams_of_thread = current_for_thread
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the stages did not finish"
    assert not errors, errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss", ["predsim", "dfa"])
def test_communication_waits_hold_only_the_helper_threads_streams(monkeypatch, loss):
    cfg = small_config(loss=loss, model__nonlin="tanh" if loss == "dfa" else "leakyrelu", pipeline__stages=2,
                       data__synthetic_train_size=96, data__synthetic_test_size=32,
                       **({"pipeline__dfa_sync": True} if loss == "dfa" else {}))
    fake, stages, streams = _two_stages(monkeypatch, cfg)
    _run(stages, fake, streams)
    assert fake.waits, "no communication happened"
    helper_streams = set()
    for rank, recorder in enumerate(streams):
        made = dict(recorder.made)  # thread name -> the stream it made
        assert f"compute{rank}" in made, "the compute thread has no stream of its own"
        assert len(set(made.values())) == len(made), made  # every thread of the stage has a stream of its own
        helper_streams |= {stream for thread, stream in made.items() if not thread.startswith("compute")}
    for thread, stream in fake.waits:
        # a Work.wait() runs on a helper thread, on that thread's own stream (never a compute or the default one)
        assert not thread.startswith("compute") and stream in helper_streams, (thread, stream)
    for rank, recorder in enumerate(streams):
        compute = dict(recorder.made)[f"compute{rank}"]
        taken = [(stream, ready) for thread, stream, ready in recorder.accepted if thread == f"compute{rank}"]
        assert taken, "the compute thread took no message"
        # every message the compute thread takes comes with an event from the helper stream that made it
        assert all(stream == compute and ready is not None and ready[1] not in (compute, "default") for stream, ready in taken), taken


@pytest.mark.timeout(120)
def test_no_device_wide_synchronize_in_a_stage_run(monkeypatch):
    """A stage synchronises the whole device once, at start-up (the blocks were built on the default stream)."""
    cfg = small_config(pipeline__stages=2, data__synthetic_train_size=96, data__synthetic_test_size=32)
    fake, stages, streams = _two_stages(monkeypatch, cfg)
    _run(stages, fake, streams)
    assert sorted(fake.device_syncs) == ["compute0", "compute1"]


class _ClockEvent:
    """A CUDA event on a fake stream that runs as the host does: record() reads the host clock."""

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self, stream=None):
        import time

        self.at = time.perf_counter()

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1e3 * (other.at - self.at)


def test_gpu_compute_time_leaves_out_the_waits_for_a_peer(monkeypatch):
    """On a GPU, compute time is measured between events on the compute stream; a wait for dL/dh (or for room
    downstream) inside the span must end it, or the stream's idle time counts as compute (issue: split stages'
    busy_fraction overstated). The wait runs under io.pause, as in Stage._train."""
    import time

    from pipeline.engine.cuda_streams import ComputeTimer

    monkeypatch.setattr(torch.cuda, "Event", _ClockEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    timer = ComputeTimer(torch.device("cuda", 0))
    timer.start()
    time.sleep(0.05)  # compute
    with timer.paused():
        time.sleep(0.3)  # waiting for a peer
    time.sleep(0.05)
    timer.stop()
    with timer.paused():  # outside a span: nothing to leave out
        time.sleep(0.01)
    assert 0.09 <= timer.total() < 0.25
