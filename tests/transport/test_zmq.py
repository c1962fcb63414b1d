"""zmq transport in one process: round trips over ipc and tcp, malformed messages rejected, buffers reused."""

import os
import tempfile

import msgpack
import pytest

from helpers import malformed_messages
import torch
import zmq

from pipeline.transport.message import Kind, Message
from pipeline.transport.zmq import ZmqReceiver, ZmqSender


@pytest.fixture(params=["ipc", "tcp"])
def link(request):
    bind = f"ipc://{tempfile.mkdtemp(prefix='localpipe-test-')}/inbox" if request.param == "ipc" else "tcp://127.0.0.1"
    receiver = ZmqReceiver(bind, torch.device("cpu"), high_water_mark=8, max_tensor_bytes=1 << 20)
    sender = ZmqSender(receiver.address, high_water_mark=8)
    yield sender, receiver
    sender.close()
    receiver.close()


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, generator=g), torch.randint(0, 10, (n,), generator=g)]


def test_round_trip_preserves_tensors_and_header(link):
    sender, receiver = link
    sent = Message(Kind.TRAIN, 3, 5, _batch(8) + [torch.ones(2, 3, dtype=torch.bfloat16)], {"batches": 9})
    sender.send(sent)
    got = receiver.recv()
    assert (got.kind, got.epoch, got.index, got.meta) == (Kind.TRAIN, 3, 5, {"batches": 9})
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(sent.tensors, got.tensors))
    assert all(t.data_ptr() % 64 == 0 for t in got.tensors)  # [Note: aligned receive]


def test_receive_buffers_are_reused_once_released(link):
    sender, receiver = link
    for index in range(20):
        sender.send(Message(Kind.TRAIN, 1, index, _batch(8, index)))
        got = receiver.recv()
        assert torch.equal(got.tensors[0], _batch(8, index)[0])
        got.release()
    sender.send(Message(Kind.TRAIN, 1, 20, _batch(3)))  # a smaller last batch: new shapes, new buffers
    receiver.recv().release()
    assert receiver.pool.allocated == 4


def test_a_large_activation_arrives_intact(link):
    sender, receiver = link
    big = torch.randn(64, 1024)  # 256 KB: sent zero-copy by pyzmq
    sender.send(Message(Kind.EVAL, 1, 0, [big, torch.arange(64)]))
    assert torch.equal(receiver.recv().tensors[0], big)


def _raw_push(address):
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(address)
    return push


def test_malformed_messages_are_rejected_and_the_stream_goes_on(link, capsys):
    sender, receiver = link
    push = _raw_push(receiver.address)
    good = _batch(4)
    good_frames = [msgpack.packb({"v": 1, "kind": 1, "epoch": 1, "index": 7, "meta": {},
                                  "tensors": [["float32", [4, 16]], ["int64", [4]]]})] + [t.numpy().tobytes() for t in good]
    allocated = []
    for _ in range(2):
        for frames in malformed_messages().values():
            push.send_multipart(frames)
        push.send_multipart(good_frames)
        got = receiver.recv()
        assert got.index == 7 and torch.equal(got.tensors[0], good[0])
        got.release()
        allocated.append(receiver.pool.allocated)
    assert receiver.rejected == 2 * len(malformed_messages())
    assert capsys.readouterr().err.count("rejected message") == 10  # the first ten are logged one by one
    assert allocated[0] == allocated[1]  # rejected messages give their buffers back: memory stays bounded
    push.close()


def test_curve_lets_only_key_holders_in(tmp_path):
    from pipeline.transport.zmq import CurveKeys

    CurveKeys.create(str(tmp_path / "keys"))
    CurveKeys.create(str(tmp_path / "other"))
    keys, other = CurveKeys(str(tmp_path / "keys")), CurveKeys(str(tmp_path / "other"))
    receiver = ZmqReceiver("tcp://127.0.0.1", torch.device("cpu"), keys=keys)
    receiver.socket.rcvtimeo = 1500
    intruders = [ZmqSender(receiver.address), ZmqSender(receiver.address, keys=other)]  # no key; a foreign key
    for intruder in intruders:
        intruder.socket.setsockopt(zmq.LINGER, 0)
        try:
            intruder.socket.send(b"not allowed", zmq.NOBLOCK)
        except zmq.Again:
            pass
    with pytest.raises(zmq.Again):
        receiver.recv()
    member = ZmqSender(receiver.address, keys=keys)
    member.send(Message(Kind.TRAIN, 1, 5, _batch(4)))
    assert receiver.recv().index == 5
    for sender in intruders + [member]:
        sender.close()
    receiver.close()
