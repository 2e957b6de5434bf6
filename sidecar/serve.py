"""``dirtydiff serve``: the sidecar. Runs the NBD export, the sidecar's
control socket (``STATE/sidecar.sock``, see ``sidecar.api``) and,
with ``--metrics``, Prometheus ``/metrics``, until SIGTERM or SIGINT.

The export's disk is ``--disk``: a local file, or an NBD URI, normally the
tracker's. When that tracker tracks a local file, the export reads the file
itself once it is proven to be the tracked one (``TrackedFile``), and keeps
the NBD hop through the tracker otherwise. Through this state's tracker,
every snapshot is served too, as export NAME, always read through the
tracker (``sidecar.export.snapshots``).

Descriptors: the soft RLIMIT_NOFILE is raised to the hard one at start, and
the export's clients may use all of it but ``RESERVED_FDS``, which keep the
control socket, /metrics, bitmap files and tracker connections working
however many clients the export has (``connection_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import inspect
import ipaddress
import logging
import resource
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from prometheus_client import start_http_server

from dirtydiff import control, errors, sdnotify, sockets
from dirtydiff.disk import Backend, Connection, FileBackend, NbdBackend, open_backend
from dirtydiff.owner import StateOwner
from dirtydiff.state import (
    DiskRecord,
    DiskSeen,
    StateDir,
    file_identity,
    record_first_disk,
    tracker_id,
)
from sidecar import memory
from sidecar.api import SidecarApi, start_in_background
from sidecar.export import Export, NbdServer
from sidecar.export.snapshots import SnapshotExports
from sidecar.export.tls import TlsCreds, X509Dir
from sidecar.limits import FDS_PER_CONNECTION, HANDSHAKE_LIMIT, MAX_CONNECTIONS
from sidecar.listener import BACKLOG, Listener, Throttle
from sidecar.metrics import registry
from sidecar.scan.jobs import ScanJobs

log = logging.getLogger(__name__)

# Clients of STATE/sidecar.sock at once (the CLI opens one per command; a
# backup tool, one or two); more are closed as they connect.
CONTROL_MAX_CONNECTIONS = 64
# Descriptors kept from the export's clients: the control socket's clients,
# and about as many again for the rest (listeners, the event loop, bitmap
# files, /metrics requests, the export's and the scans' tracker connections).
RESERVED_FDS = 2 * CONTROL_MAX_CONNECTIONS


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as a service that
    needs many descriptors should (the soft 1024 is kept low for select(2),
    which nothing here uses); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):  # a sandbox may refuse
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def connection_limit(requested: int | None, fd_limit: int) -> int:
    """How many export clients the descriptors allow: ``requested``
    (``--max-connections``) if it fits under ``fd_limit`` with
    ``RESERVED_FDS`` kept, else an error; by default MAX_CONNECTIONS, or
    fewer (said on stderr) under a very low limit."""
    fit = (fd_limit - RESERVED_FDS) // FDS_PER_CONNECTION
    if requested is not None and requested < 1:
        raise errors.BadRequest("bad-limit", "--max-connections must be at least 1")
    if fit < 1:
        raise errors.BadRequest(
            "fd-limit", f"the file descriptor limit {fd_limit} leaves no room for clients"
        )
    if requested is None:
        if fit < MAX_CONNECTIONS:
            print(f"dirtydiff serve: at most {fit} clients at once: the file descriptor "
                  f"limit is {fd_limit}", file=sys.stderr, flush=True)  # fmt: skip
        return min(MAX_CONNECTIONS, fit)
    if requested > fit:
        raise errors.BadRequest(
            "fd-limit",
            f"--max-connections {requested} needs "
            f"{RESERVED_FDS + FDS_PER_CONNECTION * requested} file descriptors and the "
            f"limit is {fd_limit}: raise it (LimitNOFILE=) or ask for at most {fit}",
        )
    return requested


def open_disk(disk: str) -> Backend:
    """A local file/block device, or any NBD URI (normally the tracker's)."""
    try:
        return open_backend(disk, readonly=True)
    except OSError as e:
        raise errors.Unavailable("disk-unavailable", f"disk {disk}: {e.strerror or e}") from None


def disk_seen(where: str, backend: Backend) -> DiskSeen:
    """What the export's disk shows of itself."""
    if isinstance(backend, FileBackend):
        return DiskSeen(where, backend.size, file=file_identity(backend.fd))
    assert isinstance(backend, NbdBackend)
    return DiskSeen(where, backend.size, tracker=tracker_id(backend.description))


class TrackedFile(FileBackend):
    """The local file that this state's tracker tracks, read directly.

    Through the tracker's URI every read and base:allocation query of the
    export is an NBD round trip to the tracker (a sparse read makes two: its
    allocation, then its data), each through a worker thread. Reading the
    file itself takes the export's file path instead (sendfile, SEEK_DATA),
    as ``serve --disk FILE`` does. The export is read-only, and tracking
    does not depend on who reads.

    Safe only while the file is the state's disk, so that is proven:

    - when opened (``open_tracked_file``): ``--disk`` is this state's tracker
      (its export description names the state's id), the record that
      tracker wrote (STATE/disk.json) names a local file, and the file
      opened has the device and inode recorded, in this boot;
    - at every export connection (``connect``): the record still names it.
      A tracker started since on another disk of this state has marked every
      bitmap inconsistent, and a rebuild fills new ones from that disk: this
      file's data must never go out beside them. The connection is refused,
      and ``replaced`` moves the export back to the tracker's URI.

    What a connection proven at its start keeps reading stays right: the
    bitmaps it chose were bound before, and a bitmap of another disk is
    inconsistent until rebuilt into a bitmap it never chose. The open fd
    keeps the inode: a file renamed over the path while the tracker runs
    changes neither what the tracker writes nor what is read here. If the
    tracker stops, the record still names this file; whatever writes it
    meanwhile goes untracked however the export reads.
    """

    def __init__(self, path: str, state: StateDir, replaced: Callable[[], None]) -> None:
        super().__init__(path, readonly=True)
        self.state = state
        self.identity = file_identity(self.fd)
        self._replaced = replaced

    def is_the_disk(self) -> bool:
        """Whether the state's record names this very file now."""
        try:
            record = self.state.disk()
        except errors.Corrupt:
            return False
        return record is not None and record.names_file(self.identity)

    def connect(self) -> Connection:
        if not self.is_the_disk():
            log.error("%s is no longer the disk of %s: the export reads through the tracker "
                      "from the next connection", self.path, self.state.path)  # fmt: skip
            self._replaced()
            # A ConnectionError: the export ends this one client, quietly.
            raise ConnectionAbortedError(
                errno.ECONNABORTED, f"{self.path} is no longer the disk of {self.state.path}"
            )
        return super().connect()


def open_tracked_file(
    state: StateDir, record: DiskRecord, tracker: Backend, replaced: Callable[[], None]
) -> TrackedFile | None:
    """The file ``tracker`` (the backend of ``--disk``) tracks, opened
    read-only if it is proven to be this state's disk (see ``TrackedFile``);
    None to keep reading through the tracker: a tracker of an NBD disk, a
    file this process may not open (a sandbox hides it), or one not proven."""
    if not isinstance(tracker, NbdBackend) or tracker_id(tracker.description) != record.id:
        return None
    if record.file is None or not record.names_file(record.file):
        return None
    path = record.source.removeprefix("file:")
    try:
        found = TrackedFile(path, state, replaced)
    except OSError as e:
        log.info("reading the disk through the tracker: %s", e.strerror or e)
        return None
    # The record read anew: a tracker that started on another file since
    # ``record`` was read has recorded that one.
    if found.size == record.size and found.is_the_disk():
        return found
    log.info("reading the disk through the tracker: %s is not the file it tracks", path)
    found.close()
    return None


def snapshot_exports(state: StateDir, disk: str, backend: Backend) -> SnapshotExports | None:
    """The snapshots served beside the live export: only when ``disk`` is
    this state's tracker (its description names the state's id), which
    alone can serve the disk as at a checkpoint; else none."""
    if not isinstance(backend, NbdBackend):
        return None
    state_id = tracker_id(backend.description)
    record = state.disk()
    if state_id is None or record is None or record.id != state_id:
        return None
    return SnapshotExports(state, disk, state_id)


async def _control_client(
    api: SidecarApi, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One client of STATE/sidecar.sock: requests in order, each in a thread
    (a checkpoint drains; a request may wait on the tracker), so the export
    never waits on them."""
    try:
        while True:
            try:
                prefix = await reader.readexactly(4)
                message = control.decode(await reader.readexactly(control.frame_length(prefix)))
            except errors.ProtocolError as e:
                writer.write(control.encode_reply(control.reply_error(e)))
                break
            try:
                reply = await asyncio.to_thread(api.handle, message)
            except Exception as e:  # a bug must not take the sidecar down
                log.exception("control request failed")
                reply = control.reply_error(errors.DirtydiffError("internal", str(e)))
            writer.write(control.encode_reply(reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    finally:
        writer.close()


class ControlClients:
    """The clients of STATE/sidecar.sock, at most CONTROL_MAX_CONNECTIONS."""

    def __init__(self, api: SidecarApi) -> None:
        self.api = api
        self.count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals = Throttle()

    def accepted(self, sock: socket.socket) -> None:
        if self.count >= CONTROL_MAX_CONNECTIONS:
            sock.close()
            self._refusals.warn(
                "control socket: %d clients, the limit: a new one was closed", self.count
            )
            return
        self.count += 1
        task = asyncio.create_task(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
            await _control_client(self.api, reader, writer)
        finally:
            self.count -= 1


def control_socket_mode(group: str | None) -> tuple[int, int]:
    """(mode, gid) of the control socket: the owner's only, or also a group's
    (operators or a backup tool's service user; the state directory must let
    that group in too)."""
    if group is None:
        return 0o600, -1
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise errors.NotFound("unknown-group", f"no group named {group!r}") from None
    return 0o660, gid


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT, or a bare PORT on loopback."""
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise errors.BadRequest("bad-address", f"--tcp wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def loopback_only(host: str) -> bool:
    """Whether every address ``host`` names is on loopback (127.0.0.0/8,
    ::1): only then can nobody but this host's users reach a listener."""
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # fmt: skip
    except socket.gaierror as e:
        raise errors.BadRequest("bad-address", f"address {host!r}: {e.strerror}") from None
    return all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)


def export_tls(
    tcp: str | None,
    tls_creds: Path | None,
    *,
    verify_peer: bool = False,
    authz: Path | None = None,
    on_unix: bool = False,
    insecure_tcp: bool = False,
) -> TlsCreds | None:
    """The export's TLS credentials, and the rule that the disk never goes
    out in the clear beyond loopback: ``--tcp`` outside it needs
    ``--tls-creds``, or ``--insecure-tcp`` (a warning at every start)."""
    if tls_creds is None:
        for given, flag in ((verify_peer, "--tls-verify-peer"), (authz, "--tls-authz"),
                            (on_unix, "--tls-unix")):  # fmt: skip
            if given:
                raise errors.BadRequest("tls-creds", f"{flag} needs --tls-creds DIR")
    if tcp is not None and tls_creds is None and not loopback_only(parse_hostport(tcp)[0]):
        if not insecure_tcp:
            raise errors.BadRequest(
                "tcp-needs-tls",
                f"--tcp {tcp} reaches beyond this host and would serve the whole disk in "
                "the clear: add --tls-creds DIR (x509 certificates), or --insecure-tcp to "
                "accept that",
            )
        log.warning("dirtydiff serve: --insecure-tcp: the export on %s has no TLS: anyone who "
                    "can reach it reads the whole disk and its bitmaps", tcp)  # fmt: skip
    if tls_creds is None:
        return None
    if tcp is None and not on_unix:
        log.warning("dirtydiff serve: --tls-creds, but nothing listens with TLS: "
                    "add --tcp HOST:PORT, or --tls-unix")  # fmt: skip
    return TlsCreds(tls_creds, verify_peer=verify_peer, authz=authz)


def start_metrics(
    where: str, found: object, tls_creds: Path | None
) -> tuple[str, Callable[[], None]]:
    """/metrics on ``where``: over https with a client certificate signed
    by ``tls_creds``'s CA when given; outside loopback without it, a warning
    (it shows bitmap names, scans and clients, never a byte of the disk).
    The URL served, and how to stop it."""
    host, port = parse_hostport(where)
    if tls_creds is None:
        if not loopback_only(host):
            log.warning("dirtydiff serve: /metrics on %s has no TLS: anyone who can reach it "
                        "sees the disk's bitmaps, scans and clients (--metrics-tls-creds DIR "
                        "serves it over https)", where)  # fmt: skip
        http, _ = start_http_server(port, addr=host, registry=found)  # type: ignore[arg-type]
        return f"http://{host}:{http.server_port}/metrics", http.shutdown
    if "client_cafile" not in inspect.signature(start_http_server).parameters:
        raise errors.BadRequest("metrics-tls", "--metrics-tls-creds needs prometheus-client 0.18+")
    creds = X509Dir.find(tls_creds)
    creds.check()
    http, _ = start_http_server(
        port, addr=host, registry=found,  # type: ignore[arg-type]
        certfile=str(creds.server_cert), keyfile=str(creds.server_key),
        client_cafile=str(creds.ca_cert), client_auth_required=True,
    )  # fmt: skip
    return f"https://{host}:{http.server_port}/metrics", http.shutdown


async def serve(
    state: StateDir,
    disk: str,
    socket_path: Path,
    *,
    tcp: str | None = None,
    export_name: str = "",
    bitmaps: list[str] | None = None,
    metrics: str | None = None,
    metrics_disk: str | None = None,
    control_group: str | None = None,
    auto_rebuild: bool = False,
    max_connections: int | None = None,
    handshake_limit: float = HANDSHAKE_LIMIT,
    ready: asyncio.Event | None = None,
    tls_creds: Path | None = None,
    tls_verify_peer: bool = False,
    tls_authz: Path | None = None,
    tls_unix: bool = False,
    insecure_tcp: bool = False,
    metrics_tls_creds: Path | None = None,
) -> None:
    mode, gid = control_socket_mode(control_group)  # a bad group fails before anything starts
    # So do TLS credentials, and a network export that would have none.
    tls = export_tls(tcp, tls_creds, verify_peer=tls_verify_peer, authz=tls_authz,
                     on_unix=tls_unix, insecure_tcp=insecure_tcp)  # fmt: skip
    if metrics_tls_creds is not None:
        if metrics is None:
            raise errors.BadRequest("metrics-tls", "--metrics-tls-creds needs --metrics HOST:PORT")
        X509Dir.find(metrics_tls_creds).check()
    clients = connection_limit(max_connections, raise_fd_limit())
    # Before anything else: a second sidecar on this state touches nothing
    # (when the first exited it would otherwise remove the second's sockets).
    sidecar_lock = StateOwner(state).become_sidecar()
    # A stop asked for while starting is kept, not fatal: whoever saw the
    # export's socket and sent SIGTERM gets the same clean exit (our sockets
    # removed, nobody else's) as one sent later.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as cleanup:  # undone in reverse, whatever fails
        cleanup.callback(sidecar_lock.release)
        for sig in (signal.SIGTERM, signal.SIGINT):
            cleanup.callback(loop.remove_signal_handler, sig)
        memory.one_arena()  # before the export's worker threads (sidecar.memory)
        backend = open_disk(disk)
        cleanup.callback(backend.close)
        record = state.disk()
        if record is None and isinstance(backend, FileBackend):
            # Never tracked: the file the operator serves is the state's disk
            # from now on (size and identity), as a tracker on it would record.
            record_first_disk(state, backend.size, backend.describe(), file_identity(backend.fd))
        elif record is not None:
            # The export pairs this state's bitmaps with the disk's data: a disk
            # shown to be another one (size, file, another state's tracker)
            # would have a backup copy the wrong bytes.
            record.check(disk_seen(disk, backend), tracker_runs=False, state=state.path,
                         require_proof=False)  # fmt: skip

        bitmap_filter = frozenset(bitmaps) if bitmaps else None

        def export_of(source: Backend) -> Export:
            return Export(export_name, source, state=state, bitmap_filter=bitmap_filter)

        def through_tracker() -> None:
            # Called in the event loop's thread, by the connection that found
            # the file replaced: later ones find the export on the tracker.
            if server.exports.get(export_name) is export:
                server.exports[export_name] = export_of(backend)

        tracked = None
        if record is not None:
            tracked = open_tracked_file(state, record, backend, through_tracker)
        if tracked is not None:
            # Closed after the server: a connection reads its fd until it ends.
            cleanup.callback(tracked.close)
            log.info("reading %s itself: the file the tracker at %s tracks", tracked.path, disk)
        export = export_of(tracked or backend)
        server = NbdServer(
            [export],
            max_connections=clients,
            handshake_limit=handshake_limit,
            snapshots=snapshot_exports(state, disk, backend),
        )
        # The export's socket may live anywhere (/run/dirtydiff): only a
        # stale socket is replaced, and at exit only ours is removed.
        sockets.clear_path(socket_path)
        await server.listen_unix(socket_path, tls if tls_unix else None)
        export_file = sockets.SocketFile(socket_path)
        cleanup.callback(export_file.remove)
        cleanup.push_async_callback(server.close)
        jobs = ScanJobs(state)
        api = SidecarApi(state, disk, jobs)
        # Born 0600 (or 0660), so that no moment exists at which others may
        # connect; the group is given to the socket we bound, not to a path.
        control_sock, control_file = sockets.bind(state.sidecar_socket_path, mode)
        cleanup.callback(control_file.remove)
        control_sock.listen(BACKLOG)
        control_server = Listener(control_sock, ControlClients(api).accepted, "control socket")
        cleanup.callback(control_server.close)
        control_file.set_group(gid)
        start_in_background(api, rebuild_inconsistent=auto_rebuild)

        @cleanup.callback
        def stop_jobs() -> None:
            for job in jobs.jobs.values():
                job.cancel.set()  # a scan saves its position and resumes next time

        if metrics is not None:
            found = registry(state, jobs, server, metrics_disk or state.path.name)
            url, shutdown = start_metrics(metrics, found, metrics_tls_creds)
            cleanup.callback(shutdown)
            print(f"dirtydiff serve: metrics on {url}", file=sys.stderr, flush=True)
        if tcp is not None:
            host, port = parse_hostport(tcp)
            bound = await server.listen_tcp(host, port, tls)
            over = " (TLS)" if tls is not None else ""
            print(f"dirtydiff serve: listening on tcp {host}:{bound}{over}", file=sys.stderr,
                  flush=True)  # fmt: skip
        if ready is not None:
            ready.set()
        sdnotify.ready(f"serving {disk} on {socket_path}")
        await stop.wait()
