"""What every fuzz target shares: the corpus, the disk and state directory a
target serves, raw sessions with deadlines, the health checks a target must
pass after each input, and Hypothesis strategies that mutate corpus entries.

A session is bytes a client sends. It is pumped while the replies are read
and thrown away (a server must never block on a client that reads), then the
client shuts its side: every server must then close within the deadline,
whatever it was sent. A server that does not is a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import nbd
from hypothesis import strategies as st

from dirtydiff import control
from dirtydiff import nbdproto as proto
from dirtydiff.disk import FileBackend
from dirtydiff.state import StateDir
from dirtydiff.store import BitmapStore
from sidecar.export import Export, NbdServer
from sidecar.export.tls import TlsCreds

CORPUS = Path(__file__).resolve().parent / "corpus"
KiB, MiB = 1 << 10, 1 << 20
# Small on purpose: every read a mutated session asks for is at most the disk,
# so a session's replies stay cheap however its lengths are mangled.
SIZE = 1 * MiB
GRANULE = 64 * KiB
BITMAP = "b0"
DIRTY_CONTEXT = proto.DIRTY_BITMAP_PREFIX + BITMAP
# Data extents of the sample disk, the rest are holes; and the ranges marked
# dirty in b0. Not aligned to anything, so extents have odd edges.
DATA = ((0, 64 * KiB), (200_000, 100_000), (SIZE - 4096, 4096))
DIRTY = ((0, 1), (300_000, 70_000), (SIZE - 1, 1))
SESSION_DEADLINE = 10.0  # per input: a server that takes longer has hung
CHECK_DEADLINE = 10.0


class Hang(AssertionError):
    """A server did not answer or close within the deadline."""


# corpus/nbd and corpus/control hold the seeds every target replays and
# mutates (fixed defects' seeds among them); corpus/regressions those replayed
# only by their own regression test in tests/test_fuzz.py, because they need a
# setup of their own (a client that stops reading, an NBD disk behind the
# export) or are too costly to mutate (reads of hundreds of MiB).
REGRESSIONS = "regressions"


def seeds(kind: str) -> list[tuple[str, bytes]]:
    """The corpus entries of one target, by file name."""
    return [(p.name, p.read_bytes()) for p in sorted((CORPUS / kind).iterdir()) if p.is_file()]


def save_seed(kind: str, name: str, data: bytes) -> Path | None:
    """Keep an input that broke a target as a regression seed (unless the
    corpus has it already)."""
    if any(known == data for _, known in seeds(kind)):
        return None
    path = CORPUS / kind / name
    path.write_bytes(data)
    return path


# -- what the targets serve ----------------------------------------------------


def disk_content() -> bytes:
    content = bytearray(SIZE)
    for i, (offset, length) in enumerate(DATA):
        content[offset : offset + length] = bytes([0x11 * (i + 1)]) * length
    return bytes(content)


def make_disk(path: Path) -> Path:
    """The sample disk, sparse: its holes are base:allocation's zero extents."""
    content = disk_content()
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA:
            f.seek(offset)
            f.write(content[offset : offset + length])
    return path


def make_state(path: Path, *, bitmap: bool = True) -> StateDir:
    """A state directory for the sample disk, with a consistent b0."""
    path.mkdir(mode=0o700, exist_ok=True)
    state = StateDir(path)
    lock = state.try_lock()
    assert lock is not None
    try:
        state.record_disk(SIZE, "fuzz sample disk")
        store = BitmapStore(state, SIZE, recording=False)
        try:
            if bitmap:
                store.add(BITMAP, GRANULE)
                store.mark_ranges(BITMAP, list(DIRTY))
        finally:
            store.close()
    finally:
        lock.release()
    return state


# -- deadlines -------------------------------------------------------------------

T = TypeVar("T")


