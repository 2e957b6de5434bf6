"""Point-in-time snapshots: copy-before-write in the tracker, and the snapshot view.

``checkpoint NAME`` with a snapshot freezes bitmap NAME and, at the same
instant (writes held and drained, ``dirtydiff.checkpoints``), starts snapshot
NAME. From then on the tracker calls ``SnapshotSet.before_change`` before it
forwards a write, write-zeroes or trim: every granule of the range that the
snapshot protects and has not copied is read from the disk, written at its
own offset into the snapshot's sparse store, and marked copied in the map,
and only then does the request go on. The tracker's export
``@snapshot:NAME`` reads, per granule, the store if copied, else the disk.
Both run under ``SnapshotSet.lock``, one bounded piece at a time; why no
interleaving returns data newer than the instant is in docs/architecture.md,
"Point-in-time snapshots".

A fault of the snapshot (the store full, an I/O error, the limit reached, a
restart it cannot prove it survived) *breaks the snapshot*, never the VM's
write: the snapshot stops protecting, its store is freed, its reads fail
with EIO, and the reason is kept in its map's header.

The files (``dirtydiff.snapshotfile``): ``STATE/snapshots/NAME.snap`` (the
map) and the store. ``read_snapshots`` reads them for a process that is not
the tracker (the sidecar, an offline ``snapshot list``).

No numpy here: the tracker runs in nbdkit's embedded interpreter.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirtydiff import errors
from dirtydiff.bitmapfile import BitmapFile, current_boot_id, fsync_dir, set_bit_range
from dirtydiff.disk import Connection, fallocate
from dirtydiff.snapshotfile import (
    STORE_SUFFIX,
    Scope,
    SnapFlag,
    SnapHeader,
    SnapshotFile,
    bytes_in,
    clear_bit_range,
    count_bits,
    granule_bytes,
    granules_inside,
    pending_runs,
)
from dirtydiff.snapshotinfo import (
    ACTIVE,
    BROKEN,
    EXPORT_PREFIX,
    HOST_RESTARTED,
    SnapshotInfo,
    SnapshotRequest,
    describe,
    export_name,
    no_such,
    open_store,
    read_snapshots,
    release_files,
    remove_files,
    size_text,
    why_not_exact,
)
from dirtydiff.state import StateDir, check_name
from dirtydiff.statefiles import check_directory

# What the sidecar and the control handlers import from here.
__all__ = [
    "EXPORT_PREFIX",
    "HOST_RESTARTED",
    "Scope",
    "SnapshotInfo",
    "SnapshotRequest",
    "SnapshotSet",
    "SnapshotView",
    "export_name",
    "read_snapshots",
    "release_files",
]

log = logging.getLogger(__name__)

# The lock is held for at most this many bytes of a copy or a read at a time:
# a 32 MiB snapshot read must not starve the VM's writes.
PIECE = 1 << 20

_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


# -- one snapshot ------------------------------------------------------------


class Snapshot:
    """A snapshot as the tracker holds it: its map (mmap'd), its store (an
    fd), and counters kept in step with the bits under the set's lock."""

    def __init__(self, name: str, file: SnapshotFile | None, reason: str | None = None) -> None:
        self.name = name
        self.file = file
        self.store_fd = -1
        self.state = ACTIVE if reason is None else BROKEN
        self.reason = reason
        self.released = False
        self.copied_bytes = 0
        if file is not None:
            header = file.header
            self.granularity = header.granularity
            self.shift = header.granularity.bit_length() - 1
            self.disk_size = header.disk_size
            self.granules = file.granules
            self.limit = header.limit
            self.protected = file.protected
            self.copied = file.copied
            self.copied_bytes = bytes_in(file.copied, 0, file.granules, header.granularity,
                                         header.disk_size)  # fmt: skip

    @property
    def serving(self) -> bool:
        return self.state == ACTIVE and not self.released

    def info(self) -> SnapshotInfo:
        return describe(self.name, self.file, self.state, self.reason, self.store_fd)


