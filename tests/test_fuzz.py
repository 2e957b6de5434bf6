"""Fuzzing the NBD server and the control sockets (see tests/fuzz/__init__.py).

Each target first replays every corpus entry, then takes corpus entries
mutated by Hypothesis and sessions Hypothesis generates. The invariants:
no crash, no hang (a deadline per input), bounded memory (RSS sampled after
every input), other clients unaffected (a client connected all along and a
new one are served as before), only framing errors end a control connection,
and a failed control request changes no file of the state directory.

The default run is short; ``DIRTYDIFF_FUZZ_EXAMPLES=20000`` makes every
Hypothesis test run that many examples (with ``--timeout=0``: the suite's
per-test timeout would cut a long run short). A failing input is written to the
corpus as ``crash-<hash>`` (the smallest one each test found), so that the
replay keeps it as a regression seed; every defect found gets a regression test
here, named after what it caught (its seed in corpus/regressions when it
needs a setup of its own).
"""

from __future__ import annotations

import gc
import hashlib
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtydiff import control
from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Cmd, CmdFlag, Opt
from tests.conftest import Processes, Server, uri_of, wait_for_socket
from tests.fuzz import control_parsers, nbd_parsers
from tests.fuzz.control_server import ControlTarget, InProcessTracker
from tests.fuzz.harness import (
    BITMAP,
    DIRTY_CONTEXT,
    INTERESTING,
    REGRESSIONS,
    SIZE,
    Bystander,
    InProcessNbd,
    Memory,
    control_exchange,
    control_messages,
    control_socket,
    frame,
    make_disk,
    make_state,
    mutated,
    save_seed,
    seeds,
    session,
    within,
)
from tests.fuzz.nbd_server import NbdTarget
from tests.rawnbd import RawClient, info_payload, meta_payload

EXAMPLES = int(os.environ.get("DIRTYDIFF_FUZZ_EXAMPLES", "0"))


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,  # each input has its own deadline: a hang fails as Hang
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Seeds in corpus/regressions have their own regression tests at the end of
# this file.
# A failing input of a megabyte or more: Hypothesis warns that its repr is
# large, and under warnings-as-errors that warning would hide the failure.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

NBD_SEEDS = seeds("nbd")
CONTROL_SEEDS = seeds("control")
T = TypeVar("T")


@dataclass
class Failures:
    """The smallest failing input of each target, kept as a corpus seed."""

    smallest: dict[str, bytes]

    def run(self, kind: str, data: bytes, fn: Callable[[bytes], T]) -> T:
        try:
            return fn(data)
        except BaseException:
            known = self.smallest.get(kind)
            if known is None or len(data) < len(known):
                self.smallest[kind] = data
            raise


@pytest.fixture(scope="module")
def failures() -> Iterator[Failures]:
    found = Failures({})
    yield found
    for kind, data in found.smallest.items():
        # The seed a target broke on: replayed by every later run.
        save_seed(kind, f"crash-{hashlib.sha1(data).hexdigest()[:12]}", data)


# -- targets -----------------------------------------------------------------------


@dataclass
class Serve:
    server: Server
    control: Path
    nbd: NbdTarget


def start_serve(
    procs: Processes, tmp: Path, *extra: str, tracked: bool = False
) -> tuple[Server, Path]:
    """``dirtydiff serve`` of the sample disk; ``tracked``: behind a real
    tracker, so that the sidecar routes bitmap requests over its socket."""
    disk = make_disk(tmp / "disk.raw")
    state = make_state(tmp / "state")
    sock = tmp / "serve.sock"
    source = procs.tracker(state.path, disk=disk).uri if tracked else str(disk)
    server = procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state.path),
         "--disk", source, "--socket", str(sock), *extra], sock,
    )  # fmt: skip
    control_path = state.path / "sidecar.sock"
    wait_for_socket(control_path, server.proc)
    return server, control_path


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``dirtydiff serve`` of the sample disk with b0, fuzzed over NBD."""
    tmp = tmp_path_factory.mktemp("serve")
    procs = Processes(tmp)
    bystander = None
    try:
        server, control_path = start_serve(procs, tmp, "--bitmap", BITMAP)
        bystander = Bystander(server.uri)
        yield Serve(
            server, control_path, NbdTarget(server.sock, bystander, Memory(server.proc.pid))
        )
        assert server.proc.poll() is None, server.stderr()
    finally:
        if bystander is not None:
            bystander.close()
        procs.stop_all()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlTarget]:
    """STATE/sidecar.sock of another ``dirtydiff serve``: a request that
    starts a scan must not disturb the NBD target's bitmap. A tracker runs,
    as in production: the sidecar forwards what it parsed over the
    tracker's socket (a timeout=inf once overflowed that forwarding)."""
    tmp = tmp_path_factory.mktemp("sidecar")
    procs = Processes(tmp)
    try:
        server, control_path = start_serve(procs, tmp, tracked=True)
        with control_socket(control_path) as bystander:
            # No state check: a scan a request started changes the state
            # directory in the background, between later requests.
            yield ControlTarget(
                control_path, None, bystander, Memory(server.proc.pid), probe="scan.list"
            )
        assert server.proc.poll() is None, server.stderr()
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def tracker_control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlTarget]:
    """The tracker's ControlServer in this process, over a recording store."""
    tmp = tmp_path_factory.mktemp("tracker")
    tracker = InProcessTracker(tmp / "state")
    try:
        with control_socket(tracker.path) as bystander:
            yield ControlTarget(tracker.path, tmp / "state", bystander)
    finally:
        tracker.close()


