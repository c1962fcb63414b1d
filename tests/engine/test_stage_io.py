"""A stage's helper threads: a remote-gradient link receives only while some batch awaits a message from it."""

import queue
import threading
import time

import torch

from pipeline.engine.cuda_streams import NoStreams
from pipeline.transport.message import Kind, Message
from pipeline.block.nonfinite import NonFiniteWatch
from pipeline.engine.remote_gradient import RemoteGradients
from pipeline.engine.stage_io import StageIO
from pipeline.transport import Links


class _GradientLink:
    """A remote-gradient channel that records when its receives are posted (a posted NCCL receive is a spinning
    kernel) and delivers what the test sends."""

    def __init__(self):
        self.posted = 0
        self.pending: queue.Queue = queue.Queue()

    def recv(self):
        self.posted += 1
        return self.pending.get()


def _posted_after(link, settle=0.3):
    time.sleep(settle)  # time enough for the error feed thread to post a receive it should not
    return link.posted


def test_a_gradient_link_posts_a_receive_only_while_a_batch_awaits_its_gradient():
    link = _GradientLink()
    io = StageIO(0, Links(inbox=None, outbox=None, feedback_in=link), lambda: iter(()), queue_depth=2,
                 stall_timeout=10, streams=NoStreams())
    learned = []
    gradients = RemoteGradients(0, io, NonFiniteWatch(), lambda graph, item: learned.append(item.index),
                                what=lambda index: f"the gradient of batch {index}")
    io.start()
    assert _posted_after(link) == 0  # nothing forwarded yet: no receive
    for index in range(3):
        gradients.expect(1, index, None, lambda: None, index)  # batch forwarded: its gradient is awaited
        deadline = time.monotonic() + 5
        while link.posted < index + 1:
            assert time.monotonic() < deadline, "the awaited gradient's receive was never posted"
            time.sleep(0.01)
        link.pending.put(Message(Kind.FEEDBACK, 1, index, [torch.zeros(1)]))
        gradients.settle()  # applied: nothing awaits any more
        assert _posted_after(link) == index + 1, "a receive was posted with no batch awaiting it"
    assert learned == [0, 1, 2]
    io.want_error()  # the stage reached its END: the peer's END is awaited, one more receive
    threading.Thread(target=gradients.await_stream_end, daemon=True).start()
    deadline = time.monotonic() + 5
    while link.posted < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    link.pending.put(Message(Kind.END))
