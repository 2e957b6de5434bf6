"""systemd's readiness protocol (sd_notify), without libsystemd.

A service with ``Type=notify`` is started once it sends ``READY=1`` to the
datagram socket named in ``$NOTIFY_SOCKET``. The tracker and the sidecar send
it only when their sockets are bound, so units ordered after them can connect
at once.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one notification; False when not run by systemd (no socket)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def ready(status: str) -> bool:
    return notify(f"READY=1\nSTATUS={status}")