# -- the NBD server --------------------------------------------------------------


@pytest.mark.parametrize("data", [d for _, d in NBD_SEEDS], ids=[n for n, _ in NBD_SEEDS])
def test_nbd_corpus_replays(serve: Serve, failures: Failures, data: bytes) -> None:
    failures.run("nbd", data, serve.nbd.run)


@fuzz_settings(150)
@given(mutated([d for _, d in NBD_SEEDS]))
def test_nbd_mutated_sessions(serve: Serve, failures: Failures, data: bytes) -> None:
    failures.run("nbd", data, serve.nbd.run)


def _strings() -> st.SearchStrategy[str]:
    return st.sampled_from(["", "nope", proto.BASE_ALLOCATION, DIRTY_CONTEXT, "qemu:", "base:"]) | (
        st.text(max_size=12)
    )


def _option() -> st.SearchStrategy[bytes]:
    kinds = st.sampled_from(list(Opt)) | st.integers(0, 0xFFFFFFFF)
    payload = st.one_of(
        st.just(b""),
        st.builds(
            info_payload, _strings(), st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple)
        ),
        st.builds(meta_payload, _strings(), st.lists(_strings(), max_size=4).map(tuple)),
        st.binary(max_size=40),
    )
    return st.builds(
        lambda kind, data: proto.OPTION_HEADER.pack(proto.IHAVEOPT, kind, len(data)) + data,
        kinds,
        payload,
    )


def _request() -> st.SearchStrategy[bytes]:
    edges = st.sampled_from(INTERESTING)
    flags = st.sampled_from([0, *CmdFlag]) | st.integers(0, 0xFFFF)

    def build(kind: int, flag: int, offset: int, length: int, cookie: int, body: bytes) -> bytes:
        header = proto.REQUEST.pack(
            proto.REQUEST_MAGIC, flag, kind, cookie, offset % 2**64, length % 2**32
        )
        return header + (body if kind == Cmd.WRITE else b"")

    return st.builds(
        build,
        st.sampled_from(list(Cmd)) | st.integers(0, 0xFFFF),
        flags,
        edges | st.integers(0, SIZE),
        edges | st.integers(0, 1 << 16),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=600),
    )


def _session() -> st.SearchStrategy[bytes]:
    """Client flags, options haggled, an entry to transmission, requests."""
    flags = st.sampled_from([3, 1, 2, 0]) | st.integers(0, 0xFFFFFFFF)
    entry = st.sampled_from([
        b"",
        proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
        + proto.OPTION_HEADER.pack(
            proto.IHAVEOPT, Opt.SET_META_CONTEXT,
            len(meta_payload("", (proto.BASE_ALLOCATION, DIRTY_CONTEXT))),
        )
        + meta_payload("", (proto.BASE_ALLOCATION, DIRTY_CONTEXT))
        + proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, len(info_payload("")))
        + info_payload(""),
        proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, len(info_payload(""))) + info_payload(""),
        proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.EXPORT_NAME, 0),
    ])  # fmt: skip
    return st.builds(
        lambda f, options, go, requests: (
            proto.CLIENT_FLAGS.pack(f) + b"".join(options) + go + b"".join(requests)
        ),
        flags,
        st.lists(_option(), max_size=5),
        entry,
        st.lists(_request(), max_size=12),
    )


