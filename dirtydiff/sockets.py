"""Unix sockets the tracker and the sidecar listen on: born with their mode,
and removed only by the process that bound them.

A socket's path is only a name. Between a bind and a chmod, or before the
unlink at exit, something else may have come to hold it: a second sidecar's
socket, a symlink, a restarted server's. So:

- A socket is bound under a umask that gives it its mode at birth: no chmod
  ever follows on a path that may no longer be ours. A group is given by
  lchown, after lstat showed that the path still holds the socket we bound.
- The socket's inode stays pinned by an O_PATH descriptor: while it is open
  the inode cannot be freed and its number reused, so an lstat that finds the
  same device and inode at the path finds our socket and no other. Only then
  is it removed at exit.
- At start, a path already there is replaced only if it is a socket nobody
  answers on (left by a process killed outright); a live server's socket, a
  symlink or any other file is refused with one line, never unlinked.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from dirtydiff import errors

# How long a start waits for a server that may still answer on the path.
_PROBE_TIMEOUT = 2.0


def clear_path(path: Path) -> None:
    """Make room for a new socket at ``path``: remove a stale socket (its
    server died without removing it), refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise errors.Conflict(
            "not-a-socket",
            f"{path} exists and is {kind}: dirtydiff replaces only a socket it left; "
            "remove it, or choose another path",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            # Nobody listens: a server killed outright left it.
            path.unlink(missing_ok=True)
            return
        except FileNotFoundError:
            return  # removed meanwhile
        except OSError:
            pass  # a server we may not reach, or that does not answer in time: in use
    raise errors.Conflict("socket-in-use", f"{path} is in use by a running server")


class SocketFile:
    """The file of a unix socket this process bound, pinned by an O_PATH
    descriptor so that it is told from any other file put at its path."""

    def __init__(self, path: Path) -> None:
        """Pin what ``path`` holds now: call right after the bind."""
        self.path = path
        self._pin = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self._pin)
        if not stat.S_ISSOCK(st.st_mode):
            os.close(self._pin)
            raise errors.Conflict("not-a-socket", f"{path} was replaced right after its bind")
        self._identity = (st.st_dev, st.st_ino)

    def is_ours(self) -> bool:
        """Whether ``path`` still names the socket we bound."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def set_group(self, gid: int) -> None:
        """Give the socket to group ``gid`` (its mode it had at birth)."""
        if gid < 0:
            return
        if not self.is_ours():
            raise errors.Conflict("socket-replaced", f"{self.path} was replaced after its bind")
        os.chown(self.path, -1, gid, follow_symlinks=False)

    def remove(self) -> None:
        """Unlink the socket if the path still names it, and let go of it.
        A path that holds another file by now (another server's socket) is
        left as it is."""
        if self._pin < 0:
            return
        try:
            if self.is_ours():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._pin)
            self._pin = -1


def bind(path: Path, mode: int) -> tuple[socket.socket, SocketFile]:
    """A unix socket bound at ``path`` (the caller listens), born with
    ``mode`` (e.g. 0o600) by the umask at the bind itself. Whatever was at
    ``path`` must be a stale socket (``clear_path``)."""
    clear_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask is per process: both callers bind before any thread of theirs
        # could create a file meanwhile.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        owned = SocketFile(path)
    except BaseException:
        sock.close()
        raise
    return sock, owned
