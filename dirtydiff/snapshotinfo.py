"""What a snapshot is to those who read about it: ``SnapshotInfo``, and the
snapshots a state directory holds, read from their files (``read_snapshots``)
by a process that is not the tracker.

The tracker's own snapshots, copy-before-write and the snapshot view are in
``dirtydiff.snapshots``; the files' format in ``dirtydiff.snapshotfile``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.bitmapfile import current_boot_id, fsync_dir
from dirtydiff.snapshotfile import Scope, SnapFlag, SnapHeader, SnapshotFile, bytes_in
from dirtydiff.state import StateDir
from dirtydiff.statefiles import open_file

EXPORT_PREFIX = "@snapshot:"
ACTIVE = "active"
BROKEN = "broken"

HOST_RESTARTED = "host restarted since the snapshot was taken"


def export_name(name: str) -> str:
    return EXPORT_PREFIX + name


def size_text(n: int) -> str:
    """``64 MiB`` for a whole number of MiB (or GiB, KiB), else bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class SnapshotRequest:
    """The ``snapshot`` argument of a checkpoint."""

    scope: Scope = Scope.ALL
    dir: str | None = None  # where the store goes; None: STATE/snapshots
    limit: int | None = None  # bytes the store may hold; None: no limit


@dataclass(frozen=True)
class SnapshotInfo:
    """What ``snapshot.list`` and ``status`` tell about one snapshot."""

    name: str  # the checkpoint bitmap's name
    state: str  # "active" | "broken"
    reason: str | None  # why broken, one line
    scope: str  # "all" | "dirty"
    created_ns: int
    granularity: int
    disk_size: int
    protected_bytes: int
    copied_bytes: int
    store_bytes: int  # bytes allocated in the store file now
    limit: int | None
    store: str  # the store file's path
    export: str  # "@snapshot:NAME"

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, found: object) -> SnapshotInfo:
        """A SnapshotInfo back from a reply; ProtocolError if it has not the shape."""
        kinds: dict[str, type | tuple[type, ...]] = {
            "name": str, "state": str, "reason": (str, type(None)), "scope": str,
            "created_ns": int, "granularity": int, "disk_size": int, "protected_bytes": int,
            "copied_bytes": int, "store_bytes": int, "limit": (int, type(None)), "store": str,
            "export": str,
        }  # fmt: skip
        if not isinstance(found, dict) or not set(kinds) <= set(found):
            raise errors.ProtocolError("malformed-reply", f"not a snapshot: {found!r:.200}")
        for key, kind in kinds.items():
            value = found[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise errors.ProtocolError("malformed-reply", f"snapshot field {key!r}: {value!r}")
        return cls(**{key: found[key] for key in kinds})


def store_bytes_of(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def no_such(name: str, state: StateDir) -> errors.NotFound:
    return errors.NotFound("no-such-snapshot", f"no snapshot named {name!r} in {state.path}")


def describe(
    name: str, file: SnapshotFile | None, state: str, reason: str | None, store_fd: int
) -> SnapshotInfo:
    """The SnapshotInfo of a map (None: unreadable), its state and its store."""
    if file is None:
        return SnapshotInfo(name, BROKEN, reason, "all", 0, 0, 0, 0, 0, 0, None, "",
                            export_name(name))  # fmt: skip
    header = file.header
    gran, size = header.granularity, header.disk_size
    serving = state == ACTIVE
    store_bytes = 0
    if store_fd >= 0:
        with contextlib.suppress(OSError):
            store_bytes = store_bytes_of(store_fd)
    return SnapshotInfo(
        name=name,
        state=state,
        reason=reason,
        scope=header.scope.word,
        created_ns=header.created_ns,
        granularity=gran,
        disk_size=size,
        # A broken snapshot protects nothing and holds nothing it would serve.
        protected_bytes=bytes_in(file.protected, 0, file.granules, gran, size) if serving else 0,
        copied_bytes=bytes_in(file.copied, 0, file.granules, gran, size) if serving else 0,
        store_bytes=store_bytes,
        limit=header.limit or None,
        store=header.store,
        export=export_name(name),
    )


def why_not_exact(header: SnapHeader, disk_size: int, state_id: bytes | None) -> str | None:
    """Why a map found in the state directory no longer describes the disk
    as at its instant (None: nothing says so)."""
    if header.flags & SnapFlag.BROKEN:
        return header.reason or "broken"
    if header.boot_id != current_boot_id():
        return HOST_RESTARTED
    if header.disk_size != disk_size:
        return f"the disk changed size ({header.disk_size} to {disk_size} bytes)"
    if state_id is not None and header.state_id != state_id:
        return "the state directory now describes another disk"
    return None


def open_store(header: SnapHeader, *, writable: bool = False) -> tuple[int, str | None]:
    """The store's fd, opened as the map recorded it, or -1 and why not."""
    path = Path(header.store)
    try:
        fd = open_file(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        return -1, f"store file {path} is missing"
    except errors.Corrupt as e:
        return -1, e.message
    except OSError as e:
        return -1, f"store file {path}: {e.strerror}"
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (header.store_dev, header.store_ino):
        os.close(fd)
        return -1, f"store file {path} was replaced"
    if st.st_size != header.disk_size:
        os.close(fd)
        return -1, f"store file {path} has {st.st_size} bytes, not the disk's {header.disk_size}"
    return fd, None


def read_snapshots(state: StateDir) -> list[SnapshotInfo]:
    """Every snapshot the state directory holds, with its last state, for a
    process that is not the tracker (the tracker's answer is authoritative).
    A snapshot that could not be exact now (another boot, a store gone) is
    reported broken, as the tracker would make it at its start."""
    found = []
    disk = None
    with contextlib.suppress(errors.DirtydiffError):
        disk = state.disk()
    for name in state.snapshot_names():
        path = state.snapshot_path(name)
        try:
            file = SnapshotFile(path, writable=False)
        except errors.NotFound:
            continue  # released meanwhile
        except (errors.Corrupt, OSError) as e:
            reason = e.message if isinstance(e, errors.Corrupt) else f"{path}: {e.strerror}"
            found.append(describe(name, None, BROKEN, reason, -1))
            continue
        try:
            size = disk.size if disk is not None else file.header.disk_size
            why = why_not_exact(file.header, size, None)
            fd = -1
            if why is None or file.header.flags & SnapFlag.BROKEN:
                fd, missing = open_store(file.header)
                why = why or missing
            try:
                found.append(describe(name, file, ACTIVE if why is None else BROKEN, why, fd))
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            file.close()
    return found


def release_files(state: StateDir, name: str) -> SnapshotInfo:
    """Remove snapshot ``name``'s map and store (offline, under the state
    lock; the tracker uses ``SnapshotSet.release``). The bitmap stays."""
    for info in read_snapshots(state):
        if info.name == name:
            remove_files(state, name, info.store)
            return info
    raise no_such(name, state)


def remove_files(state: StateDir, name: str, store: str) -> None:
    # The map first: a store without a map is a leftover nothing reads; a
    # map without its store would be reported broken.
    state.snapshot_path(name).unlink(missing_ok=True)
    fsync_dir(state.snapshots_dir)
    if store:
        store_path = Path(store)
        with contextlib.suppress(FileNotFoundError):
            store_path.unlink()
        with contextlib.suppress(OSError):
            fsync_dir(store_path.parent)


def snapshot_exists(state: StateDir, name: str) -> None:
    """Refuse to remove bitmap ``name`` while its snapshot exists: the
    snapshot's export would serve a bitmap that vanished."""
    if os.path.lexists(state.snapshot_path(name)):
        raise errors.Conflict(
            "snapshot-exists",
            f"bitmap {name!r} has a snapshot; release it first (dirtydiff snapshot release {name})",
        )
