"""The NBD protocol module's parsers, on recorded bytes (no I/O, no server).

Each reply shape the spec allows for these payloads has a case: well formed,
truncated, overrunning its own length fields, not UTF-8, trailing bytes. Any
other input must fail as a RequestError (one option fails) and never as an
unexpected exception.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtydiff import nbdproto as proto


def strings(export: bytes, queries: list[bytes]) -> bytes:
    out = struct.pack("!I", len(export)) + export + struct.pack("!I", len(queries))
    return out + b"".join(struct.pack("!I", len(q)) + q for q in queries)


def test_meta_context_payload() -> None:
    payload = strings(b"vda", [b"base:allocation", b"qemu:dirty-bitmap:b0"])
    assert proto.parse_string_list(payload) == ("vda", ["base:allocation", "qemu:dirty-bitmap:b0"])
    assert proto.parse_string_list(strings(b"", [])) == ("", [])


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # nothing
        b"\0\0",  # a cut length
        struct.pack("!I", 10) + b"short",  # name overruns the payload
        strings(b"", [b"x"])[:-1],  # query cut short
        strings(b"", []) + b"\0",  # trailing byte
        struct.pack("!I", 2) + b"\xff\xfe" + struct.pack("!I", 0),  # not UTF-8
        struct.pack("!I", proto.MAX_STRING + 1) + b"x" * (proto.MAX_STRING + 1) + b"\0" * 4,
        strings(b"", [])[:-4] + struct.pack("!I", 0xFFFFFFFF),  # a count with nothing after
    ],
)
def test_bad_meta_context_payloads_fail_one_option(payload: bytes) -> None:
    with pytest.raises(proto.RequestError) as failed:
        proto.parse_string_list(payload)
    assert failed.value.errno == proto.Errno.EINVAL


def info(name: bytes, requests: list[int]) -> bytes:
    return (
        struct.pack("!I", len(name))
        + name
        + struct.pack(f"!H{len(requests)}H", len(requests), *requests)
    )


def test_info_payload() -> None:
    assert proto.parse_info_request(info(b"vda", [1, 3])) == ("vda", [1, 3])
    assert proto.parse_info_request(info(b"", [])) == ("", [])


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0\0\0",  # five bytes: no request count
        struct.pack("!I", 7) + b"abc" + b"\0\0",  # name longer than payload - 6
        info(b"a", [1, 2])[:-1],  # list cut short
        info(b"a", [1]) + b"\0\0",  # more requests than counted
        struct.pack("!I", 1) + b"\xff" + b"\0\0",  # not UTF-8
    ],
)
def test_bad_info_payloads_fail_one_option(payload: bytes) -> None:
    with pytest.raises(proto.RequestError):
        proto.parse_info_request(payload)


def test_request_header() -> None:
    raw = proto.REQUEST.pack(proto.REQUEST_MAGIC, 8, proto.Cmd.BLOCK_STATUS, 2**64 - 1, 4096, 512)
    assert proto.parse_request(raw) == proto.Request(
        8, proto.Cmd.BLOCK_STATUS, 2**64 - 1, 4096, 512
    )
    with pytest.raises(proto.ProtocolError):
        proto.parse_request(proto.REQUEST.pack(0x12345678, 0, 0, 1, 0, 0))


def test_reply_shapes() -> None:
    # Simple reply: magic, error, cookie.
    assert proto.simple_reply(7, 22) == struct.pack("!IIQ", 0x67446698, 22, 7)
    # Structured chunk: magic, flags, type, cookie, length, payload.
    chunk = proto.structured_chunk(9, proto.ReplyType.BLOCK_STATUS, b"abcd", done=True)
    assert chunk == struct.pack("!IHHQI", 0x668E33EF, 1, 5, 9, 4) + b"abcd"
    # Error chunk: the message is cut well under the 1000 bytes clients accept.
    error = proto.error_chunk(1, proto.Errno.EINVAL, "x" * 5000)
    assert len(error) < 1000
    assert struct.unpack_from("!IH", error, 20) == (22, 512)
    # Option reply: magic, option, type, length, payload.
    assert proto.option_reply(7, proto.Rep.ACK) == struct.pack("!QIII", 0x3E889045565A9, 7, 1, 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_fail_only_as_request_errors(payload: bytes) -> None:
    for parse in (proto.parse_string_list, proto.parse_info_request):
        with contextlib.suppress(proto.RequestError):  # anything else fails the test
            parse(payload)
