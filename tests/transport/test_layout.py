"""[Note: memory format on the wire]: a tensor arrives with the strides it was sent with, over every transport."""

import queue
import tempfile

import pytest
import torch
import torch.distributed as dist

from helpers import init_gloo, run_ranks
from pipeline.transport.message import Kind, Message, ProtocolError, decode_header, encode_header, from_wire, memory_order, to_wire
from pipeline.transport.dist import open_dist
from pipeline.transport.local import QueueChannel
from pipeline.transport.zmq import ZmqReceiver, ZmqSender


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 5, 6, generator=g).contiguous(memory_format=torch.channels_last),  # a conv's output
            torch.randn(4, 5, 6, 3, generator=g).permute(0, 3, 1, 2),  # a user's permuted view: dense, not row-major
            torch.randn(4, 6, generator=g)[:, ::2],  # not dense: it goes row-major
            torch.arange(4)]


KEEPS_STRIDES = [True, True, False, False]  # the dense ones; the others arrive row-major


def _assert_arrived_as_sent(got):
    for sent, came, keeps in zip(_tensors(), got, KEEPS_STRIDES, strict=True):
        assert torch.equal(sent, came)
        if keeps:
            assert came.stride() == sent.stride(), (sent.stride(), came.stride())
        else:
            assert came.is_contiguous()


def test_a_dense_tensor_goes_in_its_memory_order_and_comes_back_with_its_strides():
    x = _tensors()[0]
    assert memory_order(x) == (0, 2, 3, 1)
    frame = to_wire(x)
    assert frame.is_contiguous() and frame.data_ptr() == x.data_ptr()  # a view: no copy on the way out
    back = from_wire(frame.clone(), memory_order(x))
    assert back.stride() == x.stride() and torch.equal(back, x)
    assert memory_order(torch.randn(2, 3)) is None and memory_order(_tensors()[2]) is None


def test_the_header_carries_the_order_and_refuses_a_bad_one():
    header = decode_header(encode_header(Message(Kind.TRAIN, tensors=_tensors())))
    assert [spec.order for spec in header.specs] == [(0, 2, 3, 1), (0, 2, 3, 1), None, None]
    assert header.specs[0].wire_shape == (4, 5, 6, 3)
    import msgpack

    for order in ([0, 0], [0, "a"], [True, False], [0.0, 1.0]):  # a malformed order is dropped, never a crash
        bad = msgpack.packb({"v": 1, "kind": 1, "epoch": 0, "index": 0, "tensors": [["float32", [2, 3], order]],
                             "meta": {}})
        with pytest.raises(ProtocolError, match="not a permutation"):
            decode_header(bad)


def test_local_transport_keeps_the_layout():
    channel = QueueChannel(queue.Queue(), torch.device("cpu"))
    channel.send(Message(Kind.TRAIN, tensors=_tensors()))
    _assert_arrived_as_sent(channel.recv().tensors)


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_zmq_keeps_the_layout(kind):
    bind = f"ipc://{tempfile.mkdtemp(prefix='localpipe-test-')}/inbox" if kind == "ipc" else "tcp://127.0.0.1"
    receiver = ZmqReceiver(bind, torch.device("cpu"), high_water_mark=8, max_tensor_bytes=1 << 20)
    sender = ZmqSender(receiver.address, high_water_mark=8)
    try:
        sender.send(Message(Kind.TRAIN, tensors=_tensors()))
        _assert_arrived_as_sent(receiver.recv().tensors)
    finally:
        sender.close()
        receiver.close()


def _over_gloo(rank, world, port, results):
    init_gloo(rank, world, port)
    links = open_dist(rank, world, torch.device("cpu"), "gloo")
    if rank == 0:
        links.outbox.send(Message(Kind.TRAIN, tensors=_tensors()))
        results.put((rank, None))
    else:
        results.put((rank, [(t.clone(memory_format=torch.preserve_format), t.stride()) for t in links.inbox.recv().tensors]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_dist_keeps_the_layout():
    _, got = run_ranks(_over_gloo, 2)
    assert [stride for _, stride in got][:2] == [t.stride() for t in _tensors()][:2]
    _assert_arrived_as_sent([t for t, _ in got])
