"""The export's server: its listeners, its connections, and the limits on
them together (how many, how long a handshake may take, the read budget,
clients whose replies stall). ``sidecar.listener`` accepts the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from dirtydiff import nbdproto as proto
from sidecar import memory
from sidecar.export.budget import ByteBudget
from sidecar.export.catalog import ExportCatalog, SnapshotSource
from sidecar.export.connection import Connection
from sidecar.export.contexts import Export
from sidecar.export.stats import ServerStats
from sidecar.export.tls import TlsCreds
from sidecar.export.transmission import StreamProtocol
from sidecar.limits import HANDSHAKE_LIMIT, MAX_CONNECTIONS
from sidecar.listener import Listener, Throttle, tcp_sockets, unix_socket

log = logging.getLogger(__name__)

# Read buffers of all connections together: a client-given length never makes
# the server hold more than this (each read is at most MAX_REQUEST).
READ_BUDGET = 256 * 1024 * 1024
# ... and of one connection: a buffer is held until its reply is with the
# kernel, so a client that stops reading its replies keeps what it holds; it
# may not hold the whole budget and stall every other client's reads.
CONNECTION_READ_BUDGET = 2 * proto.MAX_REQUEST
# But four such clients held it all. A connection holding read buffers whose
# socket has taken no byte of its replies for REPLY_STALL seconds while
# another client waits for the budget is closed, its buffers freed; and one
# that has taken none for REPLY_DEADLINE seconds, whoever waits.
REPLY_STALL = 2.0
REPLY_DEADLINE = 60.0
# Once the budget is idle after this much was given back, the free pages go
# back to the system (sidecar.memory says why that takes doing).
TRIM_AFTER = 32 * 1024 * 1024
# How often the server looks for connections past their handshake limit, or
# whose replies stalled.
WATCH_INTERVAL = 0.2
# Seconds a client in transmission must have been idle (nothing in flight)
# before the connection limit may close it for a new client.
IDLE_EVICTABLE = 1.0


class NbdServer:
    """The export's listeners and connections, and the limits on them.

    - At most ``max_connections`` at once. When that many are open, one is
      closed to make room: the one that has been negotiating longest (a
      client still in its handshake has nothing in flight: what a flood of
      idle connections is made of), else the one idle longest, if for
      ``IDLE_EVICTABLE`` at least; else the new one is closed. So clients
      that connect and then wait cannot keep everyone else out.
    - A client that has not sent NBD_OPT_GO or EXPORT_NAME within
      ``handshake_limit`` seconds is closed.
    - A client that holds read buffers and reads nothing of its replies is
      closed after REPLY_STALL seconds if others wait for the read budget,
      else after REPLY_DEADLINE.
    - What the clients make it do or hold is logged at a bounded rate.
    """

    def __init__(
        self,
        exports: Iterable[Export],
        read_budget: int = READ_BUDGET,
        *,
        max_connections: int = MAX_CONNECTIONS,
        handshake_limit: float = HANDSHAKE_LIMIT,
        snapshots: SnapshotSource | None = None,
    ) -> None:
        self.exports = {e.name: e for e in exports}
        # What clients choose from: these, and the snapshots found as they ask.
        self.catalog = ExportCatalog(self.exports, snapshots)
        self.read_budget = ByteBudget(read_budget, min(read_budget, CONNECTION_READ_BUDGET))
        self.max_connections = max_connections
        self.handshake_limit = handshake_limit
        self.connections: set[Connection] = set()
        self.stats = ServerStats()
        self._negotiating: dict[Connection, None] = {}  # in their handshake, oldest first
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._refusals = Throttle()
        self._evictions = Throttle()
        self._timeouts = Throttle()
        self._stalls = Throttle()
        self._trim: asyncio.Task[None] | None = None
        self._was_empty = True  # the read budget, at the watchdog's last look

    # -- connections -------------------------------------------------------

    def _accepted(self, sock: socket.socket, tls: TlsCreds | None = None) -> None:
        if len(self.connections) >= self.max_connections and not self._make_room():
            sock.close()
            self.stats.error("refused")
            self._refusals.warn(
                "export: connection refused: %d clients, the limit (--max-connections)",
                len(self.connections),
            )
            return
        connection = Connection(self.catalog, self.stats, self.read_budget, self.negotiated, tls)
        self.connections.add(connection)
        self._negotiating[connection] = None
        task = asyncio.create_task(self._serve(connection, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> bool:
        """Close the connection negotiating longest, or else the one idle
        longest; False if none may go."""
        for oldest in self._negotiating:
            self._end(oldest, "evicted")
            self._evictions.warn(
                "export: %d clients, the limit (--max-connections): closed the one "
                "negotiating longest to make room",
                self.max_connections,
            )
            return True
        now = time.monotonic()
        idlest = max(self.connections, key=lambda c: c.idle(now), default=None)
        if idlest is None or idlest.idle(now) < IDLE_EVICTABLE:
            return False
        self._evictions.warn(
            "export: %d clients, the limit (--max-connections): closed the one idle "
            "longest (%.0f s) to make room",
            self.max_connections, idlest.idle(now),
        )  # fmt: skip
        self._end(idlest, "evicted")
        return True

    def _end(self, connection: Connection, kind: str) -> None:
        """End ``connection`` now; it no longer counts against the limit."""
        self._negotiating.pop(connection, None)
        self.connections.discard(connection)
        self.stats.error(kind)
        connection.abort()

    def negotiated(self, connection: Connection) -> None:
        """``connection`` finished its handshake: no deadline, no eviction."""
        self._negotiating.pop(connection, None)

    async def _serve(self, connection: Connection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            protocol = StreamProtocol(reader)
            try:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
            except BaseException:
                sock.close()
                raise
            connection.attach(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
            self.stats.connections_total += 1
            await connection.run()
        except Exception:
            log.exception("connection failed")  # one client's bug never stops the server
        finally:
            self._negotiating.pop(connection, None)
            self.connections.discard(connection)

    async def _watching(self) -> None:
        """Close the connections past their handshake limit, oldest first,
        and those whose replies stalled (REPLY_STALL, REPLY_DEADLINE)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            while self._negotiating:
                oldest = next(iter(self._negotiating))
                if now - oldest.started < self.handshake_limit:
                    break
                self._end(oldest, "handshake-timeout")
                self._timeouts.warn(
                    "export: closed a client that had not finished its handshake in %g s",
                    self.handshake_limit,
                )
            budget = self.read_budget
            if not budget.held:
                # Empty since the last look too: the connections that held
                # it have let go of their queues as well (they give the
                # budget back first).
                if budget.returned >= TRIM_AFTER and self._was_empty and self._trim is None:
                    budget.returned = 0
                    self._trim = asyncio.create_task(asyncio.to_thread(memory.release))
                    self._trim.add_done_callback(self._trimmed)
                self._was_empty = True
                continue
            self._was_empty = False
            patience = REPLY_STALL if budget.starved() else REPLY_DEADLINE
            for holder, held in list(budget.held.items()):
                assert isinstance(holder, Connection)
                stalled = holder.stalled(now)
                # (One ended already lets go of its buffers as its tasks end.)
                if stalled >= patience and holder in self.connections:
                    self._end(holder, "stalled")
                    self._stalls.warn(
                        "export: closed a client that had read nothing of its replies for "
                        "%.0f s, holding %d MiB of read buffers",
                        stalled, held >> 20,
                    )  # fmt: skip

    # -- listeners -----------------------------------------------------------

    def _trimmed(self, task: asyncio.Task[None]) -> None:
        self._trim = None

    def _listen(self, sock: socket.socket, tls: TlsCreds | None) -> None:
        """Serve the clients of ``sock``; with ``tls``, only over TLS."""
        accepted = functools.partial(self._accepted, tls=tls) if tls is not None else self._accepted
        self._listeners.append(Listener(sock, accepted, "export"))
        if self._watch is None:
            self._watch = asyncio.create_task(self._watching())

    async def listen_unix(self, path: Path, tls: TlsCreds | None = None) -> None:
        self._listen(unix_socket(path), tls)

    async def listen_tcp(self, host: str, port: int, tls: TlsCreds | None = None) -> int:
        sockets = tcp_sockets(host, port)
        for sock in sockets:
            self._listen(sock, tls)
        bound: int = sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
