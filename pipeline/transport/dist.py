"""torch.distributed transport: point-to-point send/recv, the same code for NCCL (GPUs) and gloo (CPU).

Each link between stage k and k+1 has its own process group, so the sending thread of one stage and the
receiving thread of the next are the only users of its communicator. A message goes as a fixed-size header
frame (length + msgpack), an overflow frame if the header is long, then one frame per tensor; the receiver
learns every shape from the header, so a smaller last batch needs nothing special. The sender posts all frames
at once and, on a forward link, the receiver posts the next header's receive as soon as a message has arrived, so
that a message costs one rendezvous, as a bare send/recv does.

[Note: no receive left posted on a gradient link]
A remote-gradient link (DFA's errors, dL/dh, h back for heads first) never keeps a receive posted in advance:
its error feed thread calls recv only while some batch awaits a message (StageIO.want_error), and the channel
posts nothing after a message. Under NCCL a posted receive is a kernel that spins until its data comes, and on
such a link the data needs this stage's own next output. CUDA does not promise that work on different streams
makes progress independently (CUDA C++ Programming Guide, "Streams": only that work may overlap), and with lazy
module loading (the default since CUDA 12.2) the first launch of a kernel can synchronize the context, so a
first-time kernel could wait for a receive that waits for it. The NCCL watchdog, too, times a receive from when
it was posted: one left posted over a test pass or a checkpoint would tear the process down. On a forward link
the pending receive's data never depends on the receiving stage, so that link keeps its one-rendezvous receive.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from pipeline.transport.message import MAX_HEADER_BYTES, Kind, Message, ProtocolError, decode_header, encode_header, to_wire
from pipeline.transport.base import (BufferPool, Channel, Links, gradient_source, host_buffer, received, to_device,
                                     to_host)

HEADER_FRAME_BYTES = 1024  # one frame holds the usual header; longer ones (end-of-run reports) add an overflow frame
_LENGTH_BYTES = 4


class DistChannel(Channel):
    """Sends to or receives from `peer` over `group`; frames travel on comm_device (the GPU for NCCL, else CPU).

    A channel is used by one helper thread of its stage, which issues everything on its own CUDA stream: with
    NCCL, `Work.wait()` makes that stream (not the CPU, not the compute stream) wait for the transfer, so a
    pending receive never holds up the stage's compute (see [Note: stage streams] in pipeline/engine/cuda_streams.py).
    """

    def __init__(self, peer: int, group, comm_device: torch.device, compute_device: torch.device, prepost: bool = True):
        """`prepost`: post the next header's receive as soon as a message has arrived (forward links only; see
        [Note: no receive left posted on a gradient link])."""
        self.peer, self.group, self.prepost = peer, group, prepost
        self.comm_device, self.compute_device = comm_device, compute_device
        self.pool = BufferPool()  # CPU receive buffers of a CPU stage; GPU and pinned ones come from torch's allocators
        self._header: torch.Tensor | None = None  # made by the receiving thread, on its stream
        self._header_posted = None  # the next header's receive, posted as soon as the last message has arrived

    def send(self, msg: Message) -> None:
        """Every frame is posted at once and then awaited: the peer receives the header while the tensors are
        already on their way (one gloo/NCCL round trip per message, not one per frame). Returns once the
        message has left, so the caller may free its tensors and the send thread gives backpressure."""
        payload = encode_header(msg)
        frame = bytearray(HEADER_FRAME_BYTES)
        frame[:_LENGTH_BYTES] = len(payload).to_bytes(_LENGTH_BYTES, "little")
        frames = [torch.frombuffer(frame, dtype=torch.uint8)]
        if len(payload) > HEADER_FRAME_BYTES - _LENGTH_BYTES:
            frames.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))  # an overflow frame
        else:
            frame[_LENGTH_BYTES:_LENGTH_BYTES + len(payload)] = payload
        if self.comm_device.type == "cuda":  # NCCL: every frame on the GPU, issued on this thread's stream
            frames = [f.to(self.comm_device) for f in frames] + [to_wire(t.detach()) for t in msg.tensors]
        else:  # gloo: host memory (a GPU stage's tensors staged through pinned buffers, see [Note: host staging])
            frames += to_host(msg.tensors)
        for work in [dist.isend(f, self.peer, group=self.group) for f in frames]:
            work.wait()
        if self.comm_device.type == "cuda":
            # wait() made this thread's stream wait for NCCL; wait for that stream (only): the send is done
            torch.cuda.current_stream(self.comm_device).synchronize()

    def _recv_header(self) -> bytes:
        if self._header is None:
            self._header = torch.empty(HEADER_FRAME_BYTES, dtype=torch.uint8, device=self.comm_device)
        if self._header_posted is None:
            self._header_posted = dist.irecv(self._header, self.peer, group=self.group)
        self._header_posted.wait()
        self._header_posted = None
        frame = self._header.cpu().numpy().tobytes()  # NCCL: blocks this thread (only) until the header is in
        length = int.from_bytes(frame[:_LENGTH_BYTES], "little")
        if length <= HEADER_FRAME_BYTES - _LENGTH_BYTES:
            return frame[_LENGTH_BYTES:_LENGTH_BYTES + length]
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"peer {self.peer} announced a header of {length} bytes")
        overflow = torch.empty(length, dtype=torch.uint8, device=self.comm_device)
        dist.recv(overflow, self.peer, group=self.group)
        return overflow.cpu().numpy().tobytes()

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.comm_device.type == "cuda":  # made on this thread's stream; the consumer records its own use
            return torch.empty(shape, dtype=dtype, device=self.comm_device)
        if self.compute_device.type == "cuda":
            return host_buffer(shape, dtype, self.compute_device)
        return self.pool.take(shape, dtype, self.comm_device)

    def recv(self) -> Message:
        header = decode_header(self._recv_header())
        frames = [self._buffer(spec.wire_shape, spec.dtype) for spec in header.specs]
        for frame in frames:
            dist.recv(frame, self.peer, group=self.group)
        if header.kind != Kind.END and self.prepost:  # the sender's next header goes out without waiting (not after END)
            self._header_posted = dist.irecv(self._header, self.peer, group=self.group)
        if self.compute_device.type == "cpu":
            return Message(header.kind, header.epoch, header.index, received(frames, header.specs), header.meta,
                           release=lambda: self.pool.give(frames))
        if self.comm_device.type == "cuda":
            return Message(header.kind, header.epoch, header.index, received(frames, header.specs), header.meta)
        tensors = received(to_device(frames, self.compute_device), header.specs)
        return Message(header.kind, header.epoch, header.index, tensors, header.meta)


def link_groups(world: int, backend: str, gradients: list[tuple[int, int]],
                timeout: datetime.timedelta | None = None) -> tuple[list, list]:
    """One process group per link (k, k+1), and per remote-gradient link (sender, receiver) in the order given,
    created in the same order on every rank, as torch requires; each is used by one thread on each side. `timeout`
    is the run's stall timeout: the NCCL watchdog aborts an operation pending longer than its group's timeout, so
    it must not be shorter."""
    options = {"backend": backend} if timeout is None else {"backend": backend, "timeout": timeout}
    forward = [dist.new_group([k, k + 1], **options) for k in range(world - 1)]
    errors = [dist.new_group(sorted(pair), **options) for pair in gradients]
    return forward, errors


def warm_up(rank: int, world: int, forward: list, errors: list, device: torch.device,
            gradients: list[tuple[int, int]] = ()) -> None:
    """Exchange one value over every link of this rank, in the main thread, before any helper thread starts.

    NCCL connects a link's communicator lazily, at its first exchange; left to that, two helper threads would
    connect two communicators at once while compute and other NCCL kernels run, and NCCL operations of several
    communicators issued concurrently without a consistent order can deadlock (NCCL user guide, "Using multiple
    NCCL communicators concurrently"). The links are
    visited in one global order on every rank (forward links, then remote-gradient links `gradients`, whose
    groups are `errors`), and on each the lower rank sends first: every rank's earlier links are done when it
    reaches a link, so both ends meet there.
    """
    links = [(k, k + 1, group) for k, group in enumerate(forward)] + [(*sorted(pair), group) for pair, group in zip(gradients, errors)]
    token = torch.zeros(1, device=device)
    for low, high, group in links:
        if rank == low:
            dist.send(token, high, group=group)
            dist.recv(token, high, group=group)
        elif rank == high:
            dist.recv(token, low, group=group)
            dist.send(token, low, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # start-up only


def open_dist(rank: int, world: int, compute_device: torch.device, backend: str,
              gradients: list[tuple[int, int]] = (), timeout: datetime.timedelta | None = None) -> Links:
    comm_device = compute_device if backend == "nccl" else torch.device("cpu")
    forward, errors = link_groups(world, backend, list(gradients), timeout)
    warm_up(rank, world, forward, errors, comm_device, list(gradients))
    last = world - 1

    def channel(peer: int, group, prepost: bool = True) -> DistChannel:
        return DistChannel(peer, group, comm_device, compute_device, prepost)

    links = Links(inbox=channel(rank - 1, forward[rank - 1]) if rank > 0 else None,
                  outbox=channel(rank + 1, forward[rank]) if rank < last else None)
    gradient_source(rank, list(gradients))  # one source at most
    for (sender, receiver), group in zip(gradients, errors):
        if receiver == rank:
            links.feedback_in = channel(sender, group, prepost=False)
        if sender == rank:
            links.feedback_out.append(channel(receiver, group))
    return links
