"""The state directory: the identity of one tracked disk.

Layout::

    STATE/disk.json            what disk the bitmaps describe: its size, its
                               source, an id of this state directory (the
                               tracker names it in its export description)
                               and, for a local disk, the file's identity
    STATE/lock                 flock()ed by the tracker for its whole life;
                               holding it is what makes a process the owner
                               of the recording bitmaps
    STATE/tracker.sock         the tracker's control socket
    STATE/sidecar.lock         flock()ed by the sidecar: one per state
    STATE/sidecar.sock         the sidecar's control socket
    STATE/bitmaps/NAME.bitmap  one file per bitmap (see bitmapfile)
    STATE/scans/NAME.json      an unfinished scan's position (sidecar.scan.job)
    STATE/snapshots/NAME.snap  a point-in-time snapshot's map (snapshotfile)
    STATE/snapshots/NAME.store its store, unless --snapshot-dir put it elsewhere

The bitmap named ``@open`` is the open checkpoint interval: it records every
change since the last checkpoint and is frozen under a name by the next one.

Who may change what: the owner of the lock is the only writer of bitmap files.
A command run while no tracker runs takes the lock itself (so no tracker can
start meanwhile) and works on the files; while a tracker runs, it asks the
tracker over the control socket.

Nothing in the directory is trusted to be what it seems (``statefiles``): a
directory others may write in is refused, and no symlink in it is followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.bitmapfile import (
    HEADER_SIZE,
    BitmapFile,
    Flag,
    Header,
    Reason,
    current_boot_id,
    inconsistency,
)
from dirtydiff.statefiles import check_directory, make_directory, open_file, read_file, replace_file

OPEN_CHECKPOINT = "@open"
# While a diff scan fills bitmap NAME, "@scan:NAME" records the writes made
# meanwhile; the scan's result is the diff OR these writes.
SCAN_WRITES_PREFIX = "@scan:"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,199}")
BITMAP_SUFFIX = ".bitmap"


# The tracker's NBD export description: a scan that reads the disk through a
# tracker can tell which state directory's tracker it reads.
_TRACKER_DESCRIPTION = "dirtydiff tracker of state {id}"
_TRACKER_ID = re.compile(r"dirtydiff tracker of state ([0-9a-f]{32})")


def tracker_description(state_id: str) -> str:
    return _TRACKER_DESCRIPTION.format(id=state_id)


def tracker_id(description: str | None) -> str | None:
    """The state id a tracker's export description names, or None."""
    found = _TRACKER_ID.fullmatch(description or "")
    return found.group(1) if found else None


FileIdentity = tuple[str, int, int]


