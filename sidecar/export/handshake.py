"""The fixed-newstyle handshake of one connection: the options, up to
NBD_OPT_GO (or EXPORT_NAME), and the meta contexts the client selects.

Unknown options fail alone (ERR_UNSUP) and the handshake goes on, as in
qemu-nbd; a broken frame (bad magic, unknown client flags, an unknown
export named by EXPORT_NAME) ends the connection as a ``ProtocolError``.
Nothing a client sends makes it hold more than ``MAX_OPTION`` bytes of one
option: a larger payload is read and dropped as it comes.

With TLS configured (``TlsCreds``), the spec's TLS rules: until
NBD_OPT_STARTTLS has upgraded the connection, every option but STARTTLS and
ABORT gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME ends the connection;
so no export, name or size goes out in the clear. STARTTLS is acknowledged,
the TLS handshake runs on the same connection (``loop.start_tls``), and the
option haggling starts again on the TLS stream. The handshake limit counts
the TLS handshake too: the server's watchdog ends a client that stalls in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dirtydiff import errors
from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Info, Opt, Rep, RequestError
from sidecar.export.catalog import ExportCatalog
from sidecar.export.contexts import Context, Export, select
from sidecar.export.tls import TlsCreds, TlsRefused

log = logging.getLogger(__name__)

BLOCK_SIZES = (1, 4096, proto.MAX_REQUEST)


@dataclass
class Session:
    """What a handshake agreed on: the export, and how to talk about it."""

    export: Export
    structured: bool
    contexts: list[Context] = field(default_factory=list)
    tls: bool = False  # the stream is TLS: replies go through its transport


class Handshake:
    """One connection's negotiation: ``await negotiate()``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exports: ExportCatalog,
        tls: TlsCreds | None = None,
        upgraded: Callable[[asyncio.StreamWriter], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.exports = exports
        self.tls = tls
        self.tls_required = tls is not None  # until STARTTLS has upgraded the stream
        self.peer_dn: str | None = None  # the client certificate's, once admitted
        self._upgraded = upgraded
        self.structured = False
        self.no_zeroes = False
        self.fixed = False
        self.contexts: list[Context] = []
        self.contexts_export: str | None = None

    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _drain_bytes(self, n: int) -> None:
        """Read and discard n bytes without holding them."""
        while n > 0:
            chunk = await self.reader.read(min(n, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    async def _send(self, *chunks: bytes | bytearray) -> None:
        """Send chunks whole; return once they are with the kernel."""
        for chunk in chunks:
            self.writer.write(chunk)
        await self.writer.drain()

    async def negotiate(self) -> Session | None:
        """Negotiate; the session to serve, or None if the client aborted."""
        flags = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        await self._send(proto.server_greeting(flags))
        (client_flags,) = proto.CLIENT_FLAGS.unpack(await self._read(4))
        if client_flags & ~proto.KNOWN_CLIENT_FLAGS:
            raise proto.ProtocolError(f"unknown client flags {client_flags:#x}")
        self.fixed = bool(client_flags & proto.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(client_flags & proto.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = proto.OPTION_HEADER.unpack(await self._read(16))
            if magic != proto.IHAVEOPT:
                raise proto.ProtocolError(f"bad option magic {magic:#x}")
            if option == Opt.EXPORT_NAME:
                if self.tls_required:  # spec: no reply, the server closes
                    raise proto.ProtocolError("EXPORT_NAME before STARTTLS: TLS is required")
                return self._session(await self._opt_export_name(length))
            if not self.fixed:
                raise proto.ProtocolError("option other than EXPORT_NAME without fixed newstyle")
            tls_first = self.tls_required and option not in (Opt.STARTTLS, Opt.ABORT)
            if length > proto.MAX_OPTION:
                await self._drain_bytes(length)
                if tls_first:
                    await self._reply(option, Rep.ERR_TLS_REQD, b"TLS required: send STARTTLS")
                else:
                    await self._reply(option, Rep.ERR_TOO_BIG, b"option payload too large")
                continue
            payload = await self._read(length)
            if option == Opt.ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._reply(option, Rep.ACK)
                return None
            if tls_first:
                await self._reply(option, Rep.ERR_TLS_REQD, b"TLS required: send STARTTLS")
                continue
            handler = self._options.get(option)
            if handler is None:
                await self._reply(option, Rep.ERR_UNSUP, b"option not supported")
                continue
            try:
                chosen = await handler(self, option, payload)
            except RequestError as e:
                await self._reply(option, Rep.ERR_INVALID, e.message.encode())
                continue
            if chosen is not None:
                return self._session(chosen)

    def _session(self, export: Export) -> Session:
        if self.contexts_export != export.name:
            self.contexts = []  # the selection belongs to the export named in it
        return Session(export, self.structured, self.contexts, tls=self.tls is not None)

    async def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        await self._send(proto.option_reply(option, reply, payload))

    async def _find_export(self, name: str) -> Export | None:
        return await self.exports.find(name)

    def _transmission_flags(self, export: Export) -> int:
        if export.snapshot is not None:
            return self._snapshot_flags()
        flags = (
            proto.TransmissionFlag.HAS_FLAGS
            | proto.TransmissionFlag.READ_ONLY
            | proto.TransmissionFlag.SEND_FLUSH
            | proto.TransmissionFlag.SEND_FUA
            | proto.TransmissionFlag.SEND_CACHE
            | proto.TransmissionFlag.CAN_MULTI_CONN  # read-only: trivially safe
        )
        if self.structured:
            flags |= proto.TransmissionFlag.SEND_DF
        return int(flags)

    def _snapshot_flags(self) -> int:
        """A snapshot's export: not READ_ONLY, so that it may take TRIM (the
        backup is done with a range: the tracker frees it), as QEMU's
        fleecing export does; writes get EPERM. Multi-conn: a flush has
        nothing to make durable, and every connection reads one view."""
        flags = (
            proto.TransmissionFlag.HAS_FLAGS
            | proto.TransmissionFlag.SEND_FLUSH
            | proto.TransmissionFlag.SEND_FUA
            | proto.TransmissionFlag.SEND_TRIM
            | proto.TransmissionFlag.SEND_CACHE
            | proto.TransmissionFlag.CAN_MULTI_CONN
        )
        if self.structured:
            flags |= proto.TransmissionFlag.SEND_DF
        return int(flags)

    # -- options: each returns the export to serve if it ends the handshake --

    async def _opt_export_name(self, length: int) -> Export:
        if length > proto.MAX_STRING:
            raise proto.ProtocolError("export name too long")
        name = (await self._read(length)).decode(errors="replace")
        export = await self._find_export(name)
        if export is None:
            raise proto.ProtocolError(f"unknown export {name!r}")  # spec: must disconnect
        flags = self._transmission_flags(export)
        await self._send(proto.export_name_reply(export.size, flags, no_zeroes=self.no_zeroes))
        return export

    async def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"LIST takes no payload")
            return
        for export in await self.exports.listing():
            await self._send(proto.server_reply(option, export.name, export.description))
        await self._reply(option, Rep.ACK)

    async def _opt_starttls(self, option: int, payload: bytes) -> None:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STARTTLS takes no payload")
        elif self.tls is None:
            await self._reply(option, Rep.ERR_POLICY, b"TLS not configured")
        elif not self.tls_required:
            await self._reply(option, Rep.ERR_INVALID, b"TLS already negotiated")
        else:
            await self._reply(option, Rep.ACK)
            # Bytes the client sent after STARTTLS, before its TLS handshake,
            # came in the clear: served as if from inside TLS, they would let
            # whoever is on the path inject options (the STARTTLS injection
            # of SMTP's CVE-2011-0411). No await between this look and
            # start_tls taking the transport: nothing can come in between.
            # asyncio has no public way to ask; without the attribute, refuse.
            buffered = getattr(self.reader, "_buffer", None)
            if buffered is None or buffered:
                raise proto.ProtocolError("data in the clear after STARTTLS")
            await self._start_tls(self.tls)

    async def _start_tls(self, tls: TlsCreds) -> None:
        """The TLS handshake on this connection, then the client's
        certificate against the authz list; raise TlsRefused if either
        fails (the connection then ends, having revealed nothing)."""
        loop = asyncio.get_running_loop()
        plain = self.writer.transport
        protocol = plain.get_protocol()
        assert isinstance(protocol, asyncio.StreamReaderProtocol)
        try:
            # No timeout of its own: the server's handshake limit covers it.
            upgraded = await loop.start_tls(
                plain, protocol, tls.context, server_side=True, ssl_handshake_timeout=3600
            )
        except ssl.SSLError as e:
            raise TlsRefused(f"TLS handshake failed: {e.reason or e}") from None
        if upgraded is None:  # the connection ended (or was ended) mid-handshake
            raise ConnectionAbortedError("connection ended in its TLS handshake")
        writer = asyncio.StreamWriter(upgraded, protocol, self.reader, loop)
        self.writer = writer
        if self._upgraded is not None:
            self._upgraded(writer)
        ssl_object = upgraded.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        self.peer_dn = tls.admit(ssl_object.getpeercert())
        self.tls_required = False
        log.info("client %s: TLS %s, certificate %s", upgraded.get_extra_info("peername") or "unix",
                 ssl_object.version(), self.peer_dn or "none")  # fmt: skip

    async def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STRUCTURED_REPLY takes no payload")
        elif self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies already negotiated")
        else:
            self.structured = True
            await self._reply(option, Rep.ACK)

    async def _opt_info_go(self, option: int, payload: bytes) -> Export | None:
        name, requests = proto.parse_info_request(payload)
        export = await self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return None
        flags = self._transmission_flags(export)
        await self._send(proto.info_export_reply(option, export.size, flags))
        if Info.NAME in requests:
            await self._send(proto.info_text_reply(option, Info.NAME, export.name))
        if Info.DESCRIPTION in requests and export.description:
            await self._send(proto.info_text_reply(option, Info.DESCRIPTION, export.description))
        await self._send(proto.info_block_size_reply(option, *BLOCK_SIZES))
        await self._reply(option, Rep.ACK)
        return export if option == Opt.GO else None

    async def _opt_meta_context(self, option: int, payload: bytes) -> None:
        if option == Opt.SET_META_CONTEXT and not self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies not negotiated")
            return
        name, queries = proto.parse_string_list(payload)
        export = await self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return
        # A few small state-dir reads, done inline like export.bitmap() below:
        # a thread hop (a new thread, on a fresh server) cost more.
        available = export.contexts()
        if option == Opt.LIST_META_CONTEXT:
            chosen = [c for c in available if not queries or any(_matches(q, c) for q in queries)]
            for context in chosen:
                await self._send(proto.meta_context_reply(option, 0, context))
        else:
            wanted = set(queries)
            self.contexts = []
            self.contexts_export = export.name
            for index, context in enumerate(available):
                if context not in wanted:
                    continue
                # qemu-nbd's ids: 0 for base:allocation, 2 + i for bitmap i.
                number = 0 if index == 0 else index + 1
                try:
                    self.contexts.append(select(export, number, context))
                except (OSError, errors.DirtydiffError) as e:
                    log.info("context %s not selected: %s", context, e)  # removed just now
                    continue
                await self._send(proto.meta_context_reply(option, number, context))
        await self._reply(option, Rep.ACK)

    _options: ClassVar[dict[int, Callable[[Handshake, int, bytes], Any]]] = {
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }


def _matches(query: str, context: str) -> bool:
    """LIST_META_CONTEXT query semantics of qemu-nbd."""
    if query == context:
        return True
    if query == "base:":
        return context.startswith("base:")
    if query == "qemu:":
        return context.startswith("qemu:")
    if query == proto.DIRTY_BITMAP_PREFIX:
        return context.startswith(proto.DIRTY_BITMAP_PREFIX)
    return False
