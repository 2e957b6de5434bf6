"""Target: dirtydiff.nbdproto's parsers, walked over a client session.

The walk frames the bytes as the server does (client flags, options with
their payloads, then 28-byte requests and write payloads) and hands each
piece to the parser the server would use. A parser may only return a value
that re-encodes to exactly its input, or raise RequestError (one option
fails) / ProtocolError (the connection ends); anything else is a bug.
"""

from __future__ import annotations

import struct

from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Opt
from tests.rawnbd import info_payload, meta_payload


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes | None:
        if n > len(self.data) - self.pos:
            return None
        self.pos += n
        return self.data[self.pos - n : self.pos]


def _option(option: int, payload: bytes) -> bool:
    """One option's payload through its parser; True if it enters transmission."""
    try:
        if option in (Opt.INFO, Opt.GO):
            name, requests = proto.parse_info_request(payload)
            assert info_payload(name, tuple(requests)) == payload
            return option == Opt.GO
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            export, queries = proto.parse_string_list(payload)
            assert meta_payload(export, tuple(queries)) == payload
            assert all(len(s.encode()) <= proto.MAX_STRING for s in (export, *queries))
    except proto.RequestError as e:
        assert e.errno == proto.Errno.EINVAL, e
    return False


def one_input(data: bytes) -> None:
    stream = _Stream(data)
    flags = stream.take(proto.CLIENT_FLAGS.size)
    if flags is None:
        return
    (client_flags,) = proto.CLIENT_FLAGS.unpack(flags)
    if client_flags & ~proto.KNOWN_CLIENT_FLAGS:
        return
    while True:
        header = stream.take(proto.OPTION_HEADER.size)
        if header is None:
            return
        magic, option, length = proto.OPTION_HEADER.unpack(header)
        if magic != proto.IHAVEOPT:
            return
        if option == Opt.EXPORT_NAME:
            if length > proto.MAX_STRING or stream.take(length) is None:
                return
            break
        if length > proto.MAX_OPTION:
            stream.pos = min(len(data), stream.pos + length)  # drained, never held
            continue
        payload = stream.take(length)
        if payload is None or option == Opt.ABORT:
            return
        if _option(option, payload):
            break
    while (header := stream.take(proto.REQUEST.size)) is not None:
        try:
            request = proto.parse_request(header)
        except proto.ProtocolError:
            (magic,) = struct.unpack_from("!I", header)
            assert magic != proto.REQUEST_MAGIC
            return
        assert proto.REQUEST.pack(proto.REQUEST_MAGIC, *request) == header
        if request.type == proto.Cmd.DISC:
            return
        if request.type == proto.Cmd.WRITE:
            if request.length > proto.MAX_REQUEST:
                return
            stream.pos = min(len(data), stream.pos + request.length)


if __name__ == "__main__":
    from tests.fuzz.atheris_main import fuzz

    fuzz(one_input)
