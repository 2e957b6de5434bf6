"""The state directory: the identity of one tracked disk.

Layout::

    STATE/disk.json            what disk the bitmaps describe (its size)
    STATE/lock                 flock()ed by the tracker for its whole life;
                               holding it is what makes a process the owner
                               of the recording bitmaps
    STATE/tracker.sock         the tracker's control socket
    STATE/bitmaps/NAME.bitmap  one file per bitmap (see bitmapfile)

The bitmap named ``@open`` is the open checkpoint interval: it records every
change since the last checkpoint and is frozen under a name by the next one.

Who may change what: the owner of the lock is the only writer of bitmap files.
A command run while no tracker runs takes the lock itself (so no tracker can
start meanwhile) and works on the files; while a tracker runs, it asks the
tracker over the control socket.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.bitmapfile import (
    HEADER_SIZE,
    BitmapFile,
    Flag,
    Header,
    Reason,
    inconsistency,
)

OPEN_CHECKPOINT = "@open"
# While a diff scan fills bitmap NAME, "@scan:NAME" records the writes made
# meanwhile; the scan's result is the diff OR these writes.
SCAN_WRITES_PREFIX = "@scan:"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,199}")
BITMAP_SUFFIX = ".bitmap"


def check_name(name: str) -> None:
    """Bitmap names users may give: what QEMU accepts, minus path characters."""
    if not _NAME.fullmatch(name):
        raise errors.BadRequest(
            "bad-name",
            f"bad bitmap name {name!r}: use 1-200 of A-Z a-z 0-9 _ . : + -, "
            "not starting with . : + -",
        )


@dataclass(frozen=True)
class BitmapInfo:
    """What ``bitmap list`` and ``status`` tell about one bitmap."""

    name: str
    granularity: int
    disk_size: int
    enabled: bool
    recording: bool
    consistent: bool
    reason: str
    dirty_bytes: int
    generation: int
    backup: str  # the backup it counts changes from, "" if not known
    # When this bitmap was created (ns since the epoch): a bitmap removed and
    # added again under the same name is another bitmap, and a scan record
    # left by the first must not answer for the second.
    created_ns: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


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
    )


class StateLock:
    """The exclusive flock on STATE/lock, with the holder's pid inside."""

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
        if not self.path.is_dir():
            raise errors.BadRequest(
                "no-state-dir", f"state directory {self.path} is not a directory"
            )
        self.bitmaps_dir = self.path / "bitmaps"
        self.lock_path = self.path / "lock"
        self.socket_path = self.path / "tracker.sock"
        self.sidecar_socket_path = self.path / "sidecar.sock"  # the sidecar's control API
        self.disk_path = self.path / "disk.json"

    # -- ownership -------------------------------------------------------

    def try_lock(self) -> StateLock | None:
        """Take the state lock, or return None when another process holds it."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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

    def holder_pid(self) -> int | None:
        try:
            return int(self.lock_path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def prepare(self) -> None:
        """Make sure the directory can hold bitmaps (the owner calls this)."""
        try:
            self.bitmaps_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise errors.BadRequest(
                "state-dir-unwritable", f"cannot create {self.bitmaps_dir}: {e.strerror}"
            ) from None
        if not os.access(self.bitmaps_dir, os.W_OK | os.X_OK):
            raise errors.BadRequest(
                "state-dir-unwritable", f"state directory {self.bitmaps_dir} is not writable"
            )
        for leftover in self.bitmaps_dir.glob(".*.new"):
            # A creation that crashed before its rename: never held any bit.
            leftover.unlink()

    # -- the disk --------------------------------------------------------

    def disk_size(self) -> int | None:
        try:
            record = json.loads(self.disk_path.read_text())
            return int(record["size"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise errors.Corrupt(f"{self.disk_path}: unreadable ({e})") from None

    def record_disk(self, size: int, source: str) -> None:
        tmp = self.disk_path.with_name(".disk.json.new")
        tmp.write_text(json.dumps({"size": size, "source": source}) + "\n")
        os.rename(tmp, self.disk_path)

    # -- bitmaps ---------------------------------------------------------

    def bitmap_path(self, name: str) -> Path:
        return self.bitmaps_dir / f"{name}{BITMAP_SUFFIX}"

    def names(self) -> list[str]:
        if not self.bitmaps_dir.is_dir():
            return []
        return sorted(
            p.name[: -len(BITMAP_SUFFIX)]
            for p in self.bitmaps_dir.iterdir()
            if p.name.endswith(BITMAP_SUFFIX) and not p.name.startswith(".")
        )

    def open_bitmap(self, name: str, *, writable: bool = False) -> BitmapFile:
        path = self.bitmap_path(name)
        if not path.exists():
            raise errors.NotFound("unknown-bitmap", f"no bitmap named {name!r} in {self.path}")
        return BitmapFile(path, writable=writable)

    def read_header(self, name: str) -> Header:
        path = self.bitmap_path(name)
        try:
            with path.open("rb") as f:
                return Header.unpack(f.read(HEADER_SIZE), str(path))
        except FileNotFoundError:
            raise errors.NotFound("unknown-bitmap", f"no bitmap named {name!r}") from None
