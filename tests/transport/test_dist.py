"""torch.distributed transport between two gloo processes: shapes from the header, long headers, buffer reuse."""

import pytest
import torch
import torch.distributed as dist

from helpers import init_gloo, run_ranks
from pipeline.message import Kind, Message
from pipeline.transport.dist import open_dist

SHAPES = [(4, 3)] * 6 + [(2, 3)]  # a smaller last batch
LONG_META = {"stages": [{"name": "x" * 64, "value": i} for i in range(40)]}  # > one header frame


def _exchange(rank, world, port, results):
    init_gloo(rank, world, port)
    links = open_dist(rank, world, torch.device("cpu"), "gloo")
    inbox, outbox = links.inbox, links.outbox
    if rank == 0:
        for index, shape in enumerate(SHAPES):
            outbox.send(Message(Kind.TRAIN, 1, index, [torch.full(shape, float(index)), torch.arange(shape[0])]))
        outbox.send(Message(Kind.END, meta=LONG_META))
        results.put((rank, None))
    else:
        received = []
        while True:
            msg = inbox.recv()
            received.append((msg.kind, msg.index, [t.clone() for t in msg.tensors], msg.meta))
            msg.release()
            if msg.kind == Kind.END:
                break
        results.put((rank, (received, inbox.pool.allocated)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_messages_arrive_in_order_with_their_shapes_and_long_headers():
    _, (received, allocated) = run_ranks(_exchange, 2)
    *batches, end = received
    assert [index for _, index, _, _ in batches] == list(range(len(SHAPES)))
    for (kind, index, (x, y), _), shape in zip(batches, SHAPES):
        assert kind == Kind.TRAIN and torch.equal(x, torch.full(shape, float(index))) and torch.equal(y, torch.arange(shape[0]))
    assert end[0] == Kind.END and end[3] == LONG_META
    assert allocated == 4  # one buffer per shape (activation and labels, full and last batch): reused, not reallocated
