"""The sidecar's NBD server: the disk read-only, with base:allocation and
qemu:dirty-bitmap:NAME block status, as ``qemu-nbd -B NAME`` serves it.

One ``Connection`` per client: the fixed-newstyle handshake, then the
transmission phase where every request runs as its own task and replies go
out whole, one chunk at a time, under a write lock (replies may come out of
order; chunks never interleave). ``../shared/nbd-interop.md`` lists what real
clients require; qemu-nbd 7.2 is the reference for every doubtful case.

Two kinds of failure: ``ProtocolError`` (or the client vanishing) ends that
connection only; ``RequestError`` fails one request with an errno. Nothing a
client sends makes the server allocate more than ``MAX_REQUEST`` bytes for one
request or ``MAX_OPTION`` for one option.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dirtydiff import nbdproto as proto
from dirtydiff.bitmapfile import BitmapFile, Reason, inconsistency
from dirtydiff.extents import extent_arrays
from dirtydiff.extents import extents as bitmap_extents
from dirtydiff.nbdproto import Cmd, CmdFlag, Errno, Opt, Rep, RequestError
from dirtydiff.state import SCAN_WRITES_PREFIX, StateDir
from nbd_plugins.backends import Backend
from nbd_plugins.backends import Connection as DiskConnection

log = logging.getLogger(__name__)

# Requests in flight per connection: enough to keep a disk busy.
MAX_IN_FLIGHT = 16
# Read buffers of all connections together: a client-given length never makes
# the server hold more than this (each read is at most MAX_REQUEST).
READ_BUDGET = 256 * 1024 * 1024
BLOCK_SIZES = (1, 4096, proto.MAX_REQUEST)


@dataclass
class Export:
    """What one export name serves: a disk and the bitmaps of a state dir."""

    name: str
    backend: Backend
    state: StateDir | None = None
    bitmap_filter: frozenset[str] | None = None  # --bitmap: only these
    description: str = ""
    sendfile_path: Path | None = None  # a local file: reads use sendfile(2)
    _open_bitmaps: dict[str, tuple[int, BitmapFile]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.backend.size

    def bitmap_names(self) -> list[str]:
        """Bitmaps this export offers: consistent ones, filtered, sorted."""
        if self.state is None:
            return []
        names = []
        for name in self.state.names():
            if self.bitmap_filter is not None and name not in self.bitmap_filter:
                continue
            if name.startswith(SCAN_WRITES_PREFIX):
                continue  # a scan's scratch bitmap, not a result
            try:
                header = self.state.read_header(name)
            except Exception as e:  # a corrupt or vanished file: not offered
                log.warning("bitmap %s not exported: %s", name, e)
                continue
            if header.disk_size != self.size:
                log.warning("bitmap %s not exported: it describes another disk size", name)
                continue
            why = inconsistency(header)
            if why is not Reason.NONE:
                log.warning("bitmap %s not exported: inconsistent (%s)", name, why.describe())
                continue
            names.append(name)
        return sorted(names)

    def contexts(self) -> list[str]:
        return [proto.BASE_ALLOCATION] + [
            proto.DIRTY_BITMAP_PREFIX + n for n in self.bitmap_names()
        ]

    def bitmap(self, name: str) -> BitmapFile:
        """The live bitmap, mapped read-only; reopened if the file was replaced."""
        assert self.state is not None
        path = self.state.bitmap_path(name)
        inode = os.stat(path).st_ino
        cached = self._open_bitmaps.get(name)
        if cached is not None and cached[0] == inode:
            return cached[1]
        bitmap = BitmapFile(path, writable=False)
        self._open_bitmaps[name] = (inode, bitmap)
        return bitmap


@dataclass
class Context:
    """A meta context selected by SET_META_CONTEXT."""

    id: int
    name: str
    # (count, offset, req_one) -> the BLOCK_STATUS descriptors (32-bit length,
    # 32-bit flags, big-endian) covering exactly [offset, offset+count)
    descriptors: Callable[[int, int, bool], bytes]
    # Whether descriptors() may block on I/O (then it runs in a thread); the
    # bitmap's is memory-only and quick, and a thread hop would cost more.
    blocking: bool = True


def _pack(lengths: Any, flags: Any) -> bytes:
    """Descriptors for many extents at once, packed by numpy."""
    out = np.empty((len(lengths), 2), dtype=">u4")
    out[:, 0] = lengths
    out[:, 1] = flags
    return out.tobytes()


def _merge(
    found: Iterable[tuple[int, int, int]], offset: int, count: int, one: bool
) -> list[tuple[int, int]]:
    """(offset, length, flags) -> (length, flags) covering exactly the request,
    neighbours merged; a range the source did not describe counts as data."""
    end = offset + count
    merged: list[list[int]] = []

    def add(length: int, flags: int) -> None:
        if merged and merged[-1][1] == flags:
            merged[-1][0] += length
        else:
            merged.append([length, flags])

    pos = offset
    for start, length, flags in found:
        stop = min(start + length, end)
        if stop <= pos:
            continue
        if start > pos:
            add(start - pos, 0)
        add(stop - max(start, pos), flags)
        pos = stop
        if pos >= end:
            break
    if pos < end:
        add(end - pos, 0)
    if one:
        merged = merged[:1]
    return [(length, flags) for length, flags in merged]


class Connection:
    def __init__(
        self,
        server: NbdServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.no_zeroes = False
        self.fixed = False
        self.export: Export | None = None
        self.contexts: list[Context] = []
        self.contexts_export: str | None = None
        self.disk: DiskConnection | None = None
        self._wlock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    # -- I/O helpers ---------------------------------------------------------

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
        async with self._wlock:
            for chunk in chunks:
                self.writer.write(chunk)
            await self.writer.drain()

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._transmission()
        except (asyncio.IncompleteReadError, ConnectionError, proto.ProtocolError) as e:
            log.info("client %s: connection ended: %s", self._peer(), e or type(e).__name__)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.disk is not None:
                await asyncio.to_thread(self.disk.close)
            with contextlib.suppress(Exception):
                self.writer.close()
                await self.writer.wait_closed()

    def _peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer) if peer else "unix"

    # -- handshake -----------------------------------------------------------

    async def _handshake(self) -> bool:
        """Negotiate; True when the transmission phase should start."""
        flags = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        await self._send(proto.SERVER_GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
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
                return await self._opt_export_name(length)
            if not self.fixed:
                raise proto.ProtocolError("option other than EXPORT_NAME without fixed newstyle")
            if length > proto.MAX_OPTION:
                await self._drain_bytes(length)
                await self._reply(option, Rep.ERR_TOO_BIG, b"option payload too large")
                continue
            payload = await self._read(length)
            if option == Opt.ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._reply(option, Rep.ACK)
                return False
            handler = self._options.get(option)
            if handler is None:
                await self._reply(option, Rep.ERR_UNSUP, b"option not supported")
                continue
            try:
                if await handler(self, option, payload):
                    return True
            except RequestError as e:
                await self._reply(option, Rep.ERR_INVALID, e.message.encode())

    async def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        await self._send(proto.option_reply(option, reply, payload))

    def _find_export(self, name: str) -> Export | None:
        return self.server.exports.get(name)

    def _transmission_flags(self) -> int:
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

    async def _opt_export_name(self, length: int) -> bool:
        if length > proto.MAX_STRING:
            raise proto.ProtocolError("export name too long")
        name = (await self._read(length)).decode(errors="replace")
        export = self._find_export(name)
        if export is None:
            raise proto.ProtocolError(f"unknown export {name!r}")  # spec: must disconnect
        reply = proto.EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags())
        if not self.no_zeroes:
            reply += bytes(proto.EXPORT_NAME_PADDING)
        await self._send(reply)
        await self._enter(export)
        return True

    async def _opt_list(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"LIST takes no payload")
            return False
        for export in self.server.exports.values():
            name = export.name.encode()
            await self._reply(
                option,
                Rep.SERVER,
                struct.pack("!I", len(name)) + name + export.description.encode(),
            )
        await self._reply(option, Rep.ACK)
        return False

    async def _opt_starttls(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STARTTLS takes no payload")
        else:
            await self._reply(option, Rep.ERR_POLICY, b"TLS not configured")
        return False

    async def _opt_structured_reply(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STRUCTURED_REPLY takes no payload")
        elif self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies already negotiated")
        else:
            self.structured = True
            await self._reply(option, Rep.ACK)
        return False

    async def _opt_info_go(self, option: int, payload: bytes) -> bool:
        name, requests = proto.parse_info_request(payload)
        export = self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return False
        info = proto.INFO_EXPORT.pack(proto.Info.EXPORT, export.size, self._transmission_flags())
        await self._reply(option, Rep.INFO, info)
        if proto.Info.NAME in requests:
            await self._reply(
                option, Rep.INFO, struct.pack("!H", proto.Info.NAME) + export.name.encode()
            )
        if proto.Info.DESCRIPTION in requests and export.description:
            await self._reply(
                option,
                Rep.INFO,
                struct.pack("!H", proto.Info.DESCRIPTION) + export.description.encode(),
            )
        await self._reply(
            option, Rep.INFO, proto.INFO_BLOCK_SIZE.pack(proto.Info.BLOCK_SIZE, *BLOCK_SIZES)
        )
        await self._reply(option, Rep.ACK)
        if option == Opt.GO:
            await self._enter(export)
            return True
        return False

    async def _opt_meta_context(self, option: int, payload: bytes) -> bool:
        if option == Opt.SET_META_CONTEXT and not self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies not negotiated")
            return False
        name, queries = proto.parse_string_list(payload)
        export = self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return False
        available = await asyncio.to_thread(export.contexts)
        if option == Opt.LIST_META_CONTEXT:
            chosen = [c for c in available if not queries or any(_matches(q, c) for q in queries)]
            for context in chosen:
                await self._reply(option, Rep.META_CONTEXT, struct.pack("!I", 0) + context.encode())
        else:
            wanted = set(queries)
            self.contexts = []
            self.contexts_export = export.name
            for index, context in enumerate(available):
                if context not in wanted:
                    continue
                # qemu-nbd's ids: 0 for base:allocation, 2 + i for bitmap i.
                number = 0 if index == 0 else index + 1
                self.contexts.append(self._context(export, number, context))
                await self._reply(
                    option, Rep.META_CONTEXT, struct.pack("!I", number) + context.encode()
                )
        await self._reply(option, Rep.ACK)
        return False

    _options: ClassVar[dict[int, Callable[[Connection, int, bytes], Any]]] = {
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    def _context(self, export: Export, number: int, name: str) -> Context:
        if name == proto.BASE_ALLOCATION:

            def allocation(count: int, offset: int, one: bool) -> bytes:
                assert self.disk is not None
                found = _merge(self.disk.extents(count, offset), offset, count, one)
                return b"".join(proto.EXTENT.pack(length, flags) for length, flags in found)

            return Context(number, name, allocation)
        bitmap = export.bitmap(name[len(proto.DIRTY_BITMAP_PREFIX) :])
        bits: Any = bitmap.bits

        def dirty(count: int, offset: int, one: bool) -> bytes:
            size = bitmap.header.disk_size
            if one:  # qemu-img map asks one extent at a time: no need to scan far
                first = bitmap_extents(bits, bitmap.granularity, size, offset, count, max_extents=1)
                return proto.EXTENT.pack(first[0].length, int(first[0].dirty))
            lengths, state = extent_arrays(
                bits, bitmap.granularity, size, offset, count, proto.MAX_EXTENTS
            )
            return _pack(lengths, state)  # STATE_DIRTY is bit 0: the bit itself

        return Context(number, name, dirty, blocking=False)

    async def _enter(self, export: Export) -> None:
        self.export = export
        if self.contexts_export != export.name:
            self.contexts = []  # the selection belongs to the export named in it
        self.disk = await asyncio.to_thread(export.backend.connect)

    # -- transmission --------------------------------------------------------

    async def _transmission(self) -> None:
        while True:
            header = await self._read(proto.REQUEST.size)
            try:
                request = proto.parse_request(header)
            except proto.ProtocolError:
                # As qemu-nbd: fail the garbled request by its cookie, then hang up.
                cookie = proto.REQUEST.unpack(header)[3]
                await self._fail(
                    proto.Request(0, 0, cookie, 0, 0), Errno.EINVAL, "bad request magic"
                )
                raise
            if request.type == Cmd.DISC:
                break
            if request.type == Cmd.WRITE:
                # Read-only: consume the payload (bounded) and fail the write.
                if request.length > proto.MAX_REQUEST:
                    raise proto.ProtocolError(f"write of {request.length} bytes is over the limit")
                await self._drain_bytes(request.length)
                # EINVAL, not EPERM: what qemu-nbd 7.2 answers on a read-only export.
                await self._fail(request, Errno.EINVAL, "export is read-only")
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(request))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _fail(self, request: proto.Request, errno: Errno, message: str) -> None:
        if self.structured:
            await self._send(proto.error_chunk(request.cookie, errno, message))
        else:
            await self._send(proto.simple_reply(request.cookie, errno))

    async def _handle(self, request: proto.Request) -> None:
        try:
            await self._dispatch(request)
        except RequestError as e:
            await self._fail(request, e.errno, e.message)
        except OSError as e:
            log.warning("request %s failed: %s", request, e)
            await self._fail(request, Errno.EIO, f"I/O error: {e.strerror or e}")

    def _check_range(self, request: proto.Request) -> None:
        assert self.export is not None
        size = self.export.size
        if request.offset > size or request.length > size - request.offset:
            raise RequestError(Errno.EINVAL, "request past the end of the export")

    async def _dispatch(self, request: proto.Request) -> None:
        kind, flags = request.type, request.flags
        allowed = {
            Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
            Cmd.FLUSH: 0,
            Cmd.CACHE: 0,
            Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
            Cmd.TRIM: CmdFlag.FUA,
            Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
        }
        if kind not in allowed:
            raise RequestError(Errno.EINVAL, f"unsupported command {kind}")
        if flags & ~int(allowed[Cmd(kind)]):
            raise RequestError(Errno.EINVAL, f"unsupported flags {flags:#x}")
        if kind in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            # Not advertised on a read-only export: qemu-nbd answers EINVAL too.
            raise RequestError(Errno.EINVAL, "export is read-only")
        if kind == Cmd.FLUSH:
            await self._ok(request)
        elif kind == Cmd.CACHE:
            self._check_range(request)
            await self._ok(request)
        elif kind == Cmd.READ:
            await self._read_request(request)
        else:
            await self._block_status(request)

    async def _ok(self, request: proto.Request) -> None:
        # Success of a command without data: a simple reply even once
        # structured replies are negotiated (the spec allows it; qemu does it).
        await self._send(proto.simple_reply(request.cookie))

    async def _read_request(self, request: proto.Request) -> None:
        """Answer a READ. With structured replies and no DF flag, zero ranges
        go out as OFFSET_HOLE chunks and data as OFFSET_DATA, one chunk per
        allocation extent, as qemu-nbd does; otherwise one data chunk."""
        if request.length > proto.MAX_REQUEST:
            raise RequestError(Errno.EINVAL, f"read of {request.length} bytes is over the limit")
        self._check_range(request)
        async with self.server.read_budget.hold(request.length):
            await self._read_reply(request)

    async def _read_reply(self, request: proto.Request) -> None:
        assert self.export is not None and self.disk is not None
        disk = self.disk
        if not self.structured:
            buf = bytearray(request.length)
            if request.length:
                await asyncio.to_thread(disk.pread, buf, request.offset)
            await self._send(proto.simple_reply(request.cookie), buf)
            return
        if request.length == 0:
            await self._send(
                proto.structured_chunk(request.cookie, proto.ReplyType.NONE, b"", done=True)
            )
            return
        chunks = await asyncio.to_thread(
            _read_chunks, disk, request.cookie, request.offset, request.length,
            sparse=not request.flags & CmdFlag.DF,
        )  # fmt: skip
        await self._send(*chunks)

    async def _block_status(self, request: proto.Request) -> None:
        if not self.structured or not self.contexts:
            raise RequestError(Errno.EINVAL, "no meta context negotiated")
        if request.length == 0:
            raise RequestError(Errno.EINVAL, "block status of zero bytes")
        self._check_range(request)
        one = bool(request.flags & CmdFlag.REQ_ONE)
        chunks = []
        for i, context in enumerate(self.contexts):
            if context.blocking:
                descriptors = await asyncio.to_thread(
                    context.descriptors, request.length, request.offset, one
                )
            else:
                descriptors = context.descriptors(request.length, request.offset, one)
            payload = proto.BLOCK_STATUS_ID.pack(context.id) + descriptors
            chunks.append(
                proto.structured_chunk(
                    request.cookie,
                    proto.ReplyType.BLOCK_STATUS,
                    payload,
                    done=i == len(self.contexts) - 1,
                )
            )
        await self._send(*chunks)


def _read_chunks(
    disk: DiskConnection, cookie: int, offset: int, length: int, *, sparse: bool
) -> list[bytes | bytearray]:
    """The chunks of a structured READ reply, made in one worker-thread call:
    with ``sparse``, zero ranges as OFFSET_HOLE and data as OFFSET_DATA, one
    chunk per allocation extent, as qemu-nbd does; else one data chunk."""
    pieces = (
        _merge(disk.extents(length, offset), offset, length, False) if sparse else [(length, 0)]
    )
    chunks: list[bytes | bytearray] = []
    for i, (size, flags) in enumerate(pieces):
        done = i == len(pieces) - 1
        if flags & proto.STATE_ZERO:
            hole = proto.OFFSET_HOLE.pack(offset, size)
            chunks.append(
                proto.structured_chunk(cookie, proto.ReplyType.OFFSET_HOLE, hole, done=done)
            )
        else:
            buf = bytearray(size)
            disk.pread(buf, offset)
            flag = proto.REPLY_FLAG_DONE if done else 0
            header = proto.STRUCTURED_REPLY.pack(
                proto.STRUCTURED_REPLY_MAGIC, flag, proto.ReplyType.OFFSET_DATA, cookie, 8 + size
            )
            chunks += [header + proto.OFFSET.pack(offset), buf]
        offset += size
    return chunks


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


class ByteBudget:
    """Bytes of read buffers the server may hold at once, across clients."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> Any:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n
                self._changed.notify_all()


class NbdServer:
    def __init__(self, exports: Iterable[Export], read_budget: int = READ_BUDGET) -> None:
        self.exports = {e.name: e for e in exports}
        self.read_budget = ByteBudget(read_budget)
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception:
            log.exception("connection failed")  # one client's bug never stops the server
        finally:
            self.connections.discard(connection)

    async def listen_unix(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._servers.append(await asyncio.start_unix_server(self._client, path=str(path)))

    async def listen_tcp(self, host: str, port: int) -> int:
        server = await asyncio.start_server(self._client, host=host, port=port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
