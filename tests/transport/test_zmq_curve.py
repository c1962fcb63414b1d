"""zmq CURVE: only holders of an authorized client key get in, the bytes on the wire are encrypted, and a real run
with keys from `python -m pipeline keys` trains exactly as one without."""

import socket
import sys
import threading

import pytest
import torch
import zmq

from helpers import run_group
from pipeline.persistence.checkpoint import load_weights
from pipeline.transport.message import Kind, Message
from pipeline.transport.zmq import CurveKeys, ZmqReceiver, ZmqSender


@pytest.fixture
def keys(tmp_path):
    CurveKeys.create(str(tmp_path / "keys"))
    CurveKeys.create(str(tmp_path / "other"))
    return CurveKeys(str(tmp_path / "keys")), CurveKeys(str(tmp_path / "other"))


def test_a_sender_with_the_server_key_but_an_unauthorized_client_key_is_refused(keys):
    keys, other = keys
    receiver = ZmqReceiver("tcp://127.0.0.1", torch.device("cpu"), keys=keys)
    receiver.socket.rcvtimeo = 1500
    other.server_public = keys.server_public  # it knows the server: only the authorization check can stop it
    intruder = ZmqSender(receiver.address, keys=other)
    intruder.socket.setsockopt(zmq.LINGER, 0)
    intruder.socket.sndtimeo = 1500
    try:  # a well-formed message: were it let in, the receiver would deliver it
        intruder.send(Message(Kind.TRAIN, 1, 9, [torch.ones(2, 2), torch.arange(2)]))
    except zmq.Again:
        pass  # refused in the handshake: nowhere to send to
    with pytest.raises(zmq.Again):
        receiver.recv()
    member = ZmqSender(receiver.address, keys=keys)
    member.send(Message(Kind.TRAIN, 1, 5, [torch.ones(2, 2), torch.arange(2)]))
    assert receiver.recv().index == 5
    for sender in (intruder, member):
        sender.close()
    receiver.close()


class _Relay:
    """A plain TCP relay between a sender and a receiver that records every byte the sender sends."""

    def __init__(self, target: str):
        host, port = target[len("tcp://"):].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()
        self._pipe(client, server, True)

    def _pipe(self, src, dst, record):
        while data := src.recv(65536):
            if record:
                self.captured += data
            dst.sendall(data)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain (the relay sees the tensor)"])
def test_curve_traffic_does_not_carry_the_tensor_bytes_in_clear(keys, curve):
    keys, _ = keys
    receiver = ZmqReceiver("tcp://127.0.0.1", torch.device("cpu"), keys=keys if curve else None)
    relay = _Relay(receiver.address)
    sender = ZmqSender(relay.address, keys=keys if curve else None)
    secret = torch.randn(64, 64, generator=torch.Generator().manual_seed(7))
    sender.send(Message(Kind.TRAIN, 1, 3, [secret, torch.arange(64)]))
    got = receiver.recv()
    assert got.index == 3 and torch.equal(got.tensors[0], secret)
    plaintext = secret.numpy().tobytes()
    assert len(relay.captured) > len(plaintext)
    assert (plaintext[:256] in relay.captured) == (not curve)  # any 256 bytes of the tensor would give it away
    assert (plaintext[-256:] in relay.captured) == (not curve)
    sender.close()
    receiver.close()


RUN = [sys.executable, "-m", "pipeline", "train", "--dataset", "synthetic", "--num-layers", "2", "--num-hidden", "64",
       "--batch-size", "32", "--synthetic-train-size", "640", "--synthetic-test-size", "64", "--threads", "1",
       "--no-progress", "--seed", "3", "--stages", "2", "--transport", "zmq"]


@pytest.mark.timeout(240)
def test_a_two_stage_run_with_curve_keys_is_bit_identical_to_one_without(tmp_path):
    made = run_group([sys.executable, "-m", "pipeline", "keys", str(tmp_path / "keys")], timeout=60)
    assert made.returncode == 0, made.stderr
    plain = run_group(RUN + ["--out", str(tmp_path / "plain")], timeout=150)
    assert plain.returncode == 0, plain.stderr
    curve = run_group(RUN + ["--zmq-curve-keys", str(tmp_path / "keys"), "--out", str(tmp_path / "curve")], timeout=150)
    assert curve.returncode == 0, curve.stderr
    a, b = load_weights(str(tmp_path / "plain")), load_weights(str(tmp_path / "curve"))
    assert sorted(a) == sorted(b) == [0, 1, 2] and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