def within(seconds: float, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread, or Hang if it takes longer than ``seconds``.

    libnbd's calls have no timeout of their own; a server that hangs must fail
    the input, not freeze the run. A thread left stuck is a daemon.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # reported in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run, name=f"deadline:{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise Hang(f"{what}: no answer within {seconds}s")
    if failure:
        raise failure[0]
    return result[0]


# -- raw sessions ------------------------------------------------------------------


@dataclass
class Outcome:
    received: int = 0
    head: bytearray = field(default_factory=bytearray)  # the first bytes received
    closed: bool = False  # the server closed (or reset) the connection
    refused: int = 0  # bytes the server never took because it had closed

    HEAD: int = 1 << 16


class RawSession:
    """A client that sends exactly what it is given while reading everything.

    Non-blocking with one selector: a server that stops reading because its
    replies are not read would otherwise deadlock with a client that is
    still sending.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(SESSION_DEADLINE)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.outcome = Outcome()
        self._selector = selectors.DefaultSelector()

    def close(self) -> None:
        self._selector.close()
        self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.outcome.closed = True
            return
        out = self.outcome
        out.received += len(chunk)
        if len(out.head) < out.HEAD:
            out.head += chunk[: out.HEAD - len(out.head)]

    def pump(
        self, data: bytes, deadline: float, until: Callable[[Outcome], bool] | None = None
    ) -> None:
        """Send ``data`` whole, reading meanwhile; then read until ``until``
        holds (if given). Stops early if the server closes."""
        view = memoryview(data)
        end = time.monotonic() + deadline
        while not self.outcome.closed:
            wants = selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0)
            if not view and (until is None or until(self.outcome)):
                return
            left = end - time.monotonic()
            if left <= 0:
                raise Hang(
                    f"server neither took the input nor closed: {len(view)} bytes unsent, "
                    f"{self.outcome.received} received"
                )
            self._selector.register(self.sock, wants)
            try:
                events = self._selector.select(left)
            finally:
                self._selector.unregister(self.sock)
            for _, mask in events:
                if mask & selectors.EVENT_READ:
                    self._receive()
                if mask & selectors.EVENT_WRITE and view:
                    try:
                        view = view[self.sock.send(view[: 1 << 20]) :]
                    except (BrokenPipeError, ConnectionResetError):
                        self.outcome.closed = True
        self.outcome.refused = len(view)

    def finish(self, deadline: float = SESSION_DEADLINE) -> Outcome:
        """Shut our side; the server must close within the deadline."""
        with contextlib.suppress(OSError):  # already gone
            self.sock.shutdown(socket.SHUT_WR)
        self.pump(b"", deadline, until=lambda o: o.closed)
        return self.outcome


def session(path: Path, data: bytes, deadline: float = SESSION_DEADLINE) -> Outcome:
    with RawSession(path) as s:
        s.pump(data, deadline)
        return s.finish(deadline)


# -- the NBD server's health ----------------------------------------------------


@dataclass(frozen=True)
class View:
    """What a well-behaved client reads: all the data and both maps."""

    data: bytes
    maps: dict[str, tuple[int, ...]]


def nbd_client(uri: str) -> Any:
    h = nbd.NBD()
    h.add_meta_context(proto.BASE_ALLOCATION)
    h.add_meta_context(DIRTY_CONTEXT)
    if "tls-certificates=" in uri:
        h.set_uri_allow_local_file(True)  # the test's own certificates directory
    h.connect_uri(uri)
    return h


def read_view(h: Any) -> View:
    data = bytes(h.pread(SIZE, 0))
    maps: dict[str, list[int]] = {proto.BASE_ALLOCATION: [], DIRTY_CONTEXT: []}

    def extent(context: str, offset: int, entries: list[int], error: int) -> int:
        maps[context].extend(entries)
        return 0

    h.block_status(SIZE, 0, extent)
    return View(data, {k: tuple(v) for k, v in maps.items()})


def fresh_view(uri: str) -> View:
    """One new libnbd client from connect to close."""

    def run() -> View:
        h = nbd_client(uri)
        try:
            return read_view(h)
        finally:
            h.shutdown()  # the handle itself is freed with the object

    return within(CHECK_DEADLINE, f"fresh client of {uri}", run)


class Bystander:
    """A well-behaved client connected for a whole run: whatever the hostile
    clients do, its reads and block status must not change."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.h = within(CHECK_DEADLINE, "bystander connect", lambda: nbd_client(uri))
        self.view = within(CHECK_DEADLINE, "bystander first read", lambda: read_view(self.h))
        assert self.view.data == disk_content()

    def check(self) -> None:
        now = within(CHECK_DEADLINE, "bystander read", lambda: read_view(self.h))
        assert now == self.view, "a client connected all along sees another disk"
        assert fresh_view(self.uri) == self.view, "a new client sees another disk"

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the server may be gone: only cleanup
            self.h.shutdown()


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Memory:
    """RSS sampled across a run: after warm-up it may grow only a little
    (allocator slack, caches), never with the number of inputs."""

    pid: int
    limit: int = 64 * MiB
    baseline: int = 0
    peak: int = 0
    samples: int = 0

    def sample(self) -> None:
        now = rss(self.pid)
        self.samples += 1
        if not self.baseline:
            self.baseline = now
        self.peak = max(self.peak, now)
        assert now - self.baseline <= self.limit, (
            f"RSS of {self.pid} grew from {self.baseline >> 20} MiB to {now >> 20} MiB"
        )


# -- an NBD server in this process (atheris sees its coverage) ------------------


class InProcessNbd:
    """``NbdServer`` on a unix socket, its event loop in a thread of ours;
    with ``tls``, the socket requires TLS (its clients use ``tls_client``,
    a libnbd certificates directory)."""

    def __init__(
        self,
        disk: Path,
        state: StateDir,
        sock: Path,
        tls: TlsCreds | None = None,
        tls_client: Path | None = None,
    ) -> None:
        self.sock = sock
        self.tls_client = tls_client
        self.backend = FileBackend(str(disk), readonly=True)
        export = Export(
            name="",
            backend=self.backend,
            state=state,
            bitmap_filter=frozenset({BITMAP}),
            sendfile_path=disk,
        )
        self.server = NbdServer([export])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.listen_unix(sock, tls), self.loop).result(10)

    @property
    def uri(self) -> str:
        if self.tls_client is not None:
            return f"nbds+unix:///?socket={self.sock}&tls-certificates={self.tls_client}"
        return f"nbd+unix:///?socket={self.sock}"

    def close(self) -> None:
        """Stop serving; a second call does nothing."""
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()
            self.backend.close()