@fuzz_settings(60)
@given(_session())
def test_nbd_generated_sessions(serve: Serve, failures: Failures, data: bytes) -> None:
    failures.run("nbd", data, serve.nbd.run)


def test_nbd_in_process_server_replays_the_corpus(tmp_path: Path, failures: Failures) -> None:
    """The server as the atheris target runs it, in this process."""
    server = InProcessNbd(make_disk(tmp_path / "disk.raw"), make_state(tmp_path / "s"),
                          tmp_path / "nbd.sock")  # fmt: skip
    bystander = None
    try:
        bystander = Bystander(server.uri)
        target = NbdTarget(server.sock, bystander, Memory(os.getpid()))
        for _, data in NBD_SEEDS:
            failures.run("nbd", data, target.run)
    finally:
        if bystander is not None:
            bystander.close()
        server.close()


# -- control sockets --------------------------------------------------------------

TRACKER_OPS = sorted(control.HANDLERS)
# The sidecar serves the store's requests too (routed to the tracker or the
# files) and its own scan requests.
SIDECAR_OPS = [
    *TRACKER_OPS,
    *("scan.start", "scan.status", "scan.list", "scan.cancel", "scan.abort", "rebuild"),
]


def _framing() -> st.SearchStrategy[bytes]:
    """Frames whose framing is wrong: lengths past the limit or past the data."""
    return st.one_of(
        st.builds(struct.pack, st.just("!I"), st.integers(control.MAX_MESSAGE + 1, 2**32 - 1)),
        st.builds(
            lambda n, b: struct.pack("!I", n) + b, st.integers(1, 4096), st.binary(max_size=64)
        ),
        st.binary(max_size=3),
    )


def _control_streams(ops: list[str]) -> st.SearchStrategy[bytes]:
    whole = control_messages(ops) | st.binary(max_size=40).map(frame)
    return st.builds(
        lambda frames, last: b"".join(frames) + last,
        st.lists(whole, max_size=6),
        st.just(b"") | _framing(),
    )


@pytest.mark.parametrize("data", [d for _, d in CONTROL_SEEDS], ids=[n for n, _ in CONTROL_SEEDS])
def test_tracker_control_corpus_replays(
    tracker_control: ControlTarget, failures: Failures, data: bytes
) -> None:
    failures.run("control", data, tracker_control.run)


@fuzz_settings(150)
@given(mutated([d for _, d in CONTROL_SEEDS]) | _control_streams(TRACKER_OPS))
def test_tracker_control_fuzzed(
    tracker_control: ControlTarget, failures: Failures, data: bytes
) -> None:
    failures.run("control", data, tracker_control.run)


@pytest.mark.parametrize("data", [d for _, d in CONTROL_SEEDS], ids=[n for n, _ in CONTROL_SEEDS])
def test_sidecar_control_corpus_replays(
    sidecar: ControlTarget, failures: Failures, data: bytes
) -> None:
    failures.run("control", data, sidecar.run)


@fuzz_settings(100)
@given(mutated([d for _, d in CONTROL_SEEDS]) | _control_streams(SIDECAR_OPS))
def test_sidecar_control_fuzzed(sidecar: ControlTarget, failures: Failures, data: bytes) -> None:
    failures.run("control", data, sidecar.run)


def test_real_tracker_control_replays_the_corpus(
    procs: Processes, tmp_path: Path, failures: Failures
) -> None:
    """The same seeds against the tracker running under nbdkit."""
    state = make_state(tmp_path / "state").path
    tracker = procs.tracker(state, disk=make_disk(tmp_path / "disk.raw"))
    path = state / "tracker.sock"
    wait_for_socket(path, tracker.proc)
    with control_socket(path) as bystander:
        target = ControlTarget(path, state, bystander, Memory(tracker.proc.pid))
        for _, data in CONTROL_SEEDS:
            failures.run("control", data, target.run)
    assert tracker.proc.poll() is None, tracker.stderr()


# -- the pure parsers -------------------------------------------------------------


@pytest.mark.parametrize("data", [d for _, d in NBD_SEEDS], ids=[n for n, _ in NBD_SEEDS])
def test_nbd_parsers_on_the_corpus(data: bytes) -> None:
    nbd_parsers.one_input(data)


@fuzz_settings(300)
@given(mutated([d for _, d in NBD_SEEDS]) | _session() | st.binary(max_size=200))
def test_nbd_parsers_fuzzed(failures: Failures, data: bytes) -> None:
    failures.run("nbd", data, nbd_parsers.one_input)


