"""A raw-bytes NBD client for hostile-client tests.

It sends exactly what a test tells it, and reads replies into plain tuples, so
that the same session can be replayed against qemu-nbd and against dirtydiff
and the outcomes compared. No error handling beyond what the test asserts.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from dirtydiff import nbdproto as proto

Outcome = tuple[object, ...]


class RawClient:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes | None:
        """Exactly n bytes, or None if the server closed first."""
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake -------------------------------------------------------

    def greet(
        self, client_flags: int = proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES
    ) -> int:
        raw = self.recv(proto.SERVER_GREETING.size)
        assert raw is not None
        magic, ihaveopt, flags = proto.SERVER_GREETING.unpack(raw)
        assert (magic, ihaveopt) == (proto.NBDMAGIC, proto.IHAVEOPT)
        self.send(proto.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def send_option(self, option: int, payload: bytes = b"", magic: int = proto.IHAVEOPT) -> None:
        self.send(proto.OPTION_HEADER.pack(magic, option, len(payload)) + payload)

    def option(self, option: int, payload: bytes = b"") -> list[Outcome]:
        """Send an option; return [(reply type, payload)] up to the final reply,
        or end with ("closed",)."""
        self.send_option(option, payload)
        return self.option_replies()

    def option_replies(self) -> list[Outcome]:
        found: list[Outcome] = []
        while True:
            head = self.recv(proto.OPTION_REPLY.size)
            if head is None:
                found.append(("closed",))
                return found
            _, _, reply, length = proto.OPTION_REPLY.unpack(head)
            payload = self.recv(length) if length else b""
            found.append((reply, payload))
            if reply not in (proto.Rep.INFO, proto.Rep.META_CONTEXT, proto.Rep.SERVER):
                return found

    def go(self, name: str = "", contexts: tuple[str, ...] = ("base:allocation",)) -> None:
        """Negotiate structured replies, contexts and GO."""
        assert self.option(proto.Opt.STRUCTURED_REPLY)[-1][0] == proto.Rep.ACK
        if contexts:
            assert self.option(proto.Opt.SET_META_CONTEXT, meta_payload(name, contexts))[-1][0] == (
                proto.Rep.ACK
            )
        replies = self.option(proto.Opt.GO, info_payload(name))
        assert replies[-1][0] == proto.Rep.ACK, replies

    # -- transmission ----------------------------------------------------

    def request(
        self, kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1
    ) -> None:
        self.send(proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, kind, cookie, offset, length))

    def structured_reply(self) -> list[Outcome]:
        """One reply: [("simple", errno)] for a simple reply, else the chunks
        of a structured one as (type, errno or payload length)."""
        found: list[Outcome] = []
        while True:
            magic_bytes = self.recv(4)
            if magic_bytes is None:
                found.append(("closed",))
                return found
            (magic,) = struct.unpack("!I", magic_bytes)
            if magic == proto.SIMPLE_REPLY_MAGIC:
                rest = self.recv(12)
                assert rest is not None
                found.append(("simple", struct.unpack("!I", rest[:4])[0]))
                return found
            rest = self.recv(proto.STRUCTURED_REPLY.size - 4)
            assert rest is not None
            magic, flags, kind, _cookie, length = proto.STRUCTURED_REPLY.unpack(magic_bytes + rest)
            assert magic == proto.STRUCTURED_REPLY_MAGIC
            payload = self.recv(length) if length else b""
            assert payload is not None
            if kind in (proto.ReplyType.ERROR, proto.ReplyType.ERROR_OFFSET):
                found.append((kind, struct.unpack("!I", payload[:4])[0]))
            else:
                found.append((kind, length))
            if flags & proto.REPLY_FLAG_DONE:
                return found

    def simple_reply(self) -> Outcome:
        head = self.recv(proto.SIMPLE_REPLY.size)
        if head is None:
            return ("closed",)
        magic, errno, _ = proto.SIMPLE_REPLY.unpack(head)
        assert magic == proto.SIMPLE_REPLY_MAGIC
        return ("simple", errno)


def meta_payload(export: str, queries: tuple[str, ...]) -> bytes:
    out = (
        struct.pack("!I", len(export.encode())) + export.encode() + struct.pack("!I", len(queries))
    )
    for q in queries:
        out += struct.pack("!I", len(q.encode())) + q.encode()
    return out


def info_payload(export: str, requests: tuple[int, ...] = ()) -> bytes:
    name = export.encode()
    return (
        struct.pack("!I", len(name))
        + name
        + struct.pack(f"!H{len(requests)}H", len(requests), *requests)
    )
