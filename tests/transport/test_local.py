"""In-host queue transport: the queue gets copies of its own; a middle stage never shares what it received."""

import queue

import torch

from pipeline.transport.message import Kind, Message
from pipeline.transport.local import QueueChannel


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_a_middle_stage_forwards_copies_never_the_storage_it_received_or_computes_with():
    """Pickling a tensor for a torch.multiprocessing queue changes its storage in place while the stage may still
    read it, and torch refuses to share a CUDA tensor received from another process again: every tensor put on a
    queue is a copy in shared memory that nothing else uses."""
    cpu = torch.device("cpu")
    into_middle, out_of_middle = queue.Queue(), queue.Queue()
    x, y = torch.randn(4, 3), torch.arange(4)
    QueueChannel(into_middle, cpu).send(Message(Kind.TRAIN, 1, 0, [x, y]))
    received = QueueChannel(into_middle, cpu).recv()
    assert torch.equal(received.tensors[0], x) and torch.equal(received.tensors[1], y)
    assert {_storage(t) for t in received.tensors}.isdisjoint({_storage(x), _storage(y)})
    assert all(t.is_shared() for t in received.tensors)
    out = received.tensors[0] * 2
    QueueChannel(out_of_middle, cpu).send(Message(Kind.TRAIN, 1, 0, [out, received.tensors[1]]))
    _, forwarded = out_of_middle.get_nowait()
    used_by_the_stage = {_storage(out), *(_storage(t) for t in received.tensors)}
    assert {_storage(t) for t in forwarded}.isdisjoint(used_by_the_stage)
