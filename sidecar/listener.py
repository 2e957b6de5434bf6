"""Accepting connections on the sidecar's listening sockets (the export's,
the control API's) so that a flood of clients cannot take the process down.

asyncio's own accept loop (3.11), once the process is out of file
descriptors, logs a traceback and schedules a restart of the listener for
every accept it tries in that round, up to the backlog, and each restart
does the same again: 964,038 log lines in 40 s beside 1,100 idle clients,
with every other socket starved. Here:

- a round accepts at most ``ACCEPT_BATCH`` connections, and hands each to
  the owner's ``accepted(sock)``, which decides at once whether it stays;
- out of descriptors, the listener frees its spare one to accept and close
  one pending connection (its client sees the end instead of waiting), and
  stops accepting for ``RETRY_DELAY``: no loop spins, and accepting resumes
  well within a second once descriptors are back;
- every failure is logged through a ``Throttle``: one line per
  ``LOG_INTERVAL`` at most, with the count of those it held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ACCEPT_BATCH = 32  # connections accepted per wake-up; the loop serves others between
BACKLOG = 128  # the kernel's queue of connections not accepted yet
RETRY_DELAY = 0.1  # seconds without accepting after running out of descriptors
LOG_INTERVAL = 10.0  # seconds between two lines of one kind

# accept(2) errors that say the process or the system is out of something,
# not that this one connection failed.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Throttle:
    """A warning logged at most once per ``interval`` seconds; the next line
    says how many were held back meanwhile."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last = -interval
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} more like it in the last {now - self._last:.0f} s)"
        self._last, self._held = now, 0
        log.warning(message, *args)


def unix_socket(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (whatever was there is replaced)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` resolves to, as
    asyncio's create_server binds them; port 0 takes the kernel's choice
    for the first and the same port for the others."""
    found: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, resolved in infos:
            if (family, resolved) in seen:
                continue
            seen.add((family, resolved))
            sock = socket.socket(family, kind, proto)
            found.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            address = resolved
            if port == 0 and len(found) > 1:
                address = (resolved[0], found[0].getsockname()[1], *resolved[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
    except BaseException:
        for sock in found:
            sock.close()
        raise
    return found


class Listener:
    """Accepts on one listening socket, in the running event loop."""

    def __init__(
        self, sock: socket.socket, accepted: Callable[[socket.socket], None], what: str
    ) -> None:
        self.sock = sock
        self._accepted = accepted
        self._what = what
        self._loop = asyncio.get_running_loop()
        self._throttle = Throttle()
        self._spare = _spare_fd()
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before we took it
            except OSError as e:
                self._failed(e)
                return
            conn.setblocking(False)
            try:
                self._accepted(conn)
            except Exception:  # one connection's bug never stops the listener
                log.exception("%s: a new connection failed", self._what)
                conn.close()

    def _failed(self, error: OSError) -> None:
        # First stop: whatever happens below, this loop does not spin.
        self._loop.remove_reader(self.sock.fileno())
        self._retry = self._loop.call_later(RETRY_DELAY, self._resume)
        if error.errno in _EXHAUSTED and self._spare >= 0:
            # The classic way out (libev, nginx): the spare fd makes room for
            # one accept, whose client is told at once that it cannot stay.
            os.close(self._spare)
            with contextlib.suppress(OSError):
                self.sock.accept()[0].close()
            self._spare = _spare_fd()
        self._throttle.warn(
            "%s: cannot accept connections: %s (%s file descriptors open); "
            "trying again in %g s",
            self._what, error.strerror or error, _open_fds(), RETRY_DELAY,
        )  # fmt: skip

    def _resume(self) -> None:
        self._retry = None
        if self._spare < 0:
            self._spare = _spare_fd()
        self._loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        elif self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1


def _open_fds() -> str:
    """How many descriptors the process has open, if that can be seen now
    (listing /proc/self/fd takes one)."""
    try:
        return str(len(os.listdir("/proc/self/fd")) - 1)
    except OSError:
        return "all its"


def _spare_fd() -> int:
    """A descriptor held in reserve for ``Listener._failed``; -1 if even
    that one cannot be had now."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
