"""What crosses a process boundary: a batch's detached activation and labels (or a control signal), numbered.

On the wire a message is a msgpack header followed by one raw frame per tensor. The header is checked before
anything is allocated for the frames: version, kind, dtype (from a whitelist), shape, byte count and size.
No pickle, ever: a header is data, not code.

[Note: memory format on the wire]
A tensor crosses in the order its elements have in memory, so that it arrives with the strides it left with: a
channels_last activation stays channels_last, as it would be handed from block to block in one process (on a GPU
another layout means other cuDNN algorithms and other dropout masks, so other numbers). A dense tensor whose
memory order is not row-major goes as its permuted, row-major view (channels_last NCHW as NHWC, no copy) and
the header names the permutation ("order"); the receiver permutes its buffer back. A tensor that is not dense
(a strided slice) goes row-major, as .contiguous() makes it; so would a one-process hand-off's next
.contiguous(), and PyTorch's convolutions and matmuls take such inputs through that copy anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable

import msgpack
import torch

PROTOCOL_VERSION = 1
MAX_TENSORS = 64  # an ALIGN message carries its held-out batches and one state tensor per stage
MAX_DIMS = 8
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 31  # 2 GiB: a vgg11b (3x) activation at batch 512 is about 400 MB

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Kind(IntEnum):
    TRAIN = 1  # train on this batch, pass the detached output on
    EVAL = 2  # score the local classifiers on this test batch, pass the output on
    END = 3  # end of stream: save, report, pass it on, stop
    FEEDBACK = 4  # on a remote-gradient link: DFA's output error, a split block's dL/dh or h, or its heads' weights
    ALIGN = 5  # held-out batches; each stage adds its blocks' state; the last one measures alignment angles
    CHECKPOINT = 6  # every stage saves its state here, all at the same batch; the last one completes the checkpoint


class ProtocolError(ValueError):
    """A received header or frame set that does not describe a valid message."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """dtype and shape of one tensor frame, its size in bytes, and the order of its dims in memory when that is not
    row-major (see [Note: memory format on the wire])."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def wire_shape(self) -> tuple[int, ...]:
        """The shape of the frame: the tensor's dims in memory order."""
        return self.shape if self.order is None else tuple(self.shape[d] for d in self.order)


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The order of a dense tensor's dims in memory, outermost first, when it is not row-major (channels_last NCHW:
    (0, 2, 3, 1)); None for a row-major tensor or one that is not dense (it goes row-major)."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return order if t.permute(order).is_contiguous() else None


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """What a tensor's frame holds: its row-major view in memory order (no copy), or a row-major copy."""
    order = memory_order(t)
    return t.contiguous() if order is None else t.permute(order)


def from_wire(frame: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """The received tensor, with the strides it was sent with: the frame permuted back."""
    if order is None:
        return frame
    return frame.permute(tuple(sorted(range(len(order)), key=lambda d: order[d])))


@dataclass(slots=True)
class Message:
    """One item of a stage's stream. tensors = [activation (B, ...), labels (B,)] for TRAIN and EVAL."""

    kind: Kind
    epoch: int = 0
    index: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # small msgpack-able facts: eval hits, stage reports
    release: Callable[[], None] = field(default=lambda: None, repr=False)  # hands receive buffers back; never sent
    ready: Any = field(default=None, repr=False)  # CUDA event: its tensors are ready (pipeline/engine/cuda_streams.py); never sent

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.dtype, tuple(t.shape), memory_order(t)) for t in self.tensors]


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded, checked header: everything but the tensor data."""

    kind: Kind
    epoch: int
    index: int
    specs: list[TensorSpec]
    meta: dict[str, Any]


def encode_header(msg: Message) -> bytes:
    """The message's header, checked as its receiver will check it: a message the receiver would drop as
    malformed (too large, a map with non-string keys, ...) fails loudly here, at the sender, instead."""
    tensors = []
    for t in msg.tensors:
        if t.dtype not in DTYPE_NAMES:
            raise ProtocolError(f"dtype {t.dtype} cannot be sent")
        order = memory_order(t)
        tensors.append([DTYPE_NAMES[t.dtype], list(t.shape)] + ([list(order)] if order else []))
    data = msgpack.packb({"v": PROTOCOL_VERSION, "kind": int(msg.kind), "epoch": msg.epoch, "index": msg.index,
                          "tensors": tensors, "meta": msg.meta}, use_bin_type=True)
    try:
        decode_header(data)  # a few microseconds against a transfer: the two ends can never disagree on a message
    except ProtocolError as exc:
        raise ProtocolError(f"{msg.kind.name} message of batch {msg.index} cannot be sent: {exc}") from None
    return data


def _int(value: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what} must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def decode_header(data: bytes, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> Header:
    """Parse and check a header; raises ProtocolError for anything malformed, foreign or too large."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=1 << 16, max_bin_len=0,
                                 max_array_len=1 << 16, max_map_len=1 << 12, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"header is not msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise ProtocolError("header is not a map")
    if fields.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {fields.get('v')!r:.20} is not {PROTOCOL_VERSION}")
    try:
        kind = Kind(_int(fields.get("kind"), "kind"))
    except ValueError as exc:
        raise ProtocolError(f"unknown message kind: {exc}") from None
    epoch, index = _int(fields.get("epoch"), "epoch"), _int(fields.get("index"), "index")
    tensors, meta = fields.get("tensors"), fields.get("meta")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise ProtocolError(f"tensors must be a list of at most {MAX_TENSORS}")
    if not isinstance(meta, dict):
        raise ProtocolError("meta must be a map")
    specs = []
    for entry in tensors:
        if not (isinstance(entry, list) and len(entry) in (2, 3) and all(isinstance(e, list) for e in entry[1:])):
            raise ProtocolError("a tensor entry must be [dtype, shape] or [dtype, shape, order]")
        name, shape, *order = entry
        if name not in DTYPES:
            raise ProtocolError(f"dtype {name!r:.20} is not allowed")
        if len(shape) > MAX_DIMS:
            raise ProtocolError(f"tensor of {len(shape)} dims exceeds {MAX_DIMS}")
        if order and (any(type(d) is not int for d in order[0]) or sorted(order[0]) != list(range(len(shape)))):
            raise ProtocolError(f"order {order[0]!r:.40} is not a permutation of the {len(shape)} dims")
        spec = TensorSpec(DTYPES[name], tuple(_int(d, "a dimension", 0, max_tensor_bytes) for d in shape),
                          tuple(order[0]) if order else None)
        if spec.nbytes > max_tensor_bytes:
            raise ProtocolError(f"tensor of {spec.nbytes} bytes exceeds the limit of {max_tensor_bytes}")
        specs.append(spec)
    return Header(kind, epoch, index, specs, meta)
