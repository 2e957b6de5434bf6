"""Who acts on a state directory: the one place that decides.

A request about the bitmaps of a state directory is served by one of three:

- **the sidecar** (``dirtydiff serve``), when one answers on
  ``STATE/sidecar.sock``: it runs scans as jobs, and sends every other request
  on as below (it asks this module too, with ``ask_sidecar=False``, so that it
  never sends a request to itself);
- **the tracker**, while it holds ``STATE/lock``: it owns the recording
  bitmaps, and no other process may set a bit in them (two writers of one
  mapped file can lose a bit);
- **this process, on the files**, under ``STATE/lock`` taken for as long as it
  acts (one request, or a whole offline scan): the lock keeps a tracker from
  starting meanwhile.

The tracker or the files is decided by taking the lock, never by looking
first: a tracker could start between the look and the act. The files are
opened only once the lock is held, and through a ``BitmapStore`` that does
not record, so the same request code (``dirtydiff.control.dispatch``) runs
whoever serves it.

Snapshots (``checkpoint`` with ``snapshot``, ``snapshot.*``) live in the
tracker, which copies a granule before it lets a write change it: a
checkpoint with a snapshot is refused on the files (nothing would copy), and
the snapshots listed from the files are what the state directory last
recorded of them.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from dirtydiff import errors
from dirtydiff.control import client, replies
from dirtydiff.control.handlers import dispatch
from dirtydiff.control.wire import request, result_of
from dirtydiff.snapshots import read_snapshots
from dirtydiff.state import BitmapInfo, StateDir, StateLock
from dirtydiff.store import BitmapStore


class Route(enum.Enum):
    """Who serves the requests of an ``Actor``."""

    SIDECAR = "sidecar"
    """The sidecar's control socket, STATE/sidecar.sock."""
    TRACKER = "tracker"
    """The tracker's control socket, STATE/tracker.sock: it holds the lock."""
    FILES = "files"
    """This process, on the files, under the state lock."""


class Actor(ABC):
    """Sends requests to whoever ``route`` names."""

    route: Route

    def __init__(self, state: StateDir) -> None:
        self.state = state

    @abstractmethod
    def call(self, op: str, **args: object) -> Any:
        """Run one request; its result as the wire carries it, or the error
        it carries raised."""

    def open(self) -> None:  # noqa: B027 (a socket has nothing to open first)
        """Open now what the requests need (the files' store), so that what
        fails there fails before, not as, the first request."""


class SidecarActor(Actor):
    route = Route.SIDECAR

    def call(self, op: str, **args: object) -> Any:
        return client.call(self.state.sidecar_socket_path, op, **args)


class TrackerActor(Actor):
    route = Route.TRACKER

    def call(self, op: str, **args: object) -> Any:
        return client.call(self.state.socket_path, op, **args)


class FilesActor(Actor):
    """The state lock is held (``StateOwner.acting`` took it); the store is
    opened at the first request, so a caller may first record the disk of a
    state never tracked (an offline scan does)."""

    route = Route.FILES

    def __init__(self, state: StateDir, never_tracked: str) -> None:
        super().__init__(state)
        self._never_tracked = never_tracked
        self._store: BitmapStore | None = None

    def _opened(self) -> BitmapStore:
        if self._store is None:
            size = self.state.disk_size()
            if size is None:
                raise errors.NotFound("never-tracked", self._never_tracked)
            self._store = BitmapStore(self.state, size, recording=False)
        return self._store

    def open(self) -> None:
        self._opened()

    def call(self, op: str, **args: object) -> Any:
        if op == "checkpoint" and args.get("snapshot") is not None:
            raise errors.Unavailable("snapshot-needs-tracker", SNAPSHOT_NEEDS_TRACKER)
        if op == "snapshot.list":
            # The state directory's record: no store to open, and a state
            # never tracked simply has none.
            return {"snapshots": [info.as_dict() for info in read_snapshots(self.state)]}
        return result_of(dispatch(self._opened(), request(op, **args)))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


SNAPSHOT_NEEDS_TRACKER = (
    "a snapshot needs the tracker running: it copies the old data before the VM's "
    "writes change it; start `dirtydiff track` first"
)


