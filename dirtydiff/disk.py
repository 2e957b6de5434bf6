"""Disk access: a local file or block device, or an NBD export.

The tracker forwards the VM's requests to one of these; the export and the
scan read through them. ``BACKENDS`` is the one table from where a disk is
(a path, or a URI's scheme) to the backend that opens it. Both backends raise
OSError with an errno that nbdkit passes to the client, and neither imports
nbdkit, so tests drive them directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from dirtydiff.nbdproto import STATE_HOLE, STATE_ZERO

# Extent types: nbdkit's EXTENT_HOLE / EXTENT_ZERO are base:allocation's bits.
EXTENT_HOLE = STATE_HOLE
EXTENT_ZERO = STATE_ZERO

Extent = tuple[int, int, int]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which os.posix_fallocate cannot pass."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


class Connection(Protocol):
    def pread(self, buf: Any, offset: int) -> None: ...
    def pwrite(self, buf: Any, offset: int, fua: bool) -> None: ...
    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None: ...
    def trim(self, count: int, offset: int, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def cache(self, count: int, offset: int) -> None: ...
    def extents(self, count: int, offset: int) -> list[Extent]: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


class Backend(Protocol):
    size: int
    readonly: bool
    can_trim: bool
    can_zero: bool
    can_fast_zero: bool
    can_fua_native: bool
    can_multi_conn: bool
    can_cache: bool
    can_flush: bool
    can_extents: bool

    def connect(self) -> Connection: ...
    def close(self) -> None: ...
    def describe(self) -> str: ...


class FileBackend:
    """A raw file or block device, shared by every connection through one fd.

    One fd for all connections makes multi-conn safe: a flush on any
    connection is an fdatasync of the same file.
    """

    can_fua_native = False  # nbdkit emulates FUA with a flush after the write
    can_multi_conn = True
    can_cache = True
    can_zero = True
    can_flush = True
    can_extents = True  # SEEK_DATA/SEEK_HOLE, or "all data" where unsupported

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            if readonly or e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise OSError(e.errno, f"cannot open disk {path}: {e.strerror}") from None
            # Like nbdkit's file plugin: a disk we may only read is served
            # read-only; nbdkit refuses writes before they reach us.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.readonly = True
        mode = os.fstat(self.fd).st_mode
        self.is_block = stat.S_ISBLK(mode)
        if not (self.is_block or stat.S_ISREG(mode)):
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"disk {path} is neither a regular file nor a block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.can_trim = True
        self.can_fast_zero = True
        self._connection = _FileConnection(self)

    def connect(self) -> Connection:
        return self._connection

    def describe(self) -> str:
        return f"file:{os.path.abspath(self.path)}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def file_extents(
    fd: int, size: int, count: int, offset: int, *, limit: int | None = None
) -> list[Extent]:
    """The holes and data of [offset, offset+count) of the file ``fd`` of
    ``size`` bytes, by SEEK_DATA/SEEK_HOLE; with ``limit``, at most that many
    extents, which may then end before offset+count."""
    end = offset + count
    found: list[Extent] = []
    pos = offset
    while pos < end and (limit is None or len(found) < limit):
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from pos to the end of the file
                data = size
            elif not found:
                return [(offset, count, 0)]  # no SEEK_DATA here: all data
            else:
                break
        if data > pos:
            found.append((pos, min(data, end) - pos, EXTENT_HOLE | EXTENT_ZERO))
        if data >= end or (limit is not None and len(found) >= limit):
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        found.append((data, min(hole, end) - data, 0))
        pos = hole
    return found


class _FileConnection:
    def __init__(self, backend: FileBackend) -> None:
        self._b = backend
        self._fd = backend.fd

    def pread(self, buf: Any, offset: int) -> None:
        want = len(buf)
        done = os.preadv(self._fd, [buf], offset)
        while done < want:
            view = memoryview(buf)[done:]
            n = os.preadv(self._fd, [view], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "read past the end of the disk")
            done += n

    def pwrite(self, buf: Any, offset: int, fua: bool) -> None:
        want = len(buf)
        done = os.pwrite(self._fd, buf, offset)
        while done < want:
            done += os.pwrite(self._fd, memoryview(buf)[done:], offset + done)

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if may_trim and not self._b.is_block:
            try:
                fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count)
                return
            except OSError as e:
                if not _unsupported(e):
                    raise
        try:
            fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, count)
            return
        except OSError as e:
            if not _unsupported(e):
                raise
        if fast:
            raise OSError(errno.ENOTSUP, "no fast way to zero this range")
        zeroes = bytes(min(count, _ZERO_CHUNK))
        end = offset + count
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.pwrite(memoryview(zeroes)[:n], offset, False)
            offset += n

    def trim(self, count: int, offset: int, fua: bool) -> None:
        try:
            fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count)
        except OSError as e:
            # Trim is advisory: leaving the data is a valid answer.
            if not _unsupported(e):
                raise

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def cache(self, count: int, offset: int) -> None:
        os.posix_fadvise(self._fd, offset, count, os.POSIX_FADV_WILLNEED)

    def extents(self, count: int, offset: int) -> list[Extent]:
        return file_extents(self._fd, self._b.size, count, offset)

    def alive(self) -> bool:
        return self._b.fd >= 0

    def close(self) -> None:
        pass  # the fd belongs to the backend


class NbdBackend:
    """An upstream NBD export (e.g. qemu-nbd serving qcow2), one libnbd handle per connection."""

    def __init__(self, uri: str, *, readonly: bool = False) -> None:
        # Debian's python3-libnbd; imported here so file-only users need not have it.
        import nbd  # noqa: PLC0415

        self._nbd = nbd
        self.uri = uri
        self._shared: Any = None  # the one upstream connection, without multi-conn
        self._shared_lock = threading.Lock()
        self._users = 0
        probe = self._handle(full_info=True)
        try:
            self.size = probe.get_size()
            try:  # a dirtydiff tracker names its state directory here
                self.description: str | None = probe.get_export_description()
            except nbd.Error:
                self.description = None
            self.readonly = readonly or bool(probe.is_read_only())
            self.can_trim = bool(probe.can_trim())
            self.can_fast_zero = bool(probe.can_fast_zero())
            self.can_zero = bool(probe.can_zero())
            self.can_fua_native = bool(probe.can_fua())
            self.can_multi_conn = bool(probe.can_multi_conn())
            self.can_cache = bool(probe.can_cache())
            self.can_flush = bool(probe.can_flush())
            self.can_extents = bool(probe.can_meta_context("base:allocation"))
        finally:
            _disconnect(probe)

    def _handle(self, *, full_info: bool = False) -> Any:
        h = self._nbd.NBD()
        h.add_meta_context("base:allocation")
        h.set_full_info(full_info)
        try:
            h.connect_uri(self.uri)
        except self._nbd.Error as e:
            del h
            raise OSError(
                e.errnum or errno.EIO, f"cannot connect to {self.uri}: {e.string}"
            ) from None
        return h

    def connect(self) -> Connection:
        if self.can_multi_conn:
            return _NbdConnection(self, self._handle())
        # Without multi-conn the upstream promises nothing across its
        # connections: a write completed on one may not be seen by a read on
        # another. A checkpoint's drain and a scan reading through the
        # tracker rely on exactly that, so every connection shares one
        # upstream connection (libnbd handles are thread-safe; their
        # requests are then served in turn).
        with self._shared_lock:
            if self._shared is None:
                self._shared = self._handle()
            self._users += 1
            return _NbdConnection(self, self._shared, shared=True)

    def _release(self) -> None:
        with self._shared_lock:
            self._users -= 1
            if self._users == 0 and self._shared is not None:
                _disconnect(self._shared)
                self._shared = None

    def describe(self) -> str:
        return self.uri

    def close(self) -> None:
        pass


class _NbdConnection:
    def __init__(self, backend: NbdBackend, handle: Any, *, shared: bool = False) -> None:
        self._backend = backend
        self._nbd = backend._nbd
        self._h = handle
        self._shared = shared

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._h, name)(*args)
        except self._nbd.Error as e:
            raise OSError(e.errnum or errno.EIO, e.string) from None

    def pread(self, buf: Any, offset: int) -> None:
        buf[:] = self._call("pread", len(buf), offset)

    def pwrite(self, buf: Any, offset: int, fua: bool) -> None:
        self._call("pwrite", bytes(buf), offset, self._nbd.CMD_FLAG_FUA if fua else 0)

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        flags = 0 if may_trim else self._nbd.CMD_FLAG_NO_HOLE
        if fast:
            flags |= self._nbd.CMD_FLAG_FAST_ZERO
        if fua:
            flags |= self._nbd.CMD_FLAG_FUA
        self._call("zero", count, offset, flags)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        self._call("trim", count, offset, self._nbd.CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._call("flush")

    def cache(self, count: int, offset: int) -> None:
        self._call("cache", count, offset)

    def extents(self, count: int, offset: int) -> list[Extent]:
        found: list[Extent] = []

        def collect(context: str, start: int, entries: list[int], err: Any) -> int:
            if context == "base:allocation":
                pos = start
                for i in range(0, len(entries) - 1, 2):
                    found.append((pos, entries[i], entries[i + 1] & (EXTENT_HOLE | EXTENT_ZERO)))
                    pos += entries[i]
            return 0

        self._call("block_status", count, offset, collect)
        end = offset + count
        return [(o, min(n, end - o), t) for o, n, t in found if o < end]

    def alive(self) -> bool:
        """False once libnbd knows the upstream connection broke or closed."""
        h = self._h
        return h is not None and not (h.aio_is_dead() or h.aio_is_closed())

    def close(self) -> None:
        if self._h is None:
            return
        if self._shared:
            self._backend._release()
        else:
            _disconnect(self._h)
        self._h = None


def _disconnect(handle: Any) -> None:
    """Say NBD_CMD_DISC politely; the handle is freed when collected."""
    with contextlib.suppress(Exception):  # the upstream may already be gone
        handle.shutdown()


# Where a disk can be: a path (no scheme) is a file or block device, and these
# URI schemes are NBD exports, as libnbd's nbd_connect_uri accepts them (vsock
# is left out: nothing of ours listens there). libnbd refuses a URI that names
# a local file (tls-psk-file) unless told otherwise, which we never do.
NBD_SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")
PATH = ""  # the "scheme" of a plain path
BACKENDS: dict[str, Callable[..., Backend]] = {
    PATH: FileBackend,
    **dict.fromkeys(NBD_SCHEMES, NbdBackend),
}


def scheme(where: str) -> str:
    """``PATH`` for a path, else the scheme of the URI ``where``."""
    name, sep, _ = where.partition("://")
    if sep and name and name[0].isalpha() and all(c.isalnum() or c in "+-." for c in name):
        return name
    return PATH


def is_nbd_uri(where: str) -> bool:
    """Whether ``where`` is an NBD URI of one of NBD_SCHEMES."""
    return scheme(where) in NBD_SCHEMES


def open_backend(where: str, *, readonly: bool = False) -> Backend:
    """The backend for ``where``; OSError if it cannot be opened."""
    kind = scheme(where)
    factory = BACKENDS.get(kind)
    if factory is None:
        schemes = ", ".join(f"{s}://" for s in NBD_SCHEMES)
        raise OSError(errno.EPROTONOSUPPORT, f"{kind}:// is not a disk: give a path or {schemes}")
    return factory(where, readonly=readonly)
