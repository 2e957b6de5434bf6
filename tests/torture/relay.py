"""A unix-socket relay in front of an NBD server that can hold a client still.

``HoldingRelay(upstream, sock)`` passes every byte both ways, except that the
first transmission request any client sends (after its handshake) is held
until ``release``: the client then waits on that request, wherever its own
code is. ``bitmap import`` connects to its source, creates its bitmap, and
only then asks for block status, so holding that request holds the import
half way, whatever the machine's speed.

What the client sends is parsed just enough to tell the handshake from
transmission (NBD's fixed-newstyle negotiation)::

    C: 32 bits, client flags
    C: 64 bits, 0x49484156454F5054 ('IHAVEOPT'), 32 bits option, 32 bits length,
       then length bytes of data                     (each option, until GO)
    C: 32 bits, 0x25609513 (request magic), ...      (transmission)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

# C: 64 bits magic, 32 bits option, 32 bits length of the data that follows
OPTION_HEADER = struct.Struct("!QII")
REQUEST_MAGIC = struct.pack("!I", 0x25609513)
CLIENT_FLAGS = 4
JOIN_DEADLINE = 10.0


class HoldingRelay:
    def __init__(self, upstream: Path, sock: Path) -> None:
        self.upstream = upstream
        self.sock = sock
        self.held = threading.Event()  # a client's first request is waiting
        self._released = threading.Event()
        self._holding_taken = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        sock.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(sock))
        self._listener.listen(8)
        self._spawn(self._accept, "relay-accept")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        """Release, stop accepting, close every connection, join the threads."""
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(JOIN_DEADLINE)
        for s in sockets:
            s.close()
        self.sock.unlink(missing_ok=True)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with self._lock:
                self._sockets += [client, server]
            try:
                server.connect(str(self.upstream))
            except OSError:
                client.close()
                continue
            self._spawn(self._copy, "relay-down", server, client)
            self._spawn(self._client_to_server, "relay-up", client, server)

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _hold_first_request(self) -> None:
        with self._lock:
            first = not self._holding_taken
            self._holding_taken = True
        if first:
            self.held.set()
            self._released.wait()

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        """The handshake passes; the first request waits for ``release``;
        then everything passes."""
        pending = b""
        flags_seen = False
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                pending += data
                while True:
                    if not flags_seen:
                        if len(pending) < CLIENT_FLAGS:
                            break
                        server.sendall(pending[:CLIENT_FLAGS])
                        pending, flags_seen = pending[CLIENT_FLAGS:], True
                    elif pending[: len(REQUEST_MAGIC)] == REQUEST_MAGIC:
                        self._hold_first_request()
                        server.sendall(pending)
                        self._copy(client, server)  # transmission: no more parsing
                        return
                    elif len(pending) >= OPTION_HEADER.size:
                        _, _, length = OPTION_HEADER.unpack_from(pending)
                        if len(pending) < OPTION_HEADER.size + length:
                            break
                        server.sendall(pending[: OPTION_HEADER.size + length])
                        pending = pending[OPTION_HEADER.size + length :]
                    else:
                        break
        except OSError:
            pass
        finally:
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