def file_identity(fd: int) -> FileIdentity:
    """What names a local disk whatever path reaches it: the device of a
    block device, the device and inode of a regular file."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return ("block", os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("file", st.st_dev, st.st_ino)


@dataclass(frozen=True)
class DiskSeen:
    """What a scan or an export found when it opened a disk."""

    where: str  # the path or URI it was given
    size: int
    file: FileIdentity | None = None  # a local file or block device
    tracker: str | None = None  # the state id a dirtydiff tracker's description names


@dataclass(frozen=True)
class DiskRecord:
    """STATE/disk.json: the one disk every bitmap of the state describes."""

    size: int
    source: str  # the tracker's backend: file:PATH, or its upstream URI
    id: str  # this state directory's id ("" in a record from before ids)
    file: FileIdentity | None = None
    # The boot ``file`` was seen in: device numbers (of a block device, or
    # of the filesystem holding a file) may change at the next boot.
    boot: str = ""
    # Written by a tracker (else by an import, an export or an offline scan
    # of a state no tracker ran on yet: the first tracker takes it over).
    tracked: bool = True

    def same_file(self, seen: DiskSeen) -> bool | None:
        """Whether the local file ``seen`` is this disk: True, False, or None
        when nothing tells (the identity is from another boot, and the path
        differs)."""
        if seen.file is None:
            return None
        if self.file is not None and self.boot == current_boot_id().hex():
            return seen.file == self.file
        if self.source.startswith("file:") and os.path.realpath(seen.where) == os.path.realpath(
            self.source[len("file:") :]
        ):
            return True  # an identity from another boot (or none): the same path will do
        return None

    def names_file(self, identity: FileIdentity) -> bool:
        """Whether a tracker recorded the local file of ``identity`` as this
        disk, in this boot: no path, and no identity from another boot (whose
        device numbers may name something else now), counts."""
        return (
            self.tracked
            and self.source.startswith("file:")
            and self.file == identity
            and self.boot == current_boot_id().hex()
        )

    def same_source(self, source: str, seen: DiskSeen) -> bool:
        """Whether a tracker starting on ``source`` serves the disk recorded:
        only what proves it does counts (a disk moved elsewhere, or a record
        an import made from an export of the disk, does not)."""
        if self.source.startswith("file:") != source.startswith("file:"):
            return False
        if source.startswith("file:"):
            return self.same_file(seen) is True
        return source == self.source

    def check(
        self, seen: DiskSeen, *, tracker_runs: bool, state: Path, require_proof: bool = True
    ) -> None:
        """Raise Conflict unless ``seen`` is proven to be this disk (or,
        without ``require_proof``, if it is proven not to be).

        With a tracker running, only two things prove it: the tracker's own
        export (its description names this state) or the very file it serves.
        Anything else could be another disk of the same size, and a bitmap
        filled from it would call granules clean that the VM wrote.
        """
        if seen.size != self.size:
            raise errors.Conflict(
                "disk-size-mismatch",
                f"the disk {seen.where} has {seen.size} bytes but {state} describes a disk of "
                f"{self.size} bytes",
            )
        if seen.tracker is not None:
            if seen.tracker == self.id:
                return
            raise errors.Conflict(
                "wrong-disk",
                f"{seen.where} is the tracker of another state directory, not of {state}",
            )
        same = self.same_file(seen)
        if same is True:
            return
        if same is False:
            raise errors.Conflict(
                "wrong-disk",
                f"{seen.where} is not the disk of {state} ({self.source})",
            )
        if not require_proof or (not tracker_runs and seen.where == self.source):
            return  # (the tracker's upstream, read while no tracker runs)
        how = (
            "read it through the tracker's socket, or read its file"
            if tracker_runs
            else f"read {self.source}, or the disk through its tracker"
        )
        raise errors.Conflict(
            "unproven-disk",
            f"cannot tell that {seen.where} is the disk of {state} ({self.source}): {how}",
        )


def record_first_disk(
    state: StateDir, size: int, source: str, file: FileIdentity | None = None
) -> None:
    """Give a state directory that was never tracked its disk, as a
    tracker's first start would: ``source``, of ``size`` bytes, and with
    ``file`` that very file. For a bitmap imported, or a disk served, before
    any tracker ran: every later tracker, scan and export is then held to
    it (``DiskRecord.check``; a tracker to its size, through the bitmaps).

    Under the state lock, and only if there is no record yet: a process
    holding the lock (a tracker records its own disk) or a record already
    made is left as it is."""
    lock = state.try_lock()
    if lock is None:
        return
    try:
        if state.disk() is None:
            state.prepare()
            state.record_disk(size, source, file)
    finally:
        lock.release()


def check_name(name: str) -> None:
    """Bitmap names users may give: what QEMU accepts, minus path characters."""
    if not _NAME.fullmatch(name):
        raise errors.BadRequest(
            "bad-name",
            f"bad bitmap name {name!r}: use 1-200 of A-Z a-z 0-9 _ . : + -, "
            "not starting with . : + -",
        )


def is_user_name(name: str) -> bool:
    """Whether bitmap ``name`` is a result users see (``StateDir.user_names``),
    not a scan's scratch ``@scan:NAME``."""
    return not name.startswith(SCAN_WRITES_PREFIX)


@dataclass(frozen=True)
class BitmapInfo:
    """What ``bitmap list`` and ``status`` tell about one bitmap."""

    name: str
    granularity: int
    disk_size: int
    enabled: bool
    recording: bool
    consistent: bool
    reason: str  # for people: why it is inconsistent, or "consistent"
    dirty_bytes: int
    generation: int
    backup: str  # the backup it counts changes from, "" if not known
    # When this bitmap was created (ns since the epoch): a bitmap removed and
    # added again under the same name is another bitmap, and a scan record
    # left by the first must not answer for the second.
    created_ns: int
    # For programs: ``reason_code(why)``, what code decides by (never ``reason``).
    reason_code: str = "consistent"

    @property
    def why(self) -> Reason:
        """Why it is inconsistent (Reason.NONE if it is not)."""
        return REASONS_BY_CODE[self.reason_code]

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def reason_code(reason: Reason) -> str:
    """A Reason as the control protocol names it: ``scan-in-progress``."""
    return "consistent" if reason is Reason.NONE else reason.name.lower().replace("_", "-")