# -- the tracker's snapshots -------------------------------------------------


@dataclass
class Prepared:
    """A snapshot made but not started: its map under a temporary name."""

    name: str
    file: SnapshotFile
    store_fd: int
    store: Path
    staging: Path
    scope: Scope


class SnapshotSet:
    """Every snapshot of the tracker's state directory, and the paths that
    copy before a change and read the snapshot view.

    ``lock`` orders every copy (check, read the disk, write the store, mark
    copied) against every snapshot read and trim; ``active`` is the tuple of
    snapshots that protect, read without the lock on the hot path (a bit
    test; a granule that needs copying is checked again under the lock)."""

    def __init__(self, state: StateDir, disk_size: int, state_id: str) -> None:
        self.state = state
        self.disk_size = disk_size
        self.state_id = bytes.fromhex(state_id) if state_id else bytes(16)
        self.lock = threading.Lock()
        self.snapshots: dict[str, Snapshot] = {}
        self.active: tuple[Snapshot, ...] = ()

    # -- start-up --------------------------------------------------------

    def load(self, bitmaps: set[str], *, disk_proven: bool) -> None:
        """Open every snapshot the state directory holds; those that cannot
        be proven exact now are broken, with the reason. Before the first
        write."""
        if not os.path.lexists(self.state.snapshots_dir):
            return
        self.state.prepare_snapshots()
        for leftover in self.state.snapshots_dir.glob(".*.new"):
            leftover.unlink()  # a snapshot that never reached its instant
        names = set(self.state.snapshot_names())
        for store in self.state.snapshots_dir.glob(f"*{STORE_SUFFIX}"):
            if store.name[: -len(STORE_SUFFIX)] not in names:
                store.unlink()  # its map never took its name: nothing reads it
        for name in self.state.snapshot_names():
            path = self.state.snapshot_path(name)
            try:
                file = SnapshotFile(path, writable=True)
            except errors.Corrupt as e:
                log.error("snapshot %s is broken: %s", name, e.message)
                self.snapshots[name] = Snapshot(name, None, e.message)
                continue
            snap = Snapshot(name, file)
            why = why_not_exact(file.header, self.disk_size, self.state_id)
            if why is None and not disk_proven:
                why = "the tracker serves a disk not proven to be the snapshot's"
            if why is None and name not in bitmaps:
                why = f"its checkpoint bitmap {name!r} is gone"
            if why is None:
                why = self._untrusted_store_dir(Path(file.header.store).parent)
            snap.store_fd, missing = open_store(file.header, writable=True)
            why = why or missing
            self.snapshots[name] = snap
            if why is not None:
                self._break(snap, why)
        self.active = tuple(s for s in self.snapshots.values() if s.serving)

    def _untrusted_store_dir(self, where: Path) -> str | None:
        """Why a --snapshot-dir can no longer be trusted (others may write in
        it now: a store there could have been changed), or None."""
        if where == self.state.snapshots_dir:
            return None  # checked with the state directory
        try:
            check_directory(where, "snapshot directory", writer=True, follow=True)
        except errors.DirtydiffError as e:
            return e.message
        return None

    # -- the instant -------------------------------------------------------

    def prepare(self, name: str, request: SnapshotRequest, granularity: int) -> Prepared:
        """Make snapshot ``name``'s store and map, not yet started. Before
        the writes are held: nothing here needs the instant."""
        check_name(name)
        if name in self.snapshots or os.path.lexists(self.state.snapshot_path(name)):
            raise errors.Conflict("snapshot-exists", f"snapshot {name!r} already exists")
        self.state.prepare_snapshots()
        if request.dir is None:
            store = self.state.snapshots_dir / f"{name}{STORE_SUFFIX}"
        else:
            where = Path(request.dir)
            check_directory(where, "snapshot directory", writer=True, follow=True)
            # Named by the state's id: one directory may hold the stores of many disks.
            store = where / f"{self.state_id.hex()}.{name}{STORE_SUFFIX}"
        staging = self.state.snapshots_dir / f".{name}.snap.new"
        try:
            # No map names this store yet: whatever has its name is a leftover.
            store.unlink(missing_ok=True)
            fd = os.open(store, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)  # fmt: skip
        except OSError as e:
            raise errors.StorageError(
                "snapshot-store", f"cannot create {store}: {e.strerror}"
            ) from None
        try:
            os.ftruncate(fd, self.disk_size)
            st = os.fstat(fd)
            header = SnapHeader(
                flags=SnapFlag(0),
                granularity=granularity,
                scope=request.scope,
                disk_size=self.disk_size,
                created_ns=time.time_ns(),
                limit=request.limit or 0,
                boot_id=current_boot_id(),
                state_id=self.state_id,
                store_dev=st.st_dev,
                store_ino=st.st_ino,
                store=str(store),
            )
            file = SnapshotFile.create(staging, header, protect_all=request.scope is Scope.ALL)
        except BaseException as e:
            os.close(fd)
            store.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise errors.StorageError(
                    "snapshot-store", f"cannot create snapshot {name!r}: {e.strerror}"
                ) from None
            raise
        return Prepared(name, file, fd, store, staging, request.scope)

    def discard(self, prepared: Prepared) -> None:
        """Undo ``prepare``: the instant did not happen."""
        prepared.file.close()
        os.close(prepared.store_fd)
        prepared.staging.unlink(missing_ok=True)
        if prepared.file.path != prepared.staging:  # renamed into place already
            prepared.file.path.unlink(missing_ok=True)
        prepared.store.unlink(missing_ok=True)

    def start(self, prepared: Prepared, frozen: BitmapFile) -> Snapshot:
        """Start the snapshot at the instant: no write is in flight or
        admitted (the caller holds them), and ``frozen`` is bitmap NAME as
        frozen. Scope dirty protects NAME's bits, copied now."""
        file = prepared.file
        if prepared.scope is Scope.DIRTY:
            bits = frozen.bits
            file.protected[: len(bits)] = bits[:]
        os.rename(prepared.staging, self.state.snapshot_path(prepared.name))
        file.path = self.state.snapshot_path(prepared.name)
        fsync_dir(self.state.snapshots_dir)
        snap = Snapshot(prepared.name, file)
        snap.store_fd = prepared.store_fd
        with self.lock:
            self.snapshots[prepared.name] = snap
            self.active = (*self.active, snap)
        log.info("snapshot %s started (scope %s)", prepared.name, prepared.scope.word)
        return snap

    # -- copy before write (the hot path) --------------------------------

    def before_change(self, conn: Connection, offset: int, length: int) -> None:
        """Copy every granule of ``[offset, offset+length)`` that an active
        snapshot protects and has not copied. Never raises for a fault of a
        snapshot: that breaks the snapshot, and the write goes on."""
        for snap in self.active:
            first = offset >> snap.shift
            last = (offset + length - 1) >> snap.shift
            if last >= snap.granules:
                last = snap.granules - 1
            if first > last:
                continue
            if first == last:  # the common case: one bit test of each map
                i, b = first >> 3, 1 << (first & 7)
                if not snap.protected[i] & b or snap.copied[i] & b:
                    continue
            elif not pending_runs(snap.protected, snap.copied, first, last + 1):
                continue
            self._copy(snap, conn, first, last + 1)

    def _copy(self, snap: Snapshot, conn: Connection, first: int, stop: int) -> None:
        step = max(1, PIECE >> snap.shift)
        for start in range(first, stop, step):
            with self.lock:
                if not snap.serving:
                    return
                for a, b in pending_runs(
                    snap.protected, snap.copied, start, min(stop, start + step)
                ):
                    offset, length = granule_bytes(a, b, snap.granularity, snap.disk_size)
                    if snap.limit and snap.copied_bytes + length > snap.limit:
                        self._break(snap, f"store limit of {size_text(snap.limit)} reached")
                        return
                    failed = self._copy_bytes(snap, conn, offset, length)
                    if failed is not None:
                        self._break(snap, failed)
                        return
                    # Only now: a bit set before its data is in the store
                    # would send a reader to bytes that are not there.
                    set_bit_range(snap.copied, a, b)
                    snap.copied_bytes += length

    def _copy_bytes(self, snap: Snapshot, conn: Connection, offset: int, length: int) -> str | None:
        """Copy the disk's ``[offset, offset+length)`` into the store at the
        same offset; why it failed, or None.

        Through a buffer, not copy_file_range(2): on ext4 that waits for the
        writeback of the source range when its pages are dirty, which the
        granules a VM just wrote are (measured in the commit that chose).
        """
        data = bytearray(length)
        try:
            conn.pread(data, offset)
        except OSError as e:
            return f"reading the disk to copy failed: {_why(e)}"
        try:
            _pwrite_all(snap.store_fd, data, offset)
        except OSError as e:
            return f"store write failed: {_why(e)}"
        return None

    # -- the snapshot view -------------------------------------------------

    def read(self, snap: Snapshot, conn: Connection, buf: Any, offset: int) -> None:
        """Fill ``buf`` with the disk as at the instant, from ``offset``;
        EIO if the snapshot is broken or released, or a granule in the
        range is no longer protected."""
        view = memoryview(buf)
        end = offset + len(view)
        if end > snap.disk_size:
            raise OSError(errno.EIO, "read past the end of the disk")
        gran = snap.granularity
        pos = offset
        while pos < end:
            piece_end = min(end, (pos // PIECE + 1) * PIECE)
            with self.lock:
                if not snap.serving:
                    raise OSError(errno.EIO, f"snapshot {snap.name} is {snap.reason or 'released'}")
                g = pos >> snap.shift
                while pos < piece_end:
                    run_copied = snap.copied[g >> 3] >> (g & 7) & 1
                    run_end = pos
                    while run_end < piece_end:
                        if not snap.protected[g >> 3] >> (g & 7) & 1:
                            raise OSError(
                                errno.EIO,
                                f"snapshot {snap.name} no longer protects offset {g * gran}",
                            )
                        if (snap.copied[g >> 3] >> (g & 7) & 1) != run_copied:
                            break
                        run_end = min(piece_end, (g + 1) * gran)
                        g += 1
                    part = view[pos - offset : run_end - offset]
                    if run_copied:
                        _pread_all(snap.store_fd, part, pos)
                    else:
                        conn.pread(part, pos)
                    pos = run_end

    def trim(self, snap: Snapshot, count: int, offset: int) -> None:
        """The backup is done with ``[offset, offset+count)``: its whole
        granules stop being protected, and their store space is punched out."""
        inside = granules_inside(offset, count, snap.granularity, snap.disk_size)
        if not inside:
            return
        with self.lock:
            if not snap.serving:
                return
            # Unprotected first: from here a read of them fails, and a write
            # there copies nothing.
            clear_bit_range(snap.protected, inside.start, inside.stop)
            snap.copied_bytes -= bytes_in(
                snap.copied, inside.start, inside.stop, snap.granularity, snap.disk_size
            )
            held = count_bits(snap.copied, inside.start, inside.stop)
            clear_bit_range(snap.copied, inside.start, inside.stop)
            if held:
                start, length = granule_bytes(
                    inside.start, inside.stop, snap.granularity, snap.disk_size
                )
                try:
                    fallocate(snap.store_fd, _FALLOC_PUNCH, start, length)
                except OSError as e:  # the space stays taken; nothing reads it
                    log.warning("snapshot %s: cannot punch its store: %s", snap.name, e.strerror)

    # -- faults, release, queries -------------------------------------------

    def _break(self, snap: Snapshot, reason: str) -> None:
        """The snapshot stops protecting and serving; its store is freed.
        Caller holds ``lock`` (or is the only thread: start-up)."""
        first = snap.state != BROKEN
        snap.state, snap.reason = BROKEN, reason
        self.active = tuple(s for s in self.active if s is not snap)
        if first:
            log.error("snapshot %s is broken: %s", snap.name, reason)
        # Recorded in three ways, any one of which a restart finds: the
        # header says BROKEN, the store is no longer the disk's size, or
        # the map is gone. A tracker that goes on copying nothing while the
        # files still said "active" would serve a wrong snapshot after a
        # kill -9.
        recorded = False
        file = snap.file
        if file is None or file.header.flags & SnapFlag.BROKEN:
            recorded = True
        else:
            file.header.flags |= SnapFlag.BROKEN
            file.header.reason = reason
            try:
                file.write_reason()
                recorded = True
            except OSError as e:
                log.error("snapshot %s: cannot record that it broke: %s", snap.name, e.strerror)
        if snap.store_fd >= 0:
            try:
                os.ftruncate(snap.store_fd, 0)
                recorded = True
            except OSError as e:
                log.error("snapshot %s: cannot free its store: %s", snap.name, e.strerror)
        if not recorded:
            try:
                self.state.snapshot_path(snap.name).unlink()
            except OSError as e:
                log.critical("snapshot %s: broken, and no file can say so: %s (release it)",
                             snap.name, e.strerror)  # fmt: skip

    def get(self, name: str) -> Snapshot:
        try:
            return self.snapshots[name]
        except KeyError:
            raise no_such(name, self.state) from None

    def release(self, name: str) -> SnapshotInfo:
        """End snapshot ``name``: its map and store go; the bitmap stays."""
        with self.lock:
            snap = self.get(name)
            info = snap.info()
            snap.released = True
            del self.snapshots[name]
            self.active = tuple(s for s in self.active if s is not snap)
        remove_files(self.state, name, info.store)
        self._close(snap, unmap=False)
        log.info("snapshot %s released", name)
        return info

    def list(self) -> list[SnapshotInfo]:
        with self.lock:
            return [self.snapshots[n].info() for n in sorted(self.snapshots)]

    def exists(self, name: str) -> bool:
        return name in self.snapshots

    @staticmethod
    def _close(snap: Snapshot, *, durable: bool = False, unmap: bool = True) -> None:
        if snap.store_fd >= 0:
            if durable:
                with contextlib.suppress(OSError):
                    os.fsync(snap.store_fd)
            os.close(snap.store_fd)
            snap.store_fd = -1
        if snap.file is not None:
            if durable:
                with contextlib.suppress(OSError):
                    snap.file.flush()
            snap.file.close(unmap=unmap)

    def close(self) -> None:
        """A clean stop: the stores and maps made durable (a restart in this
        boot serves them again)."""
        with self.lock:
            snapshots = list(self.snapshots.values())
            self.snapshots.clear()
            self.active = ()
            for snap in snapshots:
                snap.released = True
        for snap in snapshots:
            self._close(snap, durable=True)


def _why(e: OSError) -> str:
    """The errno's own words: one short line whatever layer raised it."""
    return os.strerror(e.errno) if e.errno else str(e)


def _pwrite_all(fd: int, data: bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError(errno.EIO, "snapshot store shorter than the disk")
        view, offset = view[done:], offset + done


class SnapshotView:
    """One client's handle on the tracker's export ``@snapshot:NAME``:
    reads the disk as at the instant; a trim releases granules; no write."""

    def __init__(self, snapshots: SnapshotSet, snap: Snapshot, conn: Connection) -> None:
        self.snapshots = snapshots
        self.snapshot = snap
        self.conn = conn  # the disk, for granules not copied

    def pread(self, buf: Any, offset: int) -> None:
        self.snapshots.read(self.snapshot, self.conn, buf, offset)

    def trim(self, count: int, offset: int) -> None:
        self.snapshots.trim(self.snapshot, count, offset)

    def flush(self) -> None:
        pass  # nothing of the snapshot's needs to reach a disk for a client

    def cache(self, count: int, offset: int) -> None:
        pass

    def extents(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        return [(offset, count, 0)]  # all data: never zero where the snapshot had data

    def close(self) -> None:
        self.conn.close()
