"""In-host transport: torch.multiprocessing queues made by the local launcher.

Tensors travel through host shared memory (a GPU stage's too: see [Note: local transport on a GPU]). The header
is the same checked msgpack header as on the wire.
"""

from __future__ import annotations

import queue
import threading

import torch

from pipeline.transport.message import Message, decode_header, encode_header, to_wire
from pipeline.transport.base import Channel, Links, PeerGone, received


def _shareable(tensor: torch.Tensor) -> torch.Tensor:
    """The queue's own copy of a tensor, in shared host memory (whatever device the stage computes on), for a
    receiver in another process (ThreadQueue's receivers, threads of this process, get _private's).

    [Note: local transport on a GPU]
    Pickling a tensor for the queue, which the queue's feeder thread does later, changes its storage in place
    (a CPU storage moves into shared memory), while the stage may still be reading that tensor (the labels in its
    blocks' backward pass): so the queue gets a copy that has no other user. GPU tensors are copied to host
    shared memory too, not sent as CUDA IPC handles: over CUDA IPC, on an H100 with torch 2.11, the feeder thread
    crashed the stage (SIGSEGV in `_share_cuda_`) in every vgg8b run of the one-GPU emulation, even when it
    shared private copies, and torch refuses to share a received CUDA tensor again (a middle stage could not
    pass the labels on). The copy to the host is synchronous on the send thread's stream, which has waited for
    the compute that made the tensor; the receiver copies it to its GPU on its own stream.
    """
    tensor = to_wire(tensor.detach())  # its memory order (see [Note: memory format on the wire])
    return torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_().copy_(tensor)


def _private(tensor: torch.Tensor) -> torch.Tensor:
    """The queue's own copy of a tensor, for a receiver that is a thread of this process: in host memory, copied
    synchronously (a GPU tensor's copy waits for the send thread's stream, as for _shareable), so the receiver
    never reads a copy still in flight; it moves it to its device on its own stream."""
    tensor = to_wire(tensor.detach())
    return tensor.clone() if tensor.device.type == "cpu" else tensor.to("cpu")


class QueueChannel(Channel):
    """One end of a bounded queue between two stages on this host: a torch.multiprocessing queue between stage
    processes, or (ThreadQueues) a thread queue between stages that are threads of one process."""

    def __init__(self, queue, device: torch.device):
        self.queue, self.device = queue, device
        self.copy = _private if isinstance(queue, ThreadQueue) else _shareable

    def send(self, msg: Message) -> None:
        self.queue.put((encode_header(msg), [self.copy(t) for t in msg.tensors]))

    def recv(self) -> Message:
        try:
            header_bytes, tensors = self.queue.get()
        except (EOFError, OSError) as exc:  # shared memory is handed over by the sender's process
            raise PeerGone(f"the stage sending to it is gone ({type(exc).__name__}: {exc})") from None
        header = decode_header(header_bytes)
        tensors = [t if t.device == self.device else t.to(self.device) for t in received(tensors, header.specs)]
        return Message(header.kind, header.epoch, header.index, tensors, header.meta)

    def close(self) -> None:
        self.queue.close()


class ThreadQueue(queue.Queue):
    """A bounded queue between stages that are threads of one process (pipeline/run/in_process.py): waits give up with
    PeerGone once `abort` is set (a stage failed), so no stage waits for ever on one that is gone."""

    def __init__(self, maxsize: int = 0, abort: threading.Event | None = None):
        super().__init__(maxsize)
        self.abort = abort or threading.Event()

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if not block or timeout is not None:
            return super().put(item, block, timeout)
        while True:
            try:
                return super().put(item, timeout=0.1)
            except queue.Full:
                if self.abort.is_set():
                    raise PeerGone("a stage of this process failed") from None

    def get(self, block: bool = True, timeout: float | None = None):
        if not block or timeout is not None:
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=0.1)
            except queue.Empty:
                if self.abort.is_set():
                    raise PeerGone("a stage of this process failed") from None

    def close(self) -> None:
        pass


class ThreadQueues:
    """What make_queues asks of a multiprocessing context, for stages that are threads of one process."""

    def __init__(self, abort: threading.Event):
        self.abort = abort

    def Queue(self, maxsize: int = 0) -> ThreadQueue:  # noqa: N802 (multiprocessing's name)
        return ThreadQueue(maxsize, self.abort)


def make_queues(context, world: int, depth: int, gradients: list[tuple[int, int]]) -> dict:
    """One bounded queue per link (k, k+1) and one per remote-gradient link that the run may use (sender,
    receiver); made by the launcher before it starts the stages (so for --partition auto, every link a placement
    could need). Gradient queues are unbounded: a stage drains them at once, and the stage that awaits a
    gradient bounds how many batches can await one."""
    return {"forward": [context.Queue(maxsize=depth) for _ in range(world - 1)],
            "feedback": {tuple(pair): context.Queue() for pair in gradients}}


def open_local(rank: int, world: int, device: torch.device, queues: dict, gradients: list[tuple[int, int]] = ()) -> Links:
    forward, last = queues["forward"], world - 1
    links = Links(inbox=QueueChannel(forward[rank - 1], device) if rank > 0 else None,
                  outbox=QueueChannel(forward[rank], device) if rank < last else None)
    for sender, receiver in gradients:
        if (sender, receiver) not in queues["feedback"]:
            raise ValueError(f"the local launcher made no queue for remote gradients from stage {sender} to {receiver}")
        if receiver == rank:
            links.feedback_in = QueueChannel(queues["feedback"][(sender, receiver)], device)
        if sender == rank:
            links.feedback_out.append(QueueChannel(queues["feedback"][(sender, receiver)], device))
    return links