# -- control sockets -------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def frames_of(data: bytes) -> Iterator[tuple[bytes, bool]]:
    """Split a stream the way a control server frames it: (frame, whole),
    the last one possibly cut short or announcing an oversize length."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            yield data[pos:], False
            return
        (length,) = struct.unpack_from("!I", data, pos)
        end = pos + 4 + length
        if length > control.MAX_MESSAGE or end > len(data):
            yield data[pos:], False
            return
        yield data[pos:end], True
        pos = end


def read_reply(sock: socket.socket) -> control.Message | None:
    """One reply, with the socket's timeout; None if the server closed."""
    try:
        return control.read_message(sock)
    except TimeoutError:
        raise Hang("control server did not reply") from None
    except ConnectionResetError:
        return None


def control_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SESSION_DEADLINE)
    sock.connect(str(path))
    return sock


def check_reply(reply: control.Message) -> bool:
    """A reply is ok or a structured error; returns ok."""
    assert reply.get("version") == control.API_VERSION, reply
    if reply.get("ok") is True:
        assert "result" in reply, reply
        return True
    assert reply.get("ok") is False, reply
    error = reply.get("error")
    assert isinstance(error, dict), reply
    assert isinstance(error.get("code"), str), reply
    assert isinstance(error.get("message"), str), reply
    assert isinstance(error.get("kind", "error"), str), reply
    # "internal" is a server's own bug answered in one line: no input may
    # reach one.
    assert error.get("code") != "internal", reply
    return False


def framing_error(reply: control.Message) -> bool:
    error = reply.get("error") or {}
    return reply.get("ok") is False and error.get("kind", "protocol") == "protocol"


def ping(path: Path, sock: socket.socket | None = None, op: str = "ping") -> None:
    """A well-behaved request on ``sock`` (or a new connection) succeeds."""
    own = sock is None
    conn = control_socket(path) if sock is None else sock
    try:
        conn.sendall(control.encode(control.request(op)))
        reply = read_reply(conn)
        assert reply is not None, f"{path} closed a well-behaved client"
        assert reply.get("ok") is True, reply
    finally:
        if own:
            conn.close()


def snapshot(state: Path) -> dict[str, bytes]:
    """Every regular file of a state directory but its lock (which holds a
    pid): what a failed request must leave as it was."""
    found = {}
    for path in sorted(state.rglob("*")):
        if path.is_file() and not path.is_socket() and path.name != "lock":
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                found[str(path.relative_to(state))] = path.read_bytes()
    return found