@fuzz_settings(300)
@given(
    mutated([d for _, d in CONTROL_SEEDS]) | _control_streams(SIDECAR_OPS) | st.binary(max_size=200)
)
def test_control_parsers_fuzzed(failures: Failures, data: bytes) -> None:
    failures.run("control", data, control_parsers.one_input)


# -- defects the fuzzers found, fixed ----------------------------------------------------

MiB = 1 << 20


def _seed(name: str) -> bytes:
    """A defect's seed, wherever it is kept."""
    return dict(seeds("nbd") + seeds("control") + seeds(REGRESSIONS))[name]


def test_tracker_answers_a_request_whose_error_reply_would_be_over_the_limit(
    procs: Processes, tmp_path: Path
) -> None:
    """Caught by the control fuzzer: an error reply quoting a request near the
    size limit did not encode, and the tracker's connection thread died with
    no reply. Error messages are now bounded, and a reply too large to send
    becomes an error reply."""
    state = make_state(tmp_path / "state").path
    tracker = procs.tracker(state, disk=make_disk(tmp_path / "disk.raw"))
    path = state / "tracker.sock"
    wait_for_socket(path, tracker.proc)
    data = _seed("crash-error-reply-over-the-limit")
    try:
        replies = control_exchange(path, data, state)
    finally:
        assert tracker.proc.poll() is None, tracker.stderr()
    assert replies[0]["error"]["code"] == "unknown-op"


def test_sidecar_answers_a_request_whose_error_reply_would_be_over_the_limit(
    procs: Processes, tmp_path: Path
) -> None:
    """Caught by the control fuzzer: the same, in the sidecar's control socket
    (the client's task ended with no reply)."""
    server, path = start_serve(procs, tmp_path)
    data = _seed("crash-error-reply-over-the-limit")
    try:
        replies = control_exchange(path, data)
    finally:
        assert server.proc.poll() is None, server.stderr()
    assert replies[0]["error"]["code"] == "unknown-op"


def test_a_client_not_reading_its_replies_does_not_stall_other_clients(
    procs: Processes, tmp_path: Path
) -> None:
    """Caught by the NBD fuzzer: a read's buffer is held until its reply is
    with the kernel, and one client sending 16 reads of 32 MiB and reading no
    reply held the whole read budget, stalling every other client's reads.
    A connection now holds at most CONNECTION_READ_BUDGET."""
    disk = tmp_path / "data.raw"
    disk.write_bytes(b"\x55" * (64 * MiB))  # data, not holes: holes need no buffer
    upstream = procs.nbdkit("file", str(disk))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sock = tmp_path / "serve.sock"
    procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
         "--disk", upstream.uri, "--socket", str(sock)], sock,
    )  # fmt: skip
    with RawClient(sock) as hostile:
        hostile.send(_seed("crash-unread-replies-hold-the-read-budget"))
        assert hostile.recv(proto.SERVER_GREETING.size) is not None
        for _ in range(2):  # STRUCTURED_REPLY, GO
            assert hostile.option_replies()[-1][0] == proto.Rep.ACK
        # The first read's reply has started: all 16 reads are accepted and
        # the first 8 hold their budget; from here the client reads nothing.
        assert hostile.recv(proto.STRUCTURED_REPLY.size) is not None

        def other() -> bytes:
            h = nbd.NBD()
            h.connect_uri(uri_of(sock))
            try:
                return bytes(h.pread(4096, 0))
            finally:
                h.shutdown()

        assert within(3.0, "a well-behaved client's read", other) == b"\x55" * 4096


def test_a_connection_ended_by_a_bad_magic_leaves_no_coroutine_unawaited(tmp_path: Path) -> None:
    """Caught by the NBD fuzzer: BLOCK_STATUS then a bad magic in one packet
    ended the connection before the block-status task started, leaving its
    coroutine never awaited (a RuntimeWarning per request)."""
    data = _seed("crash-block-status-then-bad-magic")
    server = InProcessNbd(make_disk(tmp_path / "disk.raw"), make_state(tmp_path / "s"),
                          tmp_path / "nbd.sock")  # fmt: skip
    try:
        # Recorded, not raised: the warning comes from the server's thread,
        # whenever the coroutine is collected.
        with warnings.catch_warnings(record=True) as found:
            warnings.simplefilter("always")
            for _ in range(20):
                session(server.sock, data)
            server.close()
            gc.collect()
    finally:
        server.close()
    assert not [w for w in found if "never awaited" in str(w.message)]
