"""The write tracker: configuration, start-up and the request paths.

``Tracker`` owns the state directory for as long as nbdkit runs: it holds the
state lock, the bitmap store and the control socket, and forwards requests to
the backend. Every content-changing request marks the bitmaps first
(``BitmapStore.begin_write``) and is forwarded second; the marks stay whatever
the outcome, because a write the client sees fail may still have reached the
disk.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dirtydiff import errors, sdnotify
from dirtydiff.bitmapfile import DEFAULT_GRANULARITY, check_granularity
from dirtydiff.disk import Backend, Connection, FileBackend, NbdBackend
from dirtydiff.owner import StateOwner
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
            record = self.state.record_disk(self.size, source, file, tracked=True)
            # Named in the export's description: a scan reading this export
            # proves by it that it reads this state's disk.
            self.description = tracker_description(record.id)
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
        if hasattr(self, "store"):
            self.store.close()
            del self.store
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._lock.release()

    # -- per-connection paths ------------------------------------------

    def connect(self) -> Connection:
        assert self.backend is not None
        return self.backend.connect()

    def write(self, conn: Connection, buf: Any, offset: int, fua: bool) -> None:
        marked = STATS.marked_bytes
        marked["pwrite"] = marked.get("pwrite", 0) + len(buf)
        gen, token = self.store.begin_write(offset, len(buf))
        try:
            conn.pwrite(buf, offset, fua)
        finally:
            self.store.end_write(gen, token)

    def zero(
        self, conn: Connection, count: int, offset: int, may_trim: bool, fast: bool, fua: bool
    ) -> None:
        marked = STATS.marked_bytes
        marked["zero"] = marked.get("zero", 0) + count
        gen, token = self.store.begin_write(offset, count)
        try:
            conn.zero(count, offset, may_trim, fast, fua)
        finally:
            self.store.end_write(gen, token)

    def trim(self, conn: Connection, count: int, offset: int, fua: bool) -> None:
        marked = STATS.marked_bytes
        marked["trim"] = marked.get("trim", 0) + count
        gen, token = self.store.begin_write(offset, count)
        try:
            conn.trim(count, offset, fua)
        finally:
            self.store.end_write(gen, token)


def configure_logging() -> None:
    """nbdkit captures the plugin's stderr; keep messages one line each."""
    level = os.environ.get("DIRTYDIFF_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="dirtydiff-tracker: %(levelname)s: %(message)s")
