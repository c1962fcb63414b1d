"""torch.distributed transport between two gloo processes: shapes from the header, long headers, buffer reuse."""

import pytest
import torch
import torch.distributed as dist

from helpers import init_gloo, run_ranks
from pipeline.transport.message import Kind, Message
from pipeline.transport.base import dfa_gradient_links
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


def test_every_link_group_gets_the_stall_timeout(monkeypatch):
    """NCCL's watchdog aborts an operation pending longer than its group's timeout: the link groups must be made
    with the run's --stall-timeout, not torch's default."""
    import datetime

    from pipeline.transport import dist as dist_transport

    made = []
    monkeypatch.setattr(dist_transport.dist, "new_group", lambda ranks, **kw: made.append((ranks, kw)) or tuple(ranks))
    timeout = datetime.timedelta(seconds=123)
    forward, errors = dist_transport.link_groups(4, "nccl", dfa_gradient_links(4), timeout=timeout)
    assert [ranks for ranks, _ in made] == [[0, 1], [1, 2], [2, 3], [0, 3], [1, 3], [2, 3]]
    assert all(kw == {"backend": "nccl", "timeout": timeout} for _, kw in made)


class _Group:
    """A fake process group: its ranks, and an identity of its own (two groups of the same ranks are two groups)."""

    def __init__(self, ranks):
        self.ranks = list(ranks)


def test_split_heads_get_a_gradient_group_from_each_heads_stage_to_its_layer_stage(monkeypatch):
    from pipeline.engine.partition import Placement
    from pipeline.transport import dist as dist_transport

    made = []
    monkeypatch.setattr(dist_transport.dist, "new_group", lambda ranks, **kw: made.append(_Group(ranks)) or made[-1])

    def distinct(forward, errors):  # every link its own group: none shared with the forward pipe or another link
        groups = [*forward, *errors]
        return all(a is not b for i, a in enumerate(groups) for b in groups[i + 1:])

    gradients = Placement((1.5, 1, 1.5)).gradient_links()
    assert gradients == [(1, 0), (2, 1)]
    forward, errors = dist_transport.link_groups(3, "gloo", gradients)
    assert [g.ranks for g in made] == [[0, 1], [1, 2], [0, 1], [1, 2]]
    assert [g.ranks for g in errors] == [[0, 1], [1, 2]] and distinct(forward, errors)
    made.clear()  # heads first: h back to the heads' stage and dL/dh on to the layer's, each link its own group
    gradients = Placement.parse((1, "1.5h", 1.5)).gradient_links()
    assert gradients == [(2, 1), (1, 2)]
    forward, errors = dist_transport.link_groups(3, "gloo", gradients)
    assert [g.ranks for g in made] == [[0, 1], [1, 2], [1, 2], [1, 2]]
    assert [g.ranks for g in errors] == [[1, 2], [1, 2]] and distinct(forward, errors)


def _warm_up_order(rank, world, port, results):
    """Three ranks, forward and error links: the main-thread warm-up must meet on every link without deadlock."""
    init_gloo(rank, world, port)
    from pipeline.transport import dist as dist_transport

    forward, errors = dist_transport.link_groups(world, "gloo", dfa_gradient_links(world))
    calls = []
    send, recv = dist_transport.dist.send, dist_transport.dist.recv
    dist_transport.dist.send = lambda t, peer, group: (calls.append(("send", peer)), send(t, peer, group=group))
    dist_transport.dist.recv = lambda t, peer, group: (calls.append(("recv", peer)), recv(t, peer, group=group))
    try:
        dist_transport.warm_up(rank, world, forward, errors, torch.device("cpu"), dfa_gradient_links(world))
    finally:
        dist_transport.dist.send, dist_transport.dist.recv = send, recv
    results.put((rank, calls))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_warm_up_touches_every_link_of_a_rank_once_from_the_main_thread():
    calls = run_ranks(_warm_up_order, 3)
    # links in global order: (0,1), (1,2), then error links (0,2), (1,2); the lower rank sends first
    assert calls[0] == [("send", 1), ("recv", 1), ("send", 2), ("recv", 2)]
    assert calls[1] == [("recv", 0), ("send", 0), ("send", 2), ("recv", 2), ("send", 2), ("recv", 2)]
    assert calls[2] == [("recv", 1), ("send", 1), ("recv", 0), ("send", 0), ("recv", 1), ("send", 1)]


def test_a_gradient_channel_leaves_no_receive_posted_after_a_message(monkeypatch):
    """[Note: no receive left posted on a gradient link]: a forward link posts the next header's receive as soon as
    a message is in; a remote-gradient link (open_dist's feedback_in) posts nothing until it is asked to receive."""
    from pipeline.transport.message import encode_header
    from pipeline.transport import dist as dist_transport

    payload = encode_header(Message(Kind.FEEDBACK, 1, 0, [torch.zeros(2)]))
    frame = len(payload).to_bytes(4, "little") + payload
    posted = []

    class _Work:
        def wait(self):
            pass

    def irecv(t, peer, group):
        posted.append(peer)
        t[:len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
        return _Work()

    monkeypatch.setattr(dist_transport.dist, "irecv", irecv)
    monkeypatch.setattr(dist_transport.dist, "recv", lambda t, peer, group: t.zero_())
    monkeypatch.setattr(dist_transport, "link_groups", lambda world, backend, gradients, timeout: (["forward"], ["errors"]))
    monkeypatch.setattr(dist_transport, "warm_up", lambda *args: None)
    links = open_dist(1, 2, torch.device("cpu"), "gloo", gradients=[(0, 1)])
    for channel, posts in ((links.inbox, 2), (links.feedback_in, 1)):
        posted.clear()
        assert channel.recv().kind == Kind.FEEDBACK
        assert len(posted) == posts  # the message's own receive, and the forward link's next one
