"""torch.distributed transport: point-to-point send/recv, the same code for NCCL (GPUs) and gloo (CPU).

Each link between stage k and k+1 has its own process group, so the sending thread of one stage and the
receiving thread of the next are the only users of its communicator. A message goes as a fixed-size header
frame (length + msgpack), an overflow frame if the header is long, then one frame per tensor; the receiver
learns every shape from the header, so a smaller last batch needs nothing special. The sender posts all frames
at once and the receiver posts the next header's receive as soon as a message has arrived, so that a message
costs one rendezvous, as a bare send/recv does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.message import MAX_HEADER_BYTES, Kind, Message, ProtocolError, decode_header, encode_header
from pipeline.transport.base import BufferPool, Channel, Links

HEADER_FRAME_BYTES = 1024  # one frame holds the usual header; longer ones (end-of-run reports) add an overflow frame
_LENGTH_BYTES = 4


class DistChannel(Channel):
    """Sends to or receives from `peer` over `group`; frames travel on comm_device (the GPU for NCCL, else CPU)."""

    def __init__(self, peer: int, group, comm_device: torch.device, compute_device: torch.device):
        self.peer, self.group = peer, group
        self.comm_device, self.compute_device = comm_device, compute_device
        self.pool = BufferPool()
        self._header = torch.empty(HEADER_FRAME_BYTES, dtype=torch.uint8, device=comm_device)
        self._header_posted = None  # the next header's receive, posted as soon as the last message has arrived

    def send(self, msg: Message) -> None:
        """Every frame is posted at once and then awaited: the peer receives the header while the tensors are
        already on their way (one gloo/NCCL round trip per message, not one per frame)."""
        payload = encode_header(msg)
        frame = bytearray(HEADER_FRAME_BYTES)
        frame[:_LENGTH_BYTES] = len(payload).to_bytes(_LENGTH_BYTES, "little")
        frames = [torch.frombuffer(frame, dtype=torch.uint8)]
        if len(payload) > HEADER_FRAME_BYTES - _LENGTH_BYTES:
            frames.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))  # an overflow frame
        else:
            frame[_LENGTH_BYTES:_LENGTH_BYTES + len(payload)] = payload
        frames += [t.detach() for t in msg.tensors]
        frames = [f.contiguous().to(self.comm_device) for f in frames]
        for work in [dist.isend(f, self.peer, group=self.group) for f in frames]:
            work.wait()
        if self.comm_device.type == "cuda":
            torch.cuda.current_stream(self.comm_device).synchronize()  # the sender may reuse its tensors after this

    def _recv_header(self) -> bytes:
        if self._header_posted is None:
            self._header_posted = dist.irecv(self._header, self.peer, group=self.group)
        self._header_posted.wait()
        self._header_posted = None
        frame = self._header.cpu().numpy().tobytes()
        length = int.from_bytes(frame[:_LENGTH_BYTES], "little")
        if length <= HEADER_FRAME_BYTES - _LENGTH_BYTES:
            return frame[_LENGTH_BYTES:_LENGTH_BYTES + length]
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"peer {self.peer} announced a header of {length} bytes")
        overflow = torch.empty(length, dtype=torch.uint8, device=self.comm_device)
        dist.recv(overflow, self.peer, group=self.group)
        return overflow.cpu().numpy().tobytes()

    def recv(self) -> Message:
        header = decode_header(self._recv_header())
        frames = [self.pool.take(spec.shape, spec.dtype, self.comm_device) for spec in header.specs]
        for frame in frames:
            dist.recv(frame, self.peer, group=self.group)
        if header.kind != Kind.END:  # the sender's next header goes out without waiting for us (nothing follows END)
            self._header_posted = dist.irecv(self._header, self.peer, group=self.group)
        if self.comm_device == self.compute_device:
            return Message(header.kind, header.epoch, header.index, frames, header.meta, release=lambda: self.pool.give(frames))
        tensors = [frame.to(self.compute_device) for frame in frames]  # gloo on a GPU run: staged through the host
        self.pool.give(frames)
        return Message(header.kind, header.epoch, header.index, tensors, header.meta)


def link_groups(world: int, backend: str, feedback: bool) -> tuple[list, list]:
    """One process group per link (k, k+1), and per DFA error link (K-1 -> k), created in the same order on every
    rank, as torch requires; each is used by one thread on each side."""
    forward = [dist.new_group([k, k + 1], backend=backend) for k in range(world - 1)]
    errors = [dist.new_group([k, world - 1], backend=backend) for k in range(world - 1)] if feedback else []
    return forward, errors


def open_dist(rank: int, world: int, compute_device: torch.device, backend: str, feedback: bool = False) -> Links:
    comm_device = compute_device if backend == "nccl" else torch.device("cpu")
    forward, errors = link_groups(world, backend, feedback)
    last = world - 1

    def channel(peer: int, group) -> DistChannel:
        return DistChannel(peer, group, comm_device, compute_device)

    links = Links(inbox=channel(rank - 1, forward[rank - 1]) if rank > 0 else None,
                  outbox=channel(rank + 1, forward[rank]) if rank < last else None)
    if errors and rank < last:
        links.feedback_in = channel(last, errors[rank])
    if errors and rank == last:
        links.feedback_out = [channel(k, errors[k]) for k in range(last)]
    return links
