"""``dirtydiff serve``: the sidecar. Runs the NBD export, the sidecar's
control socket (``STATE/sidecar.sock``: scans as background jobs) and,
with ``--metrics``, Prometheus ``/metrics``, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from dirtydiff import control, errors, sdnotify
from dirtydiff.state import StateDir
from nbd_plugins.backends import Backend, FileBackend, NbdBackend
from sidecar.jobs import ScanJobs, ScanMetrics
from sidecar.nbd_server import Export, NbdServer
from sidecar.scanjob import ScanOptions

log = logging.getLogger(__name__)


def open_disk(disk: str) -> Backend:
    """A local file/block device, or any NBD URI (normally the tracker's)."""
    try:
        if disk.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
            return NbdBackend(disk, readonly=True)
        return FileBackend(disk, readonly=True)
    except OSError as e:
        raise errors.Unavailable("disk-unavailable", f"disk {disk}: {e.strerror or e}") from None


def sidecar_socket(state: StateDir) -> Path:
    return state.path / "sidecar.sock"


def _handle(jobs: ScanJobs, message: control.Message) -> control.Message:
    """One request to the sidecar's control socket."""
    try:
        if message.get("version") != control.API_VERSION:
            raise errors.BadRequest("bad-version", "unsupported control API version")
        op, args = message.get("op"), message.get("args") or {}
        if not isinstance(args, dict):
            raise errors.BadRequest("bad-request", "'args' must be a map")
        if op == "ping":
            return control.reply_ok({"api": control.API_VERSION})
        if op == "scan.start":
            fields = {k: args[k] for k in ScanOptions.__dataclass_fields__ if k in args}
            for key, kind in (("disk", str), ("backup", str), ("name", str)):
                if not isinstance(fields.get(key), kind):
                    raise errors.BadRequest(
                        "bad-request", f"argument {key!r} must be {kind.__name__}"
                    )
            return control.reply_ok(jobs.start(ScanOptions(**fields)).as_dict())
        if op == "scan.status":
            return control.reply_ok(jobs.get(str(args.get("name"))).as_dict())
        if op == "scan.cancel":
            return control.reply_ok(jobs.cancel(str(args.get("name"))).as_dict())
        raise errors.BadRequest("unknown-op", f"unknown operation {op!r}")
    except errors.DirtydiffError as e:
        return control.reply_error(e)
    except (TypeError, ValueError) as e:
        return control.reply_error(errors.BadRequest("bad-request", str(e)))


async def _control_client(
    jobs: ScanJobs, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                prefix = await reader.readexactly(4)
                message = control.decode(await reader.readexactly(control.frame_length(prefix)))
                reply = _handle(jobs, message)
            except errors.ProtocolError as e:
                writer.write(control.encode(control.reply_error(e)))
                break
            writer.write(control.encode(reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    finally:
        writer.close()


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
    metrics: str | None = None,
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
    jobs = ScanJobs(state)
    control_path = sidecar_socket(state)
    control_path.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # the control socket is the owner's only
    try:
        control_server = await asyncio.start_unix_server(
            lambda r, w: _control_client(jobs, r, w), path=str(control_path)
        )
    finally:
        os.umask(old_umask)
    http: Any = None
    if metrics is not None:
        host, port = parse_hostport(metrics)
        registry = CollectorRegistry()
        registry.register(ScanMetrics(jobs, state.path.name))
        http, _ = start_http_server(port, addr=host, registry=registry)
        print(
            f"dirtydiff serve: metrics on http://{host}:{http.server_port}/metrics",
            file=sys.stderr,
            flush=True,
        )
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
        for job in jobs.jobs.values():
            job.cancel.set()  # a scan saves its position and resumes next time
        control_server.close()
        control_path.unlink(missing_ok=True)
        if http is not None:
            http.shutdown()
        await server.close()
        socket_path.unlink(missing_ok=True)
        backend.close()
