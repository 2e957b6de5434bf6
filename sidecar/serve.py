"""``dirtydiff serve``: run the NBD export until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from dirtydiff import errors, sdnotify
from dirtydiff.state import StateDir
from nbd_plugins.backends import Backend, FileBackend, NbdBackend
from sidecar.nbd_server import Export, NbdServer

log = logging.getLogger(__name__)


def open_disk(disk: str) -> Backend:
    """A local file/block device, or any NBD URI (normally the tracker's)."""
    try:
        if disk.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
            return NbdBackend(disk, readonly=True)
        return FileBackend(disk, readonly=True)
    except OSError as e:
        raise errors.Unavailable("disk-unavailable", f"disk {disk}: {e.strerror or e}") from None


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise errors.BadRequest("bad-address", f"--tcp wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    state: StateDir,
    disk: str,
    socket_path: Path,
    *,
    tcp: str | None = None,
    export_name: str = "",
    bitmaps: list[str] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    backend = open_disk(disk)
    size = state.disk_size()
    if size is not None and size != backend.size:
        raise errors.Conflict(
            "disk-size-mismatch",
            f"disk {disk} has {backend.size} bytes but state directory {state.path} "
            f"describes a disk of {size} bytes",
        )
    export = Export(
        name=export_name,
        backend=backend,
        state=state,
        bitmap_filter=frozenset(bitmaps) if bitmaps else None,
    )
    server = NbdServer([export])
    await server.listen_unix(socket_path)
    if tcp is not None:
        host, port = parse_hostport(tcp)
        bound = await server.listen_tcp(host, port)
        print(f"dirtydiff serve: listening on tcp {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    sdnotify.ready(f"serving {disk} on {socket_path}")
    try:
        await stop.wait()
    finally:
        await server.close()
        socket_path.unlink(missing_ok=True)
        backend.close()
