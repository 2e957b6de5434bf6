"""The control protocol's wire format: msgpack messages over a unix stream socket.

Framing: each message is a 4-byte big-endian length, then that many bytes of
one msgpack map. Messages over MAX_MESSAGE bytes end the connection (the
length is checked before anything is allocated).

Request::  {"version": 1, "op": "bitmap.add", "args": {"name": "b0", ...}}
Reply::    {"version": 1, "ok": true, "result": ...}
           {"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}

A framing error (bad length, not msgpack, not a map) ends the connection,
because the stream cannot be resynchronised; what a request asks is checked
by ``dirtydiff.control.handlers``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from dirtydiff import errors

API_VERSION = 1
MAX_MESSAGE = 1 << 20
_LENGTH = struct.Struct("!I")

Message = dict[str, Any]


def encode(message: Message) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_MESSAGE:
        raise errors.BadRequest("too-large", f"message of {len(payload)} bytes is over the limit")
    return _LENGTH.pack(len(payload)) + payload


def encode_reply(reply: Message) -> bytes:
    """``encode`` for a server's reply: one too large to send (a result that
    grew past the limit) becomes an error reply, so the client gets an answer
    and the connection stays in step."""
    try:
        return encode(reply)
    except errors.BadRequest as e:
        return encode(reply_error(errors.DirtydiffError("reply-too-large", e.message)))


def frame_length(prefix: bytes) -> int:
    """Parse the length prefix; a length past the limit is a protocol error."""
    length: int = _LENGTH.unpack(prefix)[0]
    if length > MAX_MESSAGE:
        raise errors.ProtocolError(
            "too-large", f"message of {length} bytes is over the {MAX_MESSAGE}-byte limit"
        )
    return length


def decode(payload: bytes) -> Message:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise errors.ProtocolError("malformed", f"not a msgpack message: {e}") from None
    if not isinstance(message, dict):
        raise errors.ProtocolError("malformed", "a message must be a msgpack map")
    return message


def _recv_exactly(sock: socket.socket, length: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < length:
        chunk = sock.recv(length - len(chunks))
        if not chunk:
            if not chunks:
                return None
            raise errors.ProtocolError("truncated", "connection closed inside a message")
        chunks += chunk
    return bytes(chunks)


def read_message(sock: socket.socket) -> Message | None:
    """Read one message; None at a clean end of stream."""
    prefix = _recv_exactly(sock, _LENGTH.size)
    if prefix is None:
        return None
    payload = _recv_exactly(sock, frame_length(prefix))
    if payload is None:
        raise errors.ProtocolError("truncated", "connection closed inside a message")
    return decode(payload)


def reply_ok(result: object) -> Message:
    return {"version": API_VERSION, "ok": True, "result": result}


MAX_ERROR_MESSAGE = 2048  # characters: an error may quote the request it refuses


def reply_error(error: errors.DirtydiffError) -> Message:
    message = error.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 16] + f"... ({len(message)} chars)"
    return {
        "version": API_VERSION,
        "ok": False,
        # "kind" is the class of error (bad-request, not-found, ...), "code"
        # the precise reason scripts match on (unknown-bitmap, name-in-use, ...).
        "error": {"kind": type(error).code, "code": error.code, "message": message},
    }


def request(op: str, **args: object) -> Message:
    return {"version": API_VERSION, "op": op, "args": args}


def result_of(reply: Message) -> Any:
    if reply.get("ok") is True:
        return reply.get("result")
    error = reply.get("error") or {}
    code = str(error.get("code", "error"))
    cls = errors.ERROR_CLASSES.get(str(error.get("kind")), errors.DirtydiffError)
    raise cls(code, str(error.get("message", "request failed")))
