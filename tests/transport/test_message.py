"""The wire header: round trips, and every kind of malformed or foreign header is refused before allocation."""

import msgpack
import pytest
import torch

from pipeline.transport.message import MAX_TENSORS, Kind, Message, ProtocolError, decode_header, encode_header


def _header(**fields):
    base = {"v": 1, "kind": 1, "epoch": 2, "index": 3, "tensors": [["float32", [4, 5]], ["int64", [4]]], "meta": {}}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


def test_round_trip_keeps_kind_numbers_shapes_dtypes_and_meta():
    msg = Message(Kind.EVAL, 7, 11, [torch.zeros(3, 2, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int64)],
                  {"last": True, "hits": [1, None, 3]})
    header = decode_header(encode_header(msg))
    assert (header.kind, header.epoch, header.index) == (Kind.EVAL, 7, 11)
    assert [(s.dtype, s.shape, s.nbytes) for s in header.specs] == [(torch.bfloat16, (3, 2), 12), (torch.int64, (3,), 24)]
    assert header.meta == {"last": True, "hits": [1, None, 3]}


BAD_HEADERS = {
    "garbage bytes": b"\x00\xffnot msgpack at all\xc1",
    "not a map": msgpack.packb([1, 2, 3]),
    "wrong version": _header(v=2),
    "missing version": msgpack.packb({"kind": 1}),
    "unknown kind": _header(kind=99),
    "kind not an int": _header(kind="TRAIN"),
    "negative index": _header(index=-1),
    "dtype not allowed": _header(tensors=[["object", [1]]]),
    "shape not a list": _header(tensors=[["float32", 7]]),
    "negative dimension": _header(tensors=[["float32", [-4, 5]]]),
    "float dimension": _header(tensors=[["float32", [4.5]]]),
    "huge declared size": _header(tensors=[["float32", [1 << 20, 1 << 20]]]),
    "too many dims": _header(tensors=[["float32", [1] * 9]]),
    "too many tensors": _header(tensors=[["uint8", [1]]] * (MAX_TENSORS + 1)),
    "meta not a map": _header(meta=[1]),
    "binary payload smuggled in": msgpack.packb({"v": 1, "kind": 1, "epoch": 0, "index": 0, "tensors": [], "meta": {"x": b"\x80\x04"}}, use_bin_type=True),
    "oversized header": b"\x00" * (2 << 20),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_headers_are_refused(name):
    with pytest.raises(ProtocolError):
        decode_header(BAD_HEADERS[name])


def test_size_limit_is_configurable():
    data = _header(tensors=[["float32", [1024]]])
    assert decode_header(data, max_tensor_bytes=4096).specs[0].nbytes == 4096
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_header(data, max_tensor_bytes=4095)


@pytest.mark.parametrize("msg,reason", [
    (Message(Kind.END, meta={"stages": [{"skipped_updates": {0: 1}}]}), "header is not msgpack"),  # int map keys
    (Message(Kind.TRAIN, 1, 4, [torch.empty(1 << 30, 4, device="meta")]), "tensor of 17179869184 bytes exceeds the limit"),
    (Message(Kind.EVAL, meta={"text": "x" * (1 << 17)}), "header is not msgpack"),
], ids=["non-string keys", "tensor over the limit", "string over the limit"])
def test_a_message_its_receiver_would_drop_is_refused_by_the_sender(msg, reason):
    with pytest.raises(ProtocolError, match=f"cannot be sent: {reason}"):
        encode_header(msg)
