"""The transmission phase of one connection: the request loop, the
dispatch of each request, reads and block status.

Requests are parsed as bytes arrive, in the transport's callback. One that
needs no waiting (a read of a local file, a bitmap's block status, errors)
is answered at once in the event loop; one that may block (reads and
allocation through libnbd, SEEK_DATA over a large range) runs as its own
task. Every reply is queued whole on the ``Sender``; replies may come out
of order, chunks never interleave. At most ``MAX_IN_FLIGHT`` requests of a
connection are in flight: then the transport stops reading, so what one
client makes the server hold stays bounded.

Two kinds of failure: ``ProtocolError`` (or the client vanishing) ends the
connection; ``RequestError`` fails one request with an errno. Nothing a
client sends makes the server allocate more than ``MAX_REQUEST`` bytes for
one request, and read buffers count against the server's ``ByteBudget``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any

from dirtydiff import nbdproto as proto
from dirtydiff.disk import Connection as DiskConnection
from dirtydiff.nbdproto import Cmd, CmdFlag, Errno, RequestError
from sidecar.export.aioupstream import SnapshotLease
from sidecar.export.budget import ByteBudget
from sidecar.export.contexts import Export, Status
from sidecar.export.handshake import Session
from sidecar.export.sender import Part, Region, Sender, TlsSender, resolve
from sidecar.export.stats import ServerStats

log = logging.getLogger(__name__)

# Receive buffer of a connection in the transmission phase: thousands of
# request headers.
_INPUT = 64 * 1024
# Requests in flight per connection (accepted, reply not yet handed to the
# kernel): enough to keep a disk busy, and the bound on what one client can
# make the server queue when it stops reading replies.
MAX_IN_FLIGHT = 16
SNAPSHOT_SNDBUF = 4 * 1024 * 1024


# Plain ints for the hot paths: operators on IntFlag members build new members.
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DF = int(CmdFlag.DF)
# Flags each command accepts; anything else is EINVAL, as in qemu-nbd. FUA is
# on every command: the export advertises SEND_FUA, and the spec then says a
# server MUST accept it everywhere (it means nothing on a read-only export).
# DF only once structured replies are negotiated: it is about their chunks.
_FUA = int(CmdFlag.FUA)
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: _FUA,
    Cmd.FLUSH: _FUA,
    Cmd.CACHE: _FUA,
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
    Cmd.TRIM: _FUA,
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
}


class Transmission:
    """The transmission phase of one connection (``await run()``), from the
    end of its handshake to NBD_CMD_DISC or the end of the stream."""

    def __init__(
        self,
        holder: object,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        disk: DiskConnection,
        file_fd: int,
        stats: ServerStats,
        budget: ByteBudget,
        active: float,
    ) -> None:
        self._holder = holder  # what holds read buffers of the budget: the connection
        self.reader = reader
        self.writer = writer
        self.structured = session.structured
        self.export: Export = session.export
        # The selection is final once the handshake is over.
        self._statuses: list[tuple[int, Status]] = [
            (context.id, context.status(disk, file_fd, session.export.size))
            for context in session.contexts
        ]
        self.disk = disk
        self._file_fd = file_fd  # the disk's fd when it is a local file: reads use sendfile
        self._stats = stats
        self._budget = budget
        self.active = active  # when it last sent a byte or had a reply sent
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls = session.tls  # replies through the TLS transport, not the socket
        self._sender: Sender | TlsSender | None = None  # set when run() starts
        self._pending = 0  # requests accepted whose replies are not all sent
        # The request parser (see run): bytes received are _input[_head:_tail].
        self._input = bytearray()
        self._head = self._tail = 0
        self._skip = 0  # payload bytes of a refused write still to discard
        self._skipping: proto.Request | None = None  # ...and that write
        self._paused = False  # MAX_IN_FLIGHT reached: the transport stopped reading
        self._resuming = False
        self._ended: asyncio.Future[None] | None = None
        # Whether block status needs a task (and a thread).
        self._status_blocks = any(status.blocking for _, status in self._statuses)

    async def stop(self) -> None:
        """Cancel what is in flight, stop sending, and let go of the bitmaps
        it chose now, not when the collector finds this connection's cycles:
        a removed bitmap's file is then closed and unmapped (its space
        freed) as its last connection ends."""
        for task in list(self._tasks):
            task.cancel()
        await self._wait_for_tasks()
        if self._sender is not None:
            self._sender.close()
        self._statuses = []

    async def _send(self, *chunks: bytes | bytearray) -> None:
        """Send chunks whole; return once they are with the kernel."""
        assert self._sender is not None
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sender.push(chunks, functools.partial(resolve, sent))
        await sent

    async def _send_reply(self, chunks: list[bytes | bytearray]) -> None:
        """``_send`` for a reply holding read buffers, letting go of them as
        they are queued (``chunks`` is emptied). If the connection ends
        first, the request's frames stay in its CancelledError's traceback,
        in a cycle that only the cyclic collector breaks, and an idle server
        may not run it for long: its buffers, up to 32 MiB each, must not be
        there. (Seen: 8 MB that stayed after clients that never read.)"""
        assert self._sender is not None
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sender.push(chunks, functools.partial(resolve, sent))
        chunks.clear()
        await sent

    def _reply_now(self, *parts: Part) -> None:
        """Queue the whole reply of a request answered without a task; its
        slot frees once the reply is sent."""
        assert self._sender is not None
        self._sender.push(parts, self._release)

    def _release(self) -> None:
        self._pending -= 1
        if not self._pending:
            self.active = time.monotonic()
        if self._paused and not self._resuming:
            # Not from here: a reply's mark runs inside the sender's flush,
            # and parsing queues more replies on that sender.
            self._resuming = True
            asyncio.get_running_loop().call_soon(self._resume)

    def _transport(self) -> asyncio.Transport:
        transport = self.writer.transport
        assert isinstance(transport, asyncio.Transport)  # a socket's: it reads too
        return transport

    def _broken(self, error: OSError) -> None:
        """Writing failed (the client went away): end the connection."""
        log.info("client %s: send failed: %s", peer(self.writer), error)
        self.writer.transport.abort()

    async def run(self) -> None:
        """Requests are parsed as bytes arrive, in the transport's callback,
        from a buffer it receives into: a StreamReader costs a future, a
        task wake-up and a second loop iteration per request, and asyncio's
        plain protocols a fresh 256 KiB bytes object per receive. Clients
        like nbdinfo --map wait for each reply before the next request, so
        this is their latency. This coroutine only waits for the end."""
        transport = self._transport()
        if self._tls:
            self._sender = TlsSender(transport, self._broken)
        else:
            if transport.get_write_buffer_size():
                # Replies now bypass the transport: whatever it still holds of
                # the handshake must go first.
                transport.set_write_buffer_limits(high=0)
                await self.writer.drain()
            sock = transport.get_extra_info("socket")
            if self.export.snapshot is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNAPSHOT_SNDBUF)
            self._sender = Sender(sock.fileno(), self._broken)
        self._ended = asyncio.get_running_loop().create_future()
        stream = transport.get_protocol()
        assert isinstance(stream, StreamProtocol)
        # What the client sent after its last option is still in the reader;
        # EOF makes it hand all of that over without waiting.
        self.reader.feed_eof()
        leftover = await self.reader.read()
        self._input = bytearray(max(_INPUT, 2 * len(leftover)))
        self._input[: len(leftover)] = leftover
        self._tail = len(leftover)
        transport.set_protocol(_Intake(self, stream))
        self._parse()
        if stream.done:  # the stream ended before the switch
            self._lost(stream.error)
        try:
            await self._ended
        except proto.ProtocolError:
            await self._sender.flushed()  # qemu-nbd's last words (bad magic) first
            raise
        # NBD_CMD_DISC: finish what is in flight, send nothing more, close.
        await self._wait_for_tasks()
        await self._sender.flushed()

    async def _wait_for_tasks(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _end(self, error: BaseException | None) -> None:
        if self._ended is not None and not self._ended.done():
            self._transport().pause_reading()  # nothing more is read
            if error is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(error)

    def _lost(self, error: Exception | None) -> None:
        """The client's side of the stream ended (EOF or the connection
        broke): as a StreamReader's readexactly would have reported it."""
        if error is None:
            partial = bytes(self._input[self._head : self._tail])
            error = asyncio.IncompleteReadError(partial, proto.REQUEST.size)
        self._end(error)

    def _get_buffer(self) -> memoryview:
        """Where the transport receives to: after what is not parsed yet.
        Reading pauses whenever parsing stops short of the end (requests in
        flight at the limit, or the end of the connection), so room is only
        ever short of a request header here."""
        data = self._input
        if len(data) - self._tail < _INPUT // 2:
            size = self._tail - self._head
            data[:size] = data[self._head : self._tail]
            self._head, self._tail = 0, size
        return memoryview(data)[self._tail :]

    def _buffer_updated(self, size: int) -> None:
        self._tail += size
        self.active = time.monotonic()
        self._parse()

    def stalled(self, now: float) -> float:
        """Seconds its socket has taken nothing of the replies queued."""
        return self._sender.stalled(now) if self._sender is not None else 0.0

    def _writing(self, flowing: bool) -> None:
        """The transport's flow control; only a TLS sender writes through it."""
        if isinstance(self._sender, TlsSender):
            self._sender.writable(flowing)

    def idle(self, now: float) -> float:
        """Seconds since it was last active, in transmission with nothing in
        flight; 0 otherwise."""
        if self._sender is None or self._pending:
            return 0.0
        return now - self.active

    def _resume(self) -> None:
        self._resuming = False
        assert self._ended is not None
        if self._paused and self._pending < MAX_IN_FLIGHT and not self._ended.done():
            self._paused = False
            self._parse()
            if not self._paused and not self._ended.done():
                self._transport().resume_reading()

    def _parse(self) -> None:
        """Act on every whole request received, until MAX_IN_FLIGHT are
        pending (then the transport stops reading: what a client may make
        the server hold stays bounded)."""
        assert self._ended is not None
        data, pos, tail = self._input, self._head, self._tail
        parse = proto.parse_request
        try:
            while not self._ended.done():
                if self._skipping is not None:
                    taken = min(self._skip, tail - pos)
                    pos += taken
                    self._skip -= taken
                    if self._skip:
                        break
                    self._reply_now(self._refused(self._skipping))
                    self._skipping = None
                if tail - pos < proto.REQUEST.size:
                    break
                if self._pending >= MAX_IN_FLIGHT:
                    if not self._paused:
                        self._paused = True
                        self._transport().pause_reading()
                    break
                try:
                    request = parse(data, pos)
                except proto.BadRequestMagic as e:
                    # As qemu-nbd: fail the garbled request by its cookie, then hang up.
                    self._pending += 1
                    garbled = proto.Request(0, 0, e.cookie, 0, 0)
                    self._reply_now(self._error(garbled, Errno.EINVAL, "bad request magic"))
                    raise
                pos += proto.REQUEST.size
                self._request(request)
        except Exception as e:  # ends this connection only: run() reports it
            self._end(e)
        finally:
            self._head = pos

    def _request(self, request: proto.Request) -> None:
        self._stats.request(request.type)
        if request.type == Cmd.DISC:
            self._end(None)
            return
        self._pending += 1
        if request.type == Cmd.WRITE:
            # Read-only: consume the payload (bounded) and fail the write.
            if request.length > proto.MAX_REQUEST:
                raise proto.ProtocolError(f"write of {request.length} bytes is over the limit")
            self._skip, self._skipping = request.length, request
            return
        try:
            rest = self._dispatch(request)
        except RequestError as e:
            self._reply_now(self._error(request, e.errno, e.message))
            return
        except OSError as e:
            self._reply_now(self._io_error(request, e))
            return
        if rest is not None:  # it may block: a task of its own
            task = asyncio.create_task(self._finish(request, rest))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, rest))

    def _done(self, rest: Coroutine[Any, Any, object], task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step (the connection ended in
        # the same read) never started ``rest``: close it, or it is reported
        # as never awaited. Closing one that ran is a no-op.
        rest.close()
        self._tasks.discard(task)
        self._release()

    def _error(self, request: proto.Request, errno: Errno, message: str) -> bytes:
        self._stats.error(errno.name)
        if self.structured:
            return proto.error_chunk(request.cookie, errno, message)
        return proto.simple_reply(request.cookie, errno)

    def _io_error(self, request: proto.Request, e: OSError) -> bytes:
        log.warning("request %s failed: %s", request, e)
        return self._error(request, Errno.EIO, f"I/O error: {e.strerror or e}")

    async def _fail(self, request: proto.Request, errno: Errno, message: str) -> None:
        await self._send(self._error(request, errno, message))

    async def _finish(
        self, request: proto.Request, rest: Coroutine[Any, Any, list[bytes | bytearray]]
    ) -> None:
        """The part of a request that may block, then its reply."""
        try:
            chunks = await rest
        except RequestError as e:
            await self._fail(request, e.errno, e.message)
        except OSError as e:
            await self._send(self._io_error(request, e))
        else:
            if chunks:
                await self._send(*chunks)

    def _check_range(self, request: proto.Request) -> None:
        assert self.export is not None
        size = self.export.size
        if request.offset > size or request.length > size - request.offset:
            raise RequestError(Errno.EINVAL, "request past the end of the export")

    def _dispatch(
        self, request: proto.Request
    ) -> Coroutine[Any, Any, list[bytes | bytearray]] | None:
        """Answer a request now if nothing in it can block; else return the
        coroutine that makes the reply's chunks."""
        kind, flags = request.type, request.flags
        allowed = _ALLOWED_FLAGS.get(kind)
        if allowed is None:
            raise RequestError(Errno.EINVAL, f"unsupported command {kind}")
        if kind == Cmd.READ and self.structured:
            allowed |= _DF
        if flags & ~allowed:
            raise RequestError(Errno.EINVAL, f"unsupported flags {flags:#x}")
        if kind == Cmd.READ:
            if request.length > proto.MAX_REQUEST:
                raise RequestError(
                    Errno.EINVAL, f"read of {request.length} bytes is over the limit"
                )
            self._check_range(request)
            if self._file_fd < 0:
                return self._read_buffered(request)
            self._read_file(request)
        elif kind == Cmd.BLOCK_STATUS:
            self._check_block_status(request)
            if self._status_blocks:
                return self._block_status(request)
            one = bool(flags & _REQ_ONE)
            self._reply_now(*self._status_chunks(request, [
                status.descriptors(request.length, request.offset, one)
                for _, status in self._statuses
            ]))  # fmt: skip
        elif kind == Cmd.TRIM and self.export.snapshot is not None:
            self._check_range(request)
            return self._trim(request)
        elif kind in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            raise self._refusal()
        else:
            if kind == Cmd.CACHE:
                self._check_range(request)
            # Success of a command without data (FLUSH, CACHE): a simple reply
            # even once structured replies are negotiated (the spec allows it;
            # qemu does it).
            self._reply_now(proto.simple_reply(request.cookie))
        return None

    def _refusal(self) -> RequestError:
        """What a write or write-zeroes gets: on the live export EINVAL, what
        qemu-nbd 7.2 answers on a read-only export (it advertises neither);
        on a snapshot's, EPERM: it takes TRIM, so it is not read-only, but
        the disk as it was is not to be changed."""
        if self.export.snapshot is not None:
            return RequestError(Errno.EPERM, "a snapshot export takes no writes, only TRIM")
        return RequestError(Errno.EINVAL, "export is read-only")

    def _refused(self, request: proto.Request) -> bytes:
        refusal = self._refusal()
        return self._error(request, refusal.errno, refusal.message)

    async def _trim(self, request: proto.Request) -> list[bytes | bytearray]:
        """TRIM of a snapshot's export: the backup is done with the range.
        Sent to the tracker, which stops protecting the whole granules in it
        and frees their store space; the reply says it did."""
        assert isinstance(self.disk, SnapshotLease)
        if request.length:
            await self.disk.atrim(request.length, request.offset, bool(request.flags & _FUA))
        return [proto.simple_reply(request.cookie)]

    def _sparse(self, request: proto.Request) -> bool:
        """Whether a READ's reply is split by the disk's allocation: with
        structured replies, unless the client set DF (don't fragment). A
        snapshot's has no allocation to ask: it is all data."""
        if self.export.snapshot is not None:
            return False
        return self.structured and request.length > 0 and not request.flags & _DF

    def _read_file(self, request: proto.Request) -> None:
        """Answer a READ of the local disk file, data by sendfile."""
        assert self.disk is not None
        fd, offset, length = self._file_fd, request.offset, request.length
        allocation = self.disk.extents(length, offset) if self._sparse(request) else None
        parts: list[Part] = []
        for header, start, size in proto.read_reply(
            request.cookie, offset, length, structured=self.structured, allocation=allocation
        ):
            parts.append(header)
            if size:
                parts.append(Region(fd, start, size))
        self._reply_now(*parts)

    async def _read_buffered(self, request: proto.Request) -> list[bytes | bytearray]:
        """A READ through the backend (libnbd), into buffers that count
        against the read budget until the reply is sent."""
        assert self.disk is not None
        snapshot = self.disk if isinstance(self.disk, SnapshotLease) else None
        async with self._budget.hold(self._holder, request.length) as held:
            if request.length and snapshot is not None:
                chunks = await _read_snapshot(snapshot, request, self.structured)
                await held.keep(request.length)
                buffers = [c for c in chunks if isinstance(c, bytearray)]
                await self._send_reply(chunks)
                snapshot.recycle(buffers)  # sent: the kernel has their bytes
                return []
            if request.length:
                chunks = await asyncio.to_thread(
                    _read_disk, self.disk, request, self.structured, self._sparse(request)
                )
                # Until it is sent, the reply holds only its data: a hole's
                # chunk is a few bytes, whatever length it covers.
                await held.keep(sum(len(c) for c in chunks if isinstance(c, bytearray)))
            else:
                chunks = [
                    header
                    for header, _, _ in proto.read_reply(
                        request.cookie, request.offset, 0, structured=self.structured
                    )
                ]
            await self._send_reply(chunks)
        return []

    def _check_block_status(self, request: proto.Request) -> None:
        if not self.structured or not self._statuses:
            raise RequestError(Errno.EINVAL, "no meta context negotiated")
        if request.length == 0:
            raise RequestError(Errno.EINVAL, "block status of zero bytes")
        self._check_range(request)

    async def _block_status(self, request: proto.Request) -> list[bytes | bytearray]:
        one = bool(request.flags & _REQ_ONE)
        found = []
        for _, status in self._statuses:
            if status.blocking:
                found.append(
                    await asyncio.to_thread(status.descriptors, request.length, request.offset, one)
                )
            else:
                found.append(status.descriptors(request.length, request.offset, one))
        return self._status_chunks(request, found)

    def _status_chunks(self, request: proto.Request, found: list[bytes]) -> list[bytes | bytearray]:
        """One BLOCK_STATUS chunk per selected context, DONE on the last;
        each chunk as its header and its descriptors, which writev sends
        without another copy."""
        chunks: list[bytes | bytearray] = []
        last = len(self._statuses) - 1
        for i, ((context_id, _), descriptors) in enumerate(zip(self._statuses, found, strict=True)):
            header = proto.block_status_header(
                request.cookie, context_id, len(descriptors), done=i == last
            )
            chunks += (header, descriptors)
        return chunks


def _read_disk(
    disk: DiskConnection, request: proto.Request, structured: bool, sparse: bool
) -> list[bytes | bytearray]:
    """The reply to a READ, its data read from ``disk``: in one worker-thread
    call, the allocation (when ``sparse``) and every pread."""
    allocation = disk.extents(request.length, request.offset) if sparse else None
    chunks: list[bytes | bytearray] = []
    for header, offset, length in proto.read_reply(
        request.cookie, request.offset, request.length,
        structured=structured, allocation=allocation,
    ):  # fmt: skip
        chunks.append(header)
        if length:
            data = bytearray(length)
            disk.pread(data, offset)
            chunks.append(data)
    return chunks


async def _read_snapshot(
    snapshot: SnapshotLease, request: proto.Request, structured: bool
) -> list[bytes | bytearray]:
    """The reply to a READ of a snapshot, its data read through the tracker
    in the event loop (``sidecar.export.aioupstream``): all data, no holes."""
    chunks: list[bytes | bytearray] = []
    for header, offset, length in proto.read_reply(
        request.cookie, request.offset, request.length, structured=structured
    ):
        chunks.append(header)
        if length:
            data = snapshot.buffer(length)
            await snapshot.aread(data, offset)
            chunks.append(data)
    return chunks


class StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol (the handshake's), remembering whether the
    stream ended: after EOF the transport reads no more, so the protocol
    that takes over for the transmission phase would never hear of it."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.done = False
        self.error: Exception | None = None
        self.over_tls = False  # set once STARTTLS put a TLS transport under it

    def eof_received(self) -> bool | None:
        self.done = True
        keep_open = super().eof_received()
        # A TLS stream cannot stay half-open (asyncio warns if asked to).
        return False if self.over_tls else keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.error = self.error or exc
        super().connection_lost(exc)


class _Intake(asyncio.BufferedProtocol):
    """The transmission phase's protocol: the transport receives straight
    into the connection's request buffer. The stream protocol still hears
    how the connection ends (its writer waits on that to close)."""

    def __init__(self, connection: Transmission, stream: StreamProtocol) -> None:
        self._connection = connection
        self._stream = stream

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._connection._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._connection._buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        self._connection._lost(None)
        return self._stream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._lost(exc)
        self._stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self._connection._writing(False)
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._connection._writing(True)
        self._stream.resume_writing()


def peer(writer: asyncio.StreamWriter) -> str:
    """The client's address, for the log."""
    peer = writer.get_extra_info("peername")
    return str(peer) if peer else "unix"
