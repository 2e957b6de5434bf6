"""Files in a state directory, opened without trusting what is there.

Whoever can write in a state directory can plant a symlink under the name of
one of its files (``lock``, ``disk.json``, a bitmap, a scan record, a
temporary) and have dirtydiff, often root, truncate or overwrite whatever the
link points to. Two rules close that, as ssh's StrictModes does for
``~/.ssh``:

- The directory is refused unless only trusted users can write in it
  (``check_directory``): never one writable by group or others, and, for a
  process that writes in it, only one owned by the process's own user or by
  root. ``bitmaps/`` and ``scans/`` must be real directories, not symlinks,
  under the same rules. Group *traversal* (mode 0710) stays allowed: the
  sidecar's ``--control-group`` needs it.
- No symlink inside it is ever followed: every file is opened with
  O_NOFOLLOW and must be a regular file (``open_file``); a temporary is made
  with O_EXCL|O_NOFOLLOW after whatever holds its name was removed (a
  temporary never holds a bit, so a leftover is nothing to keep), then renamed
  over the real name (a rename replaces a symlink, never follows it).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from dirtydiff import errors

# O_NONBLOCK: a FIFO planted under a file's name must not hang the open (a
# regular file ignores the flag).
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_directory(path: Path, what: str, *, writer: bool, follow: bool = False) -> None:
    """Refuse a directory whose contents others could have planted.

    ``follow``: ``path`` may be a symlink (the state directory itself, which
    an operator names); a subdirectory inside it may not. ``writer``: the
    process writes in it, so its owner must be the process's user or root
    (a reader, e.g. a ``--control-group`` member's command that only talks
    to the sidecar, may use a directory another trusted user owns).
    """
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise errors.NotFound("no-state-dir", f"{what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise errors.Corrupt(
            "untrusted-file",
            f"{what} {path} is a symlink, which dirtydiff never follows in a state directory; "
            "put the directory itself there",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise errors.BadRequest("no-state-dir", f"{what} {path} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = "group and others" if mode & 0o022 == 0o022 else "group" if mode & 0o020 else "others"
        # Only the state directory itself is ever meant for a group to enter.
        group = " (0710 lets a --control-group in)" if follow else ""
        raise errors.PermissionDenied(
            "unsafe-state-dir",
            f"{what} {path} is writable by {who} (mode {mode:04o}), who could plant symlinks "
            f"in it; fix: chmod 0700 {path}{group}",
        )
    euid = os.geteuid()
    if writer and st.st_uid not in (euid, 0):
        trusted = _user(euid) + (" or root" if euid else "")
        raise errors.PermissionDenied(
            "unsafe-state-dir",
            f"{what} {path} is owned by {_user(st.st_uid)}, not by {trusted} (who runs this), "
            f"and its owner could plant symlinks in it; fix: chown {_user(euid)} {path}",
        )


def make_directory(path: Path, what: str) -> None:
    """``path`` exists as a directory of ours (made 0700 if missing) and is
    safe to write in."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise errors.BadRequest(
            "state-dir-unwritable", f"cannot create {path}: {e.strerror}"
        ) from None
    check_directory(path, what, writer=True)


def _untrusted(path: Path, kind: str) -> errors.Corrupt:
    return errors.Corrupt(
        "untrusted-file",
        f"{path} is {kind}, not a regular file; dirtydiff follows no symlink in a state "
        "directory: remove it",
    )


def open_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` of a file in a state directory: never through a symlink,
    and only a regular file. Raises Corrupt for anything else; OSError
    (FileNotFoundError...) as ``os.open`` does."""
    try:
        fd = os.open(path, flags | _NO_FOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # what O_NOFOLLOW answers for a symlink
            raise _untrusted(path, "a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _untrusted(path, "a special file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: Path) -> bytes:
    """The whole content of a (small) file in a state directory."""
    fd = open_file(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_temporary(path: Path, mode: int = 0o600) -> int:
    """A new, empty file under the temporary name ``path``, open for reading
    and writing. Whatever had that name goes first: a temporary that a
    crash left never held anything to keep, and a planted one is not ours
    to write through."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, mode)


def replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` under ``path`` in one rename, through a temporary next to
    it (``.NAME.new``)."""
    tmp = path.with_name(f".{path.name}.new")
    fd = create_temporary(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