class StateOwner:
    """Routes the requests about one state directory (see the module's
    docstring). ``ask_sidecar=False``: the caller is the sidecar, or runs
    on the tracker or the files whatever sidecar runs (a scan)."""

    def __init__(self, state: StateDir, *, ask_sidecar: bool = True) -> None:
        self.state = state
        self.ask_sidecar = ask_sidecar

    def never_tracked(self) -> str:
        return (
            f"state directory {self.state.path} has never been tracked; run `dirtydiff track` "
            "on the disk once to create it"
        )

    # -- who runs ------------------------------------------------------------

    def sidecar(self) -> SidecarActor | None:
        """The sidecar, if one listens (and this owner asks it)."""
        if self.ask_sidecar and client.listening(self.state.sidecar_socket_path):
            return SidecarActor(self.state)
        return None

    def tracker_runs(self) -> bool:
        """A tracker holds the state lock (asked by trying it: released at
        once)."""
        lock = self.state.try_lock()
        if lock is None:
            return True
        lock.release()
        return False

    def tracker_listening(self) -> bool:
        """A tracker answers on its control socket, asked without the lock
        (a scrape, or a tracker starting, must not be kept waiting by it)."""
        return client.listening(self.state.socket_path)

    # -- becoming the tracker or the sidecar ---------------------------------

    def become_tracker(self) -> StateLock:
        """Take the state lock for a tracker's whole life: from then on it
        is who the requests go to. Conflict if another process holds it."""
        lock = self.state.try_lock()
        if lock is None:
            raise errors.Conflict(
                "state-busy",
                f"state directory {self.state.path} is in use by another tracker "
                f"(pid {self.state.holder_pid()})",
            )
        return lock

    def become_sidecar(self) -> StateLock:
        """Take STATE/sidecar.lock for a sidecar's whole life: one sidecar
        per state directory. Conflict if another sidecar holds it (which
        must then find its sockets as it left them)."""
        lock = self.state.try_lock_sidecar()
        if lock is None:
            pid = self.state.holder_pid(self.state.sidecar_lock_path)
            raise errors.Conflict(
                "sidecar-running",
                f"state directory {self.state.path} is in use by another sidecar "
                f"({f'pid {pid}' if pid else 'starting now'}); stop it first",
            )
        return lock

    @contextlib.contextmanager
    def acting(self, *, never_tracked: str | None = None) -> Iterator[Actor]:
        """The one who serves requests until the block ends: the sidecar,
        the tracker, or this process on the files, with the state lock held
        for the whole block. ``never_tracked``: the message of the NotFound
        raised if the files are asked and the state names no disk."""
        sidecar = self.sidecar()
        if sidecar is not None:
            yield sidecar
            return
        lock: StateLock | None = self.state.try_lock()
        if lock is None:
            yield TrackerActor(self.state)
            return
        files = FilesActor(self.state, never_tracked or self.never_tracked())
        try:
            yield files
        finally:
            try:
                files.close()
            finally:
                lock.release()

    # -- one request ---------------------------------------------------------

    def request(self, op: str, **args: object) -> Any:
        """Run one request where it can run; its result as the wire carries it."""
        with self.acting() as actor:
            if actor.route is not Route.TRACKER:
                return actor.call(op, **args)
            try:
                return actor.call(op, **args)
            except errors.Unavailable:
                if self.tracker_listening():
                    raise
                # Locked, and no tracker answers: an offline scan or another
                # command holds the lock (or a tracker is starting right now).
                raise errors.Unavailable(
                    "state-busy",
                    f"state directory {self.state.path} is locked by another process "
                    "(an offline scan, or a tracker starting); try again once it is done",
                ) from None

    # -- typed requests --------------------------------------------------------

    def info(self, name: str) -> BitmapInfo:
        return replies.bitmap_info(self.request("bitmap.info", name=name))

    def find(self, name: str) -> BitmapInfo | None:
        """``info``, or None if there is no such bitmap."""
        try:
            return self.info(name)
        except errors.NotFound as e:
            if e.code != "unknown-bitmap":
                raise
            return None

    def bitmaps(self) -> list[BitmapInfo]:
        return replies.bitmap_infos(self.request("bitmap.list"))

    def status(self) -> replies.StoreStatus:
        return replies.StoreStatus.from_wire(self.request("status"))

    def snapshots(self) -> list[dict[str, Any]]:
        """The snapshots as ``snapshot.list`` answers them (maps of
        ``SnapshotInfo.as_dict``): the tracker's, or the files' record."""
        result = self.request("snapshot.list")
        found = result.get("snapshots") if isinstance(result, dict) else None
        if not isinstance(found, list) or not all(isinstance(s, dict) for s in found):
            raise errors.ProtocolError("malformed-reply", "a snapshot.list reply has not its shape")
        return found