REASONS_BY_CODE = {reason_code(r): r for r in Reason}


def describe(name: str, bitmap: BitmapFile, *, recording: bool) -> BitmapInfo:
    header = bitmap.header
    why = inconsistency(header)
    return BitmapInfo(
        name=name,
        granularity=bitmap.granularity,
        disk_size=header.disk_size,
        enabled=bool(header.flags & Flag.ENABLED),
        recording=recording,
        consistent=why is Reason.NONE,
        reason=why.describe(),
        dirty_bytes=min(bitmap.dirty_granules() * bitmap.granularity, header.disk_size),
        generation=header.generation,
        backup=header.backup,
        created_ns=header.created_ns,
        reason_code=reason_code(why),
    )


class StateLock:
    """An exclusive flock on STATE/lock (or STATE/sidecar.lock), with the
    holder's pid inside."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise errors.NotFound(
                "no-state-dir",
                f"state directory {self.path} does not exist "
                f"(create it: mkdir -m 0700 {self.path})",
            )
        # Every process refuses a directory others may write in, readers too
        # (the export reads bitmaps; a command connects to the sockets here).
        check_directory(self.path, "state directory", writer=False, follow=True)
        self.bitmaps_dir = self.path / "bitmaps"
        self.scans_dir = self.path / "scans"
        self.snapshots_dir = self.path / "snapshots"
        for sub in (self.bitmaps_dir, self.scans_dir, self.snapshots_dir):
            if os.path.lexists(sub):
                check_directory(sub, "directory", writer=False)
        self.lock_path = self.path / "lock"
        self.socket_path = self.path / "tracker.sock"
        self.sidecar_lock_path = self.path / "sidecar.lock"  # held by the one sidecar
        self.sidecar_socket_path = self.path / "sidecar.sock"  # the sidecar's control API
        self.disk_path = self.path / "disk.json"

    # -- ownership -------------------------------------------------------

    def check_writer(self) -> None:
        """Refuse to write in a directory owned by another user than this
        process's (or root): its owner could plant what we would write
        through. Asked before every first write: taking a lock, making a
        subdirectory."""
        check_directory(self.path, "state directory", writer=True, follow=True)

    def try_lock(self) -> StateLock | None:
        """Take the state lock, or return None when another process holds it."""
        return self._try_flock(self.lock_path)

    def try_lock_sidecar(self) -> StateLock | None:
        """Take the sidecar's lock (one sidecar per state directory), or
        return None when another sidecar holds it."""
        return self._try_flock(self.sidecar_lock_path)

    def _try_flock(self, path: Path) -> StateLock | None:
        self.check_writer()
        try:
            fd = open_file(path, os.O_RDWR | os.O_CREAT)
        except PermissionError:
            raise errors.BadRequest(
                "state-dir-unwritable", f"state directory {self.path} is not writable"
            ) from None
        except OSError as e:
            raise errors.BadRequest(
                "state-dir-unwritable", f"state directory {self.path}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return StateLock(fd)

    def holder_pid(self, path: Path | None = None) -> int | None:
        """The pid written in STATE/lock (or ``path``, another lock file)."""
        try:
            return int(read_file(path or self.lock_path).strip() or b"0") or None
        except (OSError, ValueError, errors.Corrupt):
            return None

    def prepare(self) -> None:
        """Make sure the directory can hold bitmaps (the owner calls this)."""
        self.check_writer()
        make_directory(self.bitmaps_dir, "directory")
        if not os.access(self.bitmaps_dir, os.W_OK | os.X_OK):
            raise errors.BadRequest(
                "state-dir-unwritable", f"state directory {self.bitmaps_dir} is not writable"
            )
        for pattern in (".*.new", ".*.clearing"):
            for leftover in self.bitmaps_dir.glob(pattern):
                # A creation (or a clear) that crashed before its rename:
                # never held any bit. (unlink removes a symlink, not its target.)
                leftover.unlink()

    def prepare_scans(self) -> None:
        """Make sure STATE/scans can hold scan records."""
        self.check_writer()
        make_directory(self.scans_dir, "directory")

    def prepare_snapshots(self) -> None:
        """Make sure STATE/snapshots can hold snapshot maps and stores."""
        self.check_writer()
        make_directory(self.snapshots_dir, "directory")

    def snapshot_path(self, name: str) -> Path:
        """The map file of snapshot ``name`` (``dirtydiff.snapshotfile``)."""
        return self.snapshots_dir / f"{name}.snap"

    def snapshot_names(self) -> list[str]:
        if not os.path.lexists(self.snapshots_dir):
            return []
        return sorted(
            p.name[: -len(".snap")]
            for p in self.snapshots_dir.iterdir()
            if p.name.endswith(".snap") and not p.name.startswith(".")
        )

    # -- the disk --------------------------------------------------------

    def disk_size(self) -> int | None:
        record = self.disk()
        return None if record is None else record.size

    def disk(self) -> DiskRecord | None:
        """What STATE/disk.json says, or None if the state was never tracked."""
        try:
            record = json.loads(read_file(self.disk_path))
            found = record.get("file")
            file = None if found is None else (str(found[0]), int(found[1]), int(found[2]))
            state_id = str(record.get("id", ""))
            if state_id and not re.fullmatch(r"[0-9a-f]{32}", state_id):
                raise ValueError(f"bad id {state_id!r}")
            boot = str(record.get("boot", ""))
            tracked = record.get("tracked", True) is not False
            return DiskRecord(
                int(record["size"]), str(record["source"]), state_id, file, boot, tracked
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise errors.Corrupt(f"{self.disk_path}: unreadable ({e})") from None

    def record_disk(
        self, size: int, source: str, file: FileIdentity | None = None, *, tracked: bool = False
    ) -> DiskRecord:
        """Record the disk the bitmaps describe; the state's id stays, or is
        made now."""
        try:
            known = self.disk()
        except errors.Corrupt:
            known = None
        # os.urandom is what secrets.token_hex reads; importing secrets loads
        # OpenSSL (hmac), milliseconds of every command's start.
        state_id = known.id if known is not None and known.id else os.urandom(16).hex()
        boot = current_boot_id().hex()
        record = DiskRecord(size, source, state_id, file, boot, tracked)
        body: dict[str, object] = {"size": size, "source": source, "id": state_id}
        if not tracked:
            body["tracked"] = False
        if file is not None:
            body["file"] = list(file)
            body["boot"] = boot
        replace_file(self.disk_path, (json.dumps(body) + "\n").encode())
        return record

    # -- bitmaps ---------------------------------------------------------

    def bitmap_path(self, name: str) -> Path:
        return self.bitmaps_dir / f"{name}{BITMAP_SUFFIX}"

    def names(self) -> list[str]:
        if not os.path.lexists(self.bitmaps_dir):
            return []
        return sorted(
            p.name[: -len(BITMAP_SUFFIX)]
            for p in self.bitmaps_dir.iterdir()
            if p.name.endswith(BITMAP_SUFFIX) and not p.name.startswith(".")
        )

    def user_names(self) -> list[str]:
        """The bitmaps that are results: not a scan's scratch ``@scan:NAME``,
        which the export, the metrics and the rebuild on start leave out."""
        return [name for name in self.names() if is_user_name(name)]

    def open_bitmap(self, name: str, *, writable: bool = False) -> BitmapFile:
        try:
            return BitmapFile(self.bitmap_path(name), writable=writable)
        except errors.NotFound:
            raise errors.NotFound(
                "unknown-bitmap", f"no bitmap named {name!r} in {self.path}"
            ) from None

    def read_header(self, name: str) -> Header:
        return self.read_header_at(self.bitmap_path(name))

    @staticmethod
    def read_header_at(path: Path) -> Header:
        try:
            fd = open_file(path, os.O_RDONLY)
        except FileNotFoundError:
            raise errors.NotFound("unknown-bitmap", f"no bitmap file {path}") from None
        try:
            return Header.unpack(os.pread(fd, HEADER_SIZE, 0), str(path))
        finally:
            os.close(fd)