def control_exchange(path: Path, data: bytes, state: Path | None = None) -> list[control.Message]:
    """Send a stream frame by frame, checking each reply as it comes.

    Every whole frame gets exactly one reply, ok or a structured error. Only
    a framing error (kind "protocol") ends the connection. With ``state``, a
    failed request must leave the state directory's files unchanged.
    """
    replies: list[control.Message] = []
    with control_socket(path) as sock:
        for chunk, whole in frames_of(data):
            before = snapshot(state) if state is not None and whole else None
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                if whole:
                    raise AssertionError(f"connection ended after {replies[-1:]}") from None
                # An oversize frame: the server may refuse it from its length
                # prefix and close before the rest is sent; its reply is read below.
            if not whole:
                # Cut short or oversize: the server may say so, then must close.
                with contextlib.suppress(OSError):  # already closed by the server
                    sock.shutdown(socket.SHUT_WR)
                reply = read_reply(sock)
                if reply is not None:
                    check_reply(reply)
                    assert framing_error(reply), reply
                    replies.append(reply)
                    assert read_reply(sock) is None, "connection open after a framing error"
                return replies
            reply = read_reply(sock)
            assert reply is not None, f"no reply to a whole frame {chunk[:64]!r}"
            ok = check_reply(reply)
            replies.append(reply)
            if framing_error(reply):
                assert read_reply(sock) is None, "connection open after a framing error"
                return replies
            if not ok and before is not None and state is not None:
                assert snapshot(state) == before, f"failed request changed the state: {reply}"
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock) is None, "a reply nobody asked for"
    return replies


# -- Hypothesis: corpus entries, mutated ----------------------------------------

# Values that sit on the edges of the protocols' length and offset checks.
INTERESTING = (
    0,
    1,
    0x7F,
    0xFF,
    0x7FFF,
    0xFFFF,
    proto.MAX_STRING,
    proto.MAX_STRING + 1,
    proto.MAX_OPTION,
    proto.MAX_OPTION + 1,
    SIZE - 1,
    SIZE,
    SIZE + 1,
    proto.MAX_REQUEST,
    proto.MAX_REQUEST + 1,
    control.MAX_MESSAGE,
    control.MAX_MESSAGE + 1,
    0x7FFFFFFF,
    0xFFFFFFFF,
    2**63 - 1,
    2**64 - 1,
)

Edit = tuple[Any, ...]


def _edits(splices: list[bytes]) -> st.SearchStrategy[Edit]:
    pos = st.integers(0, 1 << 16)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 32)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("int"), pos, st.sampled_from(INTERESTING), st.sampled_from((2, 4, 8))),
        st.tuples(st.just("splice"), pos, st.sampled_from(splices), pos, st.integers(1, 64)),
        st.tuples(st.just("repeat"), pos, st.integers(1, 64), st.integers(2, 40)),
    )


def apply(data: bytes, edits: list[Edit]) -> bytes:
    out = bytearray(data)
    for edit in edits:
        kind, at = edit[0], edit[1] % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << edit[2]
        elif kind == "byte" and at < len(out):
            out[at] = edit[2]
        elif kind == "insert":
            out[at:at] = edit[2]
        elif kind == "delete":
            del out[at : at + edit[2]]
        elif kind == "truncate":
            del out[at:]
        elif kind == "int":
            value, width = edit[2], edit[3]
            out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        elif kind == "splice":
            source, start, count = edit[2], edit[3] % (len(edit[2]) + 1), edit[4]
            out[at:at] = source[start : start + count]
        elif kind == "repeat":
            out[at:at] = bytes(out[at : at + edit[2]]) * edit[3]
    return bytes(out)


def mutated(entries: list[bytes]) -> st.SearchStrategy[bytes]:
    """A corpus entry with a few edits: bits flipped, bytes set, inserted,
    deleted, cut, an edge value written as an integer, another entry's bytes
    spliced in, a run repeated (many requests in flight)."""
    return st.builds(apply, st.sampled_from(entries), st.lists(_edits(entries), max_size=6))


# -- generated messages ----------------------------------------------------------


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function, not a lambda: Hypothesis reads the source of
    # ``extend`` to check that it recurses, and a lambda spread over several
    # lines defeats it (a deprecation warning, an error here).
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["b0", "@open", "cp1", "nope", "", "../x", "a/b"])
    | st.binary(max_size=8),
    _containers,
    max_leaves=8,
)
ARG_NAMES = (
    "name",
    "granularity",
    "enabled",
    "timeout",
    "ranges",
    "restart",
    "target",
    "sources",
    "disk",
    "backup",
    "max_rate",
    "chunk",
    "in_flight",
    "created_ns",
)


def control_messages(ops: list[str]) -> st.SearchStrategy[bytes]:
    """A framed msgpack map: mostly well-formed requests with random args."""
    args = st.dictionaries(
        st.sampled_from(ARG_NAMES) | st.text(max_size=6), msgpack_values, max_size=4
    )
    message = st.fixed_dictionaries(
        {"version": st.just(1) | msgpack_values, "op": st.sampled_from(ops) | msgpack_values},
        optional={"args": args | msgpack_values},
    )
    return message.map(lambda m: frame(msgpack.packb(m, use_bin_type=True)))
