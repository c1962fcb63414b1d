"""ZeroMQ transport: PUSH/PULL sockets, a msgpack header frame then one zero-copy raw frame per tensor.

The receiving stage binds (ipc:// when both stages share a host, tcp:// otherwise) and the addresses are
exchanged over the run's control process group. Every received header is checked before its frames are
read; a malformed or foreign message is logged and dropped, never unpickled (nothing is).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import tempfile

import torch
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pipeline.errors import AgreedError
from pipeline.run.control import exchange_strings, host_name
from pipeline.transport.message import (MAX_HEADER_BYTES, MAX_TENSOR_BYTES, Message, ProtocolError, TensorSpec, decode_header,
                              encode_header)
from pipeline.transport.base import (BufferPool, Channel, Links, gradient_source, host_buffer, received, to_device,
                                     to_host)

CLOSE_LINGER_MS = 10_000  # an END still queued in the sender is delivered, or given up after this
LOGGED_REJECTIONS = 10  # malformed messages logged one by one; after that every thousandth


def _as_frame(host: torch.Tensor) -> memoryview:
    flat = host.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # shares memory: zmq sends it without a copy


class CurveKeys:
    """ZeroMQ CURVE keys from a folder made by `python -m pipeline keys DIR`: receivers accept only senders whose
    public key is in DIR/authorized, and traffic is encrypted."""

    def __init__(self, folder: str):
        self.folder = folder
        self.server_public, self.server_secret = zmq.auth.load_certificate(os.path.join(folder, "server.key_secret"))
        self.client_public, self.client_secret = zmq.auth.load_certificate(os.path.join(folder, "client.key_secret"))
        self.authorized = os.path.join(folder, "authorized")

    @staticmethod
    def create(folder: str) -> None:
        """Make a server and a client key pair, and authorize the client."""
        os.makedirs(os.path.join(folder, "authorized"), exist_ok=True)
        zmq.auth.create_certificates(folder, "server")
        public, _ = zmq.auth.create_certificates(folder, "client")
        shutil.copy(public, os.path.join(folder, "authorized", "client.key"))


class ZmqSender(Channel):
    """PUSH side of a link: blocks once the link holds `high_water_mark` messages (backpressure)."""

    def __init__(self, address: str, high_water_mark: int = 1, keys: CurveKeys | None = None):
        self.context = zmq.Context(io_threads=1)
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, high_water_mark)
        if keys is not None:
            self.socket.curve_publickey, self.socket.curve_secretkey = keys.client_public, keys.client_secret
            self.socket.curve_serverkey = keys.server_public
        self.socket.connect(address)

    def send(self, msg: Message) -> None:
        frames = [encode_header(msg)] + [_as_frame(t) for t in to_host(msg.tensors)]  # [Note: host staging]
        # zero-copy frames are read by zmq's I/O thread later: wait until it is done with them, so that the
        # caller may reuse the tensors (a received labels buffer goes back to its pool right after this)
        self.socket.send_multipart(frames, copy=False, track=True).wait()

    def recv(self) -> Message:
        raise TypeError("a sender does not receive")

    def close(self) -> None:
        self.socket.close(linger=CLOSE_LINGER_MS)
        self.context.term()


class ZmqReceiver(Channel):
    """PULL side of a link: binds, checks every message, drops and logs the malformed ones.

    [Note: aligned receive] Each tensor frame is copied once, with recv_into, into a receive buffer from the
    pool (64-byte aligned, reused across messages). Using libzmq's own buffer in place would save that copy,
    but libzmq stores large messages 40 bytes into a malloc block, 8-byte aligned, and MKL's matrix products
    give different low-order bits for 8-byte-aligned inputs: the pipeline would no longer be bit-identical to
    the sequential trainer. The copy also means a frame can never make us allocate more than its header said.
    """

    def __init__(self, bind_address: str, device: torch.device, high_water_mark: int = 1,
                 max_tensor_bytes: int = MAX_TENSOR_BYTES, keys: CurveKeys | None = None):
        self.device, self.max_tensor_bytes = device, max_tensor_bytes
        self.pool = BufferPool()
        self.context = zmq.Context(io_threads=1)
        self.authenticator = None
        self.socket = self.context.socket(zmq.PULL)
        if keys is not None:  # only senders with an authorized client key get through the handshake
            # under ZAP authentication a PULL socket with a receive high-water mark of 1 never delivers (libzmq
            # 4.3): give it room for one more message
            high_water_mark = max(high_water_mark, 2)
            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=keys.authorized)
            self.socket.curve_server = True
            self.socket.curve_publickey, self.socket.curve_secretkey = keys.server_public, keys.server_secret
        self.socket.setsockopt(zmq.RCVHWM, high_water_mark)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_tensor_bytes + MAX_HEADER_BYTES)  # larger frames: peer dropped
        self._ipc_dir = None
        if bind_address.startswith("ipc://"):
            self._ipc_dir = os.path.dirname(bind_address[len("ipc://"):])
            self.socket.bind(bind_address)
            self.address = bind_address
        else:
            host = bind_address[len("tcp://"):]
            port = self.socket.bind_to_random_port(f"tcp://{host}")
            self.address = f"tcp://{advertised_host(host)}:{port}"
        self.rejected = 0

    def _more(self) -> bool:
        return bool(self.socket.getsockopt(zmq.RCVMORE))

    def _read_frames(self, specs: list[TensorSpec]) -> list[torch.Tensor]:
        buffers: list[torch.Tensor] = []
        try:
            for number, spec in enumerate(specs):
                if not self._more():
                    raise ProtocolError(f"header announces {len(specs)} tensor frames, {number} arrived")
                buffer = self._buffer(spec)
                buffers.append(buffer)
                raw = buffer.reshape(-1).view(torch.uint8).numpy()
                size = self.socket.recv_into(raw) if spec.nbytes else len(self.socket.recv())
                if size != spec.nbytes:
                    raise ProtocolError(f"frame of {size} bytes for a {spec.dtype} tensor of shape {spec.shape}")
            if self._more():
                raise ProtocolError(f"more frames than the {len(specs)} the header announces")
        except BaseException:
            if self.device.type == "cpu":
                self.pool.give(buffers)
            raise
        return buffers

    def _buffer(self, spec: TensorSpec) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.pool.take(spec.wire_shape, spec.dtype, self.device)
        return host_buffer(spec.wire_shape, spec.dtype, self.device)  # pinned; freed once its copy to the GPU is done

    def _discard_rest(self) -> None:
        while self._more():
            self.socket.recv(copy=False)

    def recv(self) -> Message:
        while True:
            first = self.socket.recv()
            try:
                header = decode_header(first, self.max_tensor_bytes)
                buffers = self._read_frames(header.specs)
            except ProtocolError as exc:
                self._discard_rest()
                self.rejected += 1
                if self.rejected <= LOGGED_REJECTIONS or self.rejected % 1000 == 0:  # a flood does not flood the log
                    print(f"warning: rejected message {self.rejected} on {self.address}: {exc}", file=sys.stderr, flush=True)
                continue
            if self.device.type == "cpu":
                return Message(header.kind, header.epoch, header.index, received(buffers, header.specs), header.meta,
                               release=lambda: self.pool.give(buffers))
            tensors = received(to_device(buffers, self.device), header.specs)
            return Message(header.kind, header.epoch, header.index, tensors, header.meta)

    def send(self, msg: Message) -> None:
        raise TypeError("a receiver does not send")

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)


def advertised_host(bind_host: str) -> str:
    """The address peers should connect to: the bound one, or for a wildcard the interface that reaches MASTER_ADDR."""
    if bind_host not in ("0.0.0.0", "*"):
        return bind_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # connect() on UDP sends nothing
        probe.connect((os.environ.get("MASTER_ADDR", "8.8.8.8"), 9))
        return probe.getsockname()[0]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address that only this machine can reach."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_host(bind_host: str, hosts: list[str]) -> None:
    """Refuse a loopback --zmq-host when the stages run on several hosts: a stage bound on loopback could never be
    reached by its upstream on another host, which would wait for it until the stall timeout. Every rank raises
    the same error, since all of them see the same gathered host names."""
    distinct = list(dict.fromkeys(hosts))
    if len(distinct) > 1 and is_loopback(bind_host):
        raise AgreedError(f"--zmq-host {bind_host} is loopback but the stages run on {len(distinct)} hosts "
                          f"({', '.join(distinct)}): use --zmq-host 0.0.0.0 or this node's address")


def open_zmq(rank: int, world: int, device: torch.device, bind_host: str, gradients: list[tuple[int, int]] = (),
             curve_keys: str | None = None) -> Links:
    """Each stage binds its inbox (and its remote-gradient inbox), the addresses are gathered, then each connects."""
    hosts = exchange_strings(host_name())
    check_bind_host(bind_host, hosts)
    last = world - 1
    keys = CurveKeys(curve_keys) if curve_keys else None

    def bind_from(peer: int) -> ZmqReceiver:
        if hosts[peer] == hosts[rank]:
            return ZmqReceiver(f"ipc://{tempfile.mkdtemp(prefix='localpipe-')}/inbox", device, keys=keys)
        return ZmqReceiver(f"tcp://{bind_host}", device, keys=keys)

    links = Links(inbox=bind_from(rank - 1) if rank > 0 else None)
    source = gradient_source(rank, list(gradients))
    if source is not None:
        links.feedback_in = bind_from(source)
    inboxes = exchange_strings(links.inbox.address if links.inbox else "")
    if rank < last:
        links.outbox = ZmqSender(inboxes[rank + 1], keys=keys)
    if gradients:  # every rank takes part in the exchange (a collective), whatever its links
        gradient_inboxes = exchange_strings(links.feedback_in.address if links.feedback_in else "")
        links.feedback_out = [ZmqSender(gradient_inboxes[receiver], keys=keys) for sender, receiver in gradients if sender == rank]
    return links
