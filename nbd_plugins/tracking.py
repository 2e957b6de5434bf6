"""The write tracker: configuration, start-up and the request paths.

``Tracker`` owns the state directory for as long as nbdkit runs: it holds the
state lock, the bitmap store and the control socket, and forwards requests to
the backend. Every content-changing request marks the bitmaps first
(``BitmapStore.begin_write``) and is forwarded second; the marks stay whatever
the outcome, because a write the client sees fail may still have reached the
disk.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dirtydiff import errors, sdnotify
from dirtydiff.bitmapfile import DEFAULT_GRANULARITY, check_granularity
from dirtydiff.disk import Backend, Connection, FileBackend, NbdBackend
from dirtydiff.owner import StateOwner
from dirtydiff.snapshots import EXPORT_PREFIX, SnapshotSet, SnapshotView, export_name
from dirtydiff.state import DiskSeen, StateDir, StateLock, file_identity, tracker_description
from dirtydiff.store import BitmapStore
from nbd_plugins.control_server import ControlServer

log = logging.getLogger(__name__)

USAGE = "file=DISK|uri=NBD_URI state=DIR [granularity=BYTES] [readonly=true] [socket-mode=0600]"


class ConfigError(errors.DirtydiffError):
    code = "config"


@dataclass
class RequestStats:
    """Requests the tracker served, for the sidecar's /metrics (the control
    request ``stats``). Bumped without a lock: connections run in parallel
    threads, and a rare lost increment in a monitoring counter costs less
    than a lock on every request."""

    requests: dict[str, int] = field(default_factory=dict)  # by callback
    errors: dict[str, int] = field(default_factory=dict)  # by callback
    marked_bytes: dict[str, int] = field(default_factory=dict)  # pwrite, zero, trim

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "marked_bytes": dict(self.marked_bytes),
        }


# One tracker per nbdkit process; the plugin's callbacks count into this.
STATS = RequestStats()


@dataclass
class TrackerConfig:
    file: str | None = None
    uri: str | None = None
    state: str | None = None
    granularity: int = DEFAULT_GRANULARITY
    readonly: bool = False
    socket_mode: int = 0o600

    def set(self, key: str, value: str) -> None:
        if key == "file":
            self.file = value
        elif key == "uri":
            self.uri = value
        elif key == "state":
            self.state = value
        elif key == "granularity":
            try:
                self.granularity = int(value, 0)
            except ValueError:
                raise ConfigError(f"granularity={value!r} is not a number of bytes") from None
            check_granularity(self.granularity)
        elif key == "readonly":
            self.readonly = value.lower() in ("1", "true", "yes", "on")
        elif key == "socket-mode":
            try:
                self.socket_mode = int(value, 8)
            except ValueError:
                raise ConfigError(f"socket-mode={value!r} is not an octal mode") from None
        else:
            raise ConfigError(f"unknown parameter {key!r}; usage: {USAGE}")

    def check(self) -> None:
        if (self.file is None) == (self.uri is None):
            raise ConfigError(f"give exactly one of file= and uri=; usage: {USAGE}")
        if self.state is None:
            raise ConfigError(f"state= is required; usage: {USAGE}")


@dataclass(frozen=True)
class Capabilities:
    """What an export offers nbdkit (its can_* callbacks)."""

    write: bool
    flush: bool
    trim: bool
    zero: bool
    fast_zero: bool
    fua_native: bool
    multi_conn: bool
    cache: bool
    extents: bool

    @classmethod
    def of(cls, disk: Backend) -> Capabilities:
        return cls(
            write=not disk.readonly,
            flush=disk.can_flush,
            trim=disk.can_trim,
            zero=disk.can_zero,
            fast_zero=disk.can_fast_zero,
            fua_native=disk.can_fua_native,
            multi_conn=disk.can_multi_conn,
            cache=disk.can_cache,
            extents=disk.can_extents,
        )


# A snapshot export: writable only so that a backup may TRIM what it is done
# with (nbdkit refuses TRIM on a read-only export); its writes fail EROFS.
# No extents: nbdkit then answers "all data", which a snapshot may say.
SNAPSHOT_CAPABILITIES = Capabilities(
    write=True, flush=True, trim=True, zero=False, fast_zero=False, fua_native=False,
    multi_conn=True, cache=False, extents=False,
)  # fmt: skip

Handle = Connection | SnapshotView


def _read_only_snapshot(name: str) -> OSError:
    return OSError(errno.EROFS, f"snapshot {name} is read-only")


class Tracker:
    def __init__(self, config: TrackerConfig) -> None:
        config.check()
        assert config.state is not None
        self.state = StateDir(config.state)
        self._lock: StateLock = StateOwner(self.state).become_tracker()
        self.backend: Backend | None = None
        self.control: ControlServer | None = None
        try:
            try:
                self.backend = (
                    FileBackend(config.file, readonly=config.readonly)
                    if config.file is not None
                    else NbdBackend(config.uri or "", readonly=config.readonly)
                )
            except OSError as e:
                raise ConfigError("disk", str(e.strerror or e)) from None
            self.size = self.backend.size
            # The bitmaps first: a disk they refuse (another size) must not
            # become the one the state describes.
            self.store = BitmapStore(
                self.state, self.size, recording=True, granularity=config.granularity
            )
            source = self.backend.describe()
            file = file_identity(self.backend.fd) if isinstance(self.backend, FileBackend) else None
            known = self.state.disk()
            seen = DiskSeen(source.removeprefix("file:"), self.size, file=file)
            if known is not None and (
                known.same_file(seen) is False
                or (known.tracked and not known.same_source(source, seen))
            ):
                # Of the same size, but not proven the same disk: its bitmaps
                # could call clean what differs on this one.
                log.error("%s is not proven to be %s, the disk of %s", source, known.source,
                          self.state.path)  # fmt: skip
                self.store.disk_replaced()
                disk_proven = False
            else:
                disk_proven = True
            record = self.state.record_disk(self.size, source, file, tracked=True)
            # Named in the export's description: a scan reading this export
            # proves by it that it reads this state's disk.
            self.description = tracker_description(record.id)
            self.state_id = record.id
            self.capabilities = Capabilities.of(self.backend)
            # Before the first write: a snapshot the tracker cannot prove
            # exact is broken now, before a write could make it wrong.
            self.snapshots = SnapshotSet(self.state, self.size, record.id)
            self.snapshots.load(set(self.store.bitmaps), disk_proven=disk_proven)
            self.store.snapshots = self.snapshots
            self.control = ControlServer(
                self.state.socket_path,
                self.store,
                mode=config.socket_mode,
                extra={"stats": lambda args: STATS.as_dict()},
            )
        except BaseException:
            self.close()
            raise
        log.info(
            "tracking %s (%d bytes) in %s", self.backend.describe(), self.size, self.state.path
        )

    @property
    def disk(self) -> Backend:
        """The backend; only absent after close()."""
        assert self.backend is not None
        return self.backend

    def after_fork(self) -> None:
        assert self.control is not None and self.backend is not None
        self.control.start()
        # nbdkit has bound its socket by now: a unit ordered after ours (the
        # VM, the sidecar) may connect as soon as systemd hears this.
        sdnotify.ready(f"tracking {self.backend.describe()}")

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if hasattr(self, "snapshots"):
            self.snapshots.close()
            del self.snapshots
        if hasattr(self, "store"):
            self.store.close()
            del self.store
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._lock.release()

    # -- per-connection paths ------------------------------------------

    # -- exports: "" is the live disk, @snapshot:NAME a snapshot ----------

    def exports(self) -> list[tuple[str, str]]:
        return [("", self.description)] + [
            (info.export, self.snapshot_description(info.name)) for info in self.snapshots.list()
        ]

    def snapshot_description(self, name: str) -> str:
        return f"dirtydiff snapshot {name} of state {self.state_id}"

    def open_export(self, name: str) -> Handle:
        """A handle on export ``name``: a snapshot for ``@snapshot:NAME``
        (an unknown one is refused, ENOENT), else the live disk.

        Any other name is the live disk, as before snapshots existed: a VM
        configured with an export name (libvirt's ``<source name='vda'>``)
        keeps its disk."""
        assert self.backend is not None
        if not name.startswith(EXPORT_PREFIX):
            return self.backend.connect()
        snap = self.snapshots.snapshots.get(name[len(EXPORT_PREFIX) :])
        if snap is not None and export_name(snap.name) == name:
            return SnapshotView(self.snapshots, snap, self.backend.connect())
        raise OSError(errno.ENOENT, f"no export named {name!r}")

    def capabilities_of(self, h: Handle) -> Capabilities:
        return SNAPSHOT_CAPABILITIES if type(h) is SnapshotView else self.capabilities

    def describe_export(self, h: Handle) -> str:
        if type(h) is SnapshotView:
            return self.snapshot_description(h.snapshot.name)
        return self.description

    # -- per-connection paths ------------------------------------------
    #
    # Mark first (begin_write), then copy what a snapshot still protects
    # (before_change), then forward. A snapshot's fault breaks the snapshot
    # inside before_change; the write always goes on.

    def connect(self) -> Connection:
        assert self.backend is not None
        return self.backend.connect()

    def write(self, conn: Handle, buf: Any, offset: int, fua: bool) -> None:
        if isinstance(conn, SnapshotView):
            raise _read_only_snapshot(conn.snapshot.name)
        marked = STATS.marked_bytes
        marked["pwrite"] = marked.get("pwrite", 0) + len(buf)
        gen, token = self.store.begin_write(offset, len(buf))
        try:
            if self.snapshots.active:
                self.snapshots.before_change(conn, offset, len(buf))
            conn.pwrite(buf, offset, fua)
        finally:
            self.store.end_write(gen, token)

    def zero(
        self, conn: Handle, count: int, offset: int, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        if isinstance(conn, SnapshotView):
            raise _read_only_snapshot(conn.snapshot.name)
        marked = STATS.marked_bytes
        marked["zero"] = marked.get("zero", 0) + count
        gen, token = self.store.begin_write(offset, count)
        try:
            if self.snapshots.active:
                self.snapshots.before_change(conn, offset, count)
            conn.zero(count, offset, may_trim, fast, fua)
        finally:
            self.store.end_write(gen, token)

    def trim(self, conn: Handle, count: int, offset: int, fua: bool) -> None:
        if isinstance(conn, SnapshotView):
            conn.trim(count, offset)  # the backup is done with this range
            return
        marked = STATS.marked_bytes
        marked["trim"] = marked.get("trim", 0) + count
        gen, token = self.store.begin_write(offset, count)
        try:
            if self.snapshots.active:
                self.snapshots.before_change(conn, offset, count)
            conn.trim(count, offset, fua)
        finally:
            self.store.end_write(gen, token)


def configure_logging() -> None:
    """nbdkit captures the plugin's stderr; keep messages one line each."""
    level = os.environ.get("DIRTYDIFF_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="dirtydiff-tracker: %(levelname)s: %(message)s")
