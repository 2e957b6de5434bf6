"""The control protocol: framing, parsing and dispatch, fed recorded bytes.

Framing is read from one end of a socketpair whose other end the test writes
and shuts down, so truncation looks exactly as a peer that went away does.
Dispatch runs against a real offline BitmapStore on a temporary state dir.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtydiff import control, errors
from dirtydiff.bitmapfile import BOOT_ID_ENV
from dirtydiff.control import handlers, wire
from dirtydiff.snapshots import SnapshotRequest, SnapshotSet
from dirtydiff.state import OPEN_CHECKPOINT, DiskSeen, StateDir
from dirtydiff.store import BitmapStore

BOOT_A = "8a5bd0c4-6a8e-4f3c-9d1e-0f6f2b7e1a01"
DISK = 1 << 24
FILE = ("file", 1, 2)  # the disk file's identity, as the state records it
SEEN = control.disk_seen(DiskSeen("disk.raw", DISK, file=FILE))


@pytest.fixture(autouse=True)
def boot_a(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BitmapStore]:
    state = StateDir(tmp_path)
    lock = state.try_lock()
    assert lock is not None
    state.record_disk(DISK, "file:disk.raw", FILE)
    store = BitmapStore(state, DISK, recording=False)
    try:
        yield store
    finally:
        store.close()
        lock.release()


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def packed(message: object) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return payload


def read_recorded(data: bytes, *, close: bool = True) -> control.Message | None:
    """read_message on a stream that carries ``data`` (then ends, if ``close``)."""
    reader, writer = socket.socketpair()
    with reader, writer:
        # A read past what was sent must fail the test, not hang it.
        reader.settimeout(5)
        writer.sendall(data)
        if close:
            writer.shutdown(socket.SHUT_WR)
        return control.read_message(reader)


def protocol_error(data: bytes, *, close: bool = True) -> str:
    with pytest.raises(errors.ProtocolError) as failed:
        read_recorded(data, close=close)
    return failed.value.code


# -- framing ------------------------------------------------------------------------


def test_one_message_round_trips() -> None:
    message = control.request("bitmap.add", name="b0", granularity=4096)
    assert read_recorded(control.encode(message)) == message
    assert control.encode(message) == frame(packed(message))


def test_clean_end_of_stream_is_none() -> None:
    assert read_recorded(b"") is None


def test_two_messages_on_one_stream() -> None:
    first, second = control.request("ping"), control.request("status")
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(5)
        writer.sendall(control.encode(first) + control.encode(second))
        writer.shutdown(socket.SHUT_WR)
        assert control.read_message(reader) == first
        assert control.read_message(reader) == second
        assert control.read_message(reader) is None


@pytest.mark.parametrize("prefix", [b"\x00", b"\x00\x00", b"\x00\x00\x00"])
def test_truncated_length_prefix(prefix: bytes) -> None:
    assert protocol_error(prefix) == "truncated"


@pytest.mark.parametrize("sent", [0, 1, 9])
def test_truncated_payload(sent: int) -> None:
    payload = packed({"version": 1, "op": "ping"})
    assert len(payload) > 9
    assert protocol_error(frame(payload)[: 4 + sent]) == "truncated"


@pytest.mark.parametrize("length", [control.MAX_MESSAGE + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_oversize_length_is_refused_before_reading_or_allocating(
    length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    recv_exactly: Callable[[socket.socket, int], bytes | None] = wire._recv_exactly

    def spy(sock: socket.socket, size: int) -> bytes | None:
        asked.append(size)
        return recv_exactly(sock, size)

    monkeypatch.setattr(wire, "_recv_exactly", spy)
    # The peer stays connected: waiting for the payload would time out.
    assert protocol_error(struct.pack("!I", length), close=False) == "too-large"
    assert asked == [4]
    with pytest.raises(errors.ProtocolError):
        control.frame_length(struct.pack("!I", length))


def test_length_at_the_limit_is_accepted() -> None:
    assert control.frame_length(struct.pack("!I", control.MAX_MESSAGE)) == control.MAX_MESSAGE
    assert control.frame_length(struct.pack("!I", 0)) == 0


def test_encode_refuses_an_oversize_message() -> None:
    with pytest.raises(errors.BadRequest) as failed:
        control.encode({"blob": bytes(control.MAX_MESSAGE)})
    assert failed.value.code == "too-large"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x85\xa1a", id="map-cut-short"),
        pytest.param(b"not msgpack at all", id="text"),
        pytest.param(packed({"version": 1}) + b"\x00", id="trailing-bytes"),
        pytest.param(packed({1: "x"}), id="int-key"),
        pytest.param(b"\x81\x90\x00", id="array-key"),
    ],
)
def test_non_msgpack_or_bad_map_is_malformed(payload: bytes) -> None:
    with pytest.raises(errors.ProtocolError) as failed:
        control.decode(payload)
    assert failed.value.code == "malformed"
    assert protocol_error(frame(payload)) == "malformed"


@pytest.mark.parametrize("message", [[1, 2], "op", 7, None, True, b"\x80"])
def test_msgpack_that_is_not_a_map_is_malformed(message: object) -> None:
    assert protocol_error(frame(packed(message))) == "malformed"


@st.composite
def mangled_messages(draw: st.DrawFn) -> bytes:
    """A real request with one byte changed and maybe cut short."""
    scalars = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6) | st.binary(max_size=6)
    message = draw(
        st.dictionaries(st.text(max_size=6), scalars | st.lists(scalars, max_size=3), min_size=1)
    )
    payload = packed(message)
    at = draw(st.integers(0, len(payload) - 1))
    payload = payload[:at] + bytes([draw(st.integers(0, 255))]) + payload[at + 1 :]
    return payload[: draw(st.integers(0, len(payload)))]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | mangled_messages())
def test_decode_raises_nothing_but_protocol_error(payload: bytes) -> None:
    try:
        message = control.decode(payload)
    except errors.ProtocolError as e:
        assert e.code == "malformed"
    else:
        assert isinstance(message, dict)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=48))
def test_read_message_on_random_streams_raises_nothing_but_protocol_error(data: bytes) -> None:
    try:
        message = read_recorded(data)
    except errors.ProtocolError as e:
        assert e.code in ("truncated", "too-large", "malformed")
    else:
        assert message is None or isinstance(message, dict)


# -- parsing --------------------------------------------------------------------------


def bad_request(message: object) -> str:
    with pytest.raises(errors.BadRequest) as failed:
        control.parse_request(message)  # type: ignore[arg-type]
    return failed.value.code


@pytest.mark.parametrize("version", [None, 0, 2, "1", True, 1.0, [1]])
def test_wrong_version(version: object) -> None:
    message: dict[str, object] = {"op": "ping"}
    if version is not None:
        message["version"] = version
    assert bad_request(message) == "bad-version"


@pytest.mark.parametrize("op", [None, "", "nope", "PING", "bitmap", 5, ["ping"]])
def test_unknown_op(op: object) -> None:
    message: dict[str, object] = {"version": 1}
    if op is not None:
        message["op"] = op
    assert bad_request(message) == "unknown-op"


@pytest.mark.parametrize("args", [[], "name", 1, None])
def test_args_must_be_a_map(args: object) -> None:
    assert bad_request({"version": 1, "op": "ping", "args": args}) == "bad-request"


def test_args_may_be_left_out() -> None:
    assert control.parse_request({"version": 1, "op": "ping"}) == ("ping", {})


WRONG_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("bitmap.info", {}),
    ("bitmap.info", {"name": 5}),
    ("bitmap.info", {"name": b"@open"}),
    ("bitmap.info", {"name": None}),
    ("bitmap.add", {"name": "b", "granularity": True}),
    ("bitmap.add", {"name": "b", "granularity": False}),
    ("bitmap.add", {"name": "b", "granularity": 65536.0}),
    ("bitmap.add", {"name": "b", "granularity": "65536"}),
    ("bitmap.add", {"name": "b", "enabled": 1}),
    ("bitmap.add", {"name": "b", "enabled": "yes"}),
    ("bitmap.add", {"name": ["b"]}),
    ("bitmap.remove", {"name": 0}),
    ("bitmap.clear", {}),
    ("bitmap.enable", {"name": {"x": 1}}),
    ("bitmap.disable", {"name": "b", "timeout": "5"}),
    ("bitmap.disable", {"name": "b", "timeout": True}),
    ("bitmap.mark", {"name": "b"}),
    ("bitmap.mark", {"name": "b", "ranges": [0, 4096]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0]]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0, 4096, 1]]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0, True]]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0, 4096], ["0", 4096]]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0.0, 4096]]}),
    ("bitmap.merge", {"target": OPEN_CHECKPOINT}),
    ("bitmap.merge", {"target": OPEN_CHECKPOINT, "sources": []}),
    ("bitmap.merge", {"target": OPEN_CHECKPOINT, "sources": "b"}),
    ("bitmap.merge", {"target": OPEN_CHECKPOINT, "sources": [OPEN_CHECKPOINT, 1]}),
    ("bitmap.merge", {"target": 1, "sources": [OPEN_CHECKPOINT]}),
    ("checkpoint", {}),
    ("checkpoint", {"name": 1}),
    ("checkpoint", {"name": "cp", "timeout": True}),
    ("checkpoint", {"name": "cp", "timeout": float("inf")}),
    ("checkpoint", {"name": "cp", "timeout": float("nan")}),
    ("checkpoint", {"name": "cp", "timeout": -1.0}),
    ("checkpoint", {"name": "cp", "timeout": 1e300}),
    ("checkpoint", {"name": "cp", "timeout": [1]}),
    # Every numeric argument: no infinity, NaN, bool or integer past 64 bits
    # gets past parsing (the sidecar routes what it parses to the tracker).
    ("checkpoint", {"name": "cp", "timeout": float("-inf")}),
    ("checkpoint", {"name": "cp", "timeout": 2**64 - 1}),
    ("bitmap.disable", {"name": "b", "timeout": float("nan")}),
    ("bitmap.add", {"name": "c", "granularity": float("inf")}),
    ("bitmap.add", {"name": "c", "granularity": 2**64 - 1}),
    ("bitmap.add", {"name": "c", "granularity": -(2**63)}),
    ("bitmap.remove", {"name": "b", "created_ns": True}),
    ("bitmap.remove", {"name": "b", "created_ns": float("nan")}),
    ("bitmap.remove", {"name": "b", "created_ns": 2**64 - 1}),
    ("bitmap.remove", {"name": "b", "created_ns": -1}),
    ("import.complete", {"name": "b", "created_ns": float("inf")}),
    ("scan.complete", {"name": "b", "created_ns": 2**63}),
    ("scan.begin", {"name": "s", "disk": SEEN, "granularity": 2**64 - 1}),
    ("bitmap.mark", {"name": "b", "ranges": [[2**64 - 1, 1]]}),
    ("bitmap.mark", {"name": "b", "ranges": [[0, float("inf")]]}),
    ("ping", {"timeout": float("inf")}),
    ("ping", {"max_rate": float("nan")}),
    ("ping", {"chunk": True}),
    ("ping", {"in_flight": 1e300}),
]


@pytest.mark.parametrize(("op", "args"), WRONG_ARGUMENTS)
def test_wrong_argument_types_are_bad_requests_that_change_nothing(
    store: BitmapStore, op: str, args: dict[str, Any]
) -> None:
    store.add("b")
    before = sorted(store.state.names())
    reply = control.dispatch(store, control.request(op, **args))
    assert reply["ok"] is False
    assert reply["error"]["kind"] == "bad-request"
    assert reply["error"]["code"] in ("bad-request", "bad-rate")
    assert reply["error"]["message"]
    assert sorted(store.state.names()) == before
    assert store.info("b").enabled
    assert store.info(OPEN_CHECKPOINT).generation == 1


# -- dispatch against a real store -------------------------------------------------------


def check_ping(store: BitmapStore, result: Any) -> None:
    assert result == {"api": control.API_VERSION}


def check_status(store: BitmapStore, result: Any) -> None:
    assert result["disk_size"] == DISK
    assert result["recording"] is False
    assert result["inflight"] == 0
    assert [b["name"] for b in result["bitmaps"]] == [OPEN_CHECKPOINT, "b"]


def check_list(store: BitmapStore, result: Any) -> None:
    assert [b["name"] for b in result] == [OPEN_CHECKPOINT, "b"]
    assert all(b["consistent"] and not b["recording"] for b in result)


def check_info(store: BitmapStore, result: Any) -> None:
    assert result["name"] == "b"
    assert result["dirty_bytes"] == 65536
    assert result["enabled"] is True


def check_add(store: BitmapStore, result: Any) -> None:
    assert (result["name"], result["granularity"], result["enabled"]) == ("new", 4096, False)
    assert "new" in store.state.names()


def check_remove(store: BitmapStore, result: Any) -> None:
    assert result is None
    assert store.state.names() == [OPEN_CHECKPOINT]


def check_clear(store: BitmapStore, result: Any) -> None:
    assert result["dirty_bytes"] == 0
    assert store.bitmaps["b"].dirty_granules() == 0


def check_enable(store: BitmapStore, result: Any) -> None:
    assert result["enabled"] is True


def check_disable(store: BitmapStore, result: Any) -> None:
    assert result["enabled"] is False
    assert store.info("b").enabled is False


def check_mark(store: BitmapStore, result: Any) -> None:
    assert result["name"] == "b"
    assert result["dirty_bytes"] == 3 * 65536  # granule 0 from before, then 5 and 6
    assert store.bitmaps["b"].bits[0] == 0b1100001


def check_merge(store: BitmapStore, result: Any) -> None:
    assert result["name"] == OPEN_CHECKPOINT
    assert result["dirty_bytes"] == 65536


def check_checkpoint(store: BitmapStore, result: Any) -> None:
    assert result == {"name": "cp1", "generation": 1, "drained": True, "dirty_bytes": 0}
    assert store.info(OPEN_CHECKPOINT).generation == 2


def check_scan_begin(store: BitmapStore, result: Any) -> None:
    info = store.info("s")
    assert result == {"resume": False, "granularity": 65536, "created_ns": info.created_ns}
    assert not info.consistent and "scan" in info.reason and not info.enabled


def check_scan_complete(store: BitmapStore, result: Any) -> None:
    assert result["name"] == "s" and result["consistent"] and result["enabled"]
    assert result["dirty_bytes"] == 65536


def check_scan_abort(store: BitmapStore, result: Any) -> None:
    assert result is None and "s" not in store.bitmaps


def check_import_complete(store: BitmapStore, result: Any) -> None:
    assert result["name"] == "i" and result["consistent"] and result["dirty_bytes"] == 65536


def scanning(store: BitmapStore) -> dict[str, Any]:
    begun = store.scan_begin("s", disk=handlers._disk({"disk": SEEN}))
    store.mark_ranges("s", [(0, 1)])
    return {"created_ns": begun["created_ns"]}


def importing(store: BitmapStore) -> dict[str, Any]:
    info = store.add("i", importing=True)
    assert not info.consistent and "import" in info.reason
    store.mark_ranges("i", [(0, 1)])
    return {"created_ns": info.created_ns}


def check_snapshot_list(store: BitmapStore, result: Any) -> None:
    assert [s["name"] for s in result["snapshots"]] == ["b"]
    assert result["snapshots"][0]["state"] == "active"


def check_snapshot_release(store: BitmapStore, result: Any) -> None:
    assert result["name"] == "b" and result["export"] == "@snapshot:b"
    assert store.state.snapshot_names() == []
    assert "b" in store.state.names()  # the bitmap stays


def snapshotted(store: BitmapStore) -> dict[str, Any]:
    # A snapshot as a tracker left it at a clean stop (offline, none is made).
    snapshots = SnapshotSet(store.state, store.disk_size, "")
    snapshots.start(snapshots.prepare("b", SnapshotRequest(), 65536), store.bitmaps["b"])
    snapshots.close()
    return {}


SETUP: dict[str, Callable[[BitmapStore], dict[str, Any]]] = {
    "snapshot.list": snapshotted,
    "snapshot.release": snapshotted,
    "scan.complete": scanning,
    "scan.abort": scanning,
    "import.complete": importing,
}

OPS: dict[str, tuple[dict[str, Any], Callable[[BitmapStore, Any], None]]] = {
    "scan.begin": ({"name": "s", "disk": SEEN}, check_scan_begin),
    "scan.complete": ({"name": "s"}, check_scan_complete),
    "import.complete": ({"name": "i"}, check_import_complete),
    "scan.abort": ({"name": "s"}, check_scan_abort),
    "ping": ({}, check_ping),
    "status": ({}, check_status),
    "bitmap.list": ({}, check_list),
    "bitmap.info": ({"name": "b"}, check_info),
    "bitmap.add": ({"name": "new", "granularity": 4096, "enabled": False}, check_add),
    "bitmap.remove": ({"name": "b"}, check_remove),
    "bitmap.clear": ({"name": "b"}, check_clear),
    "bitmap.enable": ({"name": "b"}, check_enable),
    "bitmap.disable": ({"name": "b", "timeout": 1.0}, check_disable),
    "bitmap.mark": ({"name": "b", "ranges": [[5 * 65536, 1], [6 * 65536 + 7, 100]]}, check_mark),
    "bitmap.merge": ({"target": OPEN_CHECKPOINT, "sources": ["b"]}, check_merge),
    "checkpoint": ({"name": "cp1", "timeout": 5}, check_checkpoint),
    "snapshot.list": ({}, check_snapshot_list),
    "snapshot.release": ({"name": "b"}, check_snapshot_release),
}


def test_every_handler_has_a_dispatch_test() -> None:
    assert set(OPS) == set(control.HANDLERS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_dispatch_each_op_on_an_offline_store(store: BitmapStore, op: str) -> None:
    store.add("b")
    store.bitmaps["b"].mark(0, 1)
    args, check = OPS[op]
    if op in SETUP:
        args = {**args, **SETUP[op](store)}
    # Through the wire format, as a client's request arrives.
    message = read_recorded(control.encode(control.request(op, **args)))
    assert message is not None
    reply = control.dispatch(store, message)
    assert reply["version"] == control.API_VERSION
    assert reply["ok"] is True, reply
    check(store, read_recorded(control.encode(reply))["result"])  # type: ignore[index]
    check(store, control.result_of(reply))


ERRORS: list[tuple[str, dict[str, Any], type[errors.DirtydiffError], str]] = [
    ("bitmap.info", {"name": "nope"}, errors.NotFound, "unknown-bitmap"),
    ("bitmap.remove", {"name": OPEN_CHECKPOINT}, errors.BadRequest, "reserved-name"),
    ("bitmap.add", {"name": "b"}, errors.Conflict, "name-in-use"),
    ("bitmap.add", {"name": "a/b"}, errors.BadRequest, "bad-name"),
    ("bitmap.add", {"name": "x", "granularity": 1000}, errors.BadRequest, "bad-granularity"),
    ("bitmap.merge", {"target": "b", "sources": ["fine"]}, errors.BadRequest, "geometry-mismatch"),
    ("checkpoint", {"name": "b"}, errors.Conflict, "name-in-use"),
    ("bitmap.mark", {"name": "nope", "ranges": [[0, 1]]}, errors.NotFound, "unknown-bitmap"),
    ("bitmap.mark", {"name": "b", "ranges": [[0, 1], [DISK, 1]]}, errors.BadRequest, "bad-range"),
    ("bitmap.mark", {"name": "b", "ranges": [[-1, 2]]}, errors.BadRequest, "bad-range"),
    ("bitmap.mark", {"name": "b", "ranges": [[0, 0]]}, errors.BadRequest, "bad-range"),
    ("snapshot.release", {"name": "nope"}, errors.NotFound, "no-such-snapshot"),
    ("checkpoint", {"name": "cp", "snapshot": {}}, errors.Unavailable, "snapshot-needs-tracker"),
    ("checkpoint", {"name": "cp", "snapshot": {"scope": "x"}}, errors.BadRequest, "bad-snapshot"),
    ("checkpoint", {"name": "cp", "snapshot": {"limit": -1}}, errors.BadRequest, "bad-snapshot"),
]


@pytest.mark.parametrize(("op", "args", "cls", "code"), ERRORS)
def test_store_errors_become_error_replies(
    store: BitmapStore, op: str, args: dict[str, Any], cls: type[errors.DirtydiffError], code: str
) -> None:
    store.add("b")
    store.add("fine", 4096)
    reply = control.dispatch(store, control.request(op, **args))
    assert store.bitmaps["b"].dirty_granules() == 0, "a refused request marked bits"
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    # The client side raises the same class with the same code.
    with pytest.raises(cls) as failed:
        control.result_of(reply)
    assert failed.value.code == code


def test_protocol_errors_become_error_replies() -> None:
    reply = control.reply_error(errors.ProtocolError("too-large", "too big"))
    assert reply == {
        "version": control.API_VERSION,
        "ok": False,
        "error": {"kind": "protocol", "code": "too-large", "message": "too big"},
    }
    with pytest.raises(errors.ProtocolError):
        control.result_of(reply)


def test_call_without_a_listener_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable):
        control.call(tmp_path / "tracker.sock", "ping")


# -- random requests --------------------------------------------------------------------

ARG_NAMES = [
    "name", "granularity", "enabled", "timeout", "target", "sources", "ranges", "created_ns",
    "max_rate", "chunk", "in_flight",
]  # fmt: skip
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["b", "cp", OPEN_CHECKPOINT, "nope"])
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
requests = st.fixed_dictionaries(
    {"version": st.just(1) | values, "op": st.sampled_from(sorted(control.HANDLERS)) | values},
    optional={
        "args": st.dictionaries(st.sampled_from(ARG_NAMES) | st.text(max_size=4), values) | values
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(requests)
def test_dispatch_of_random_requests_only_ever_replies(
    store: BitmapStore, message: dict[str, Any]
) -> None:
    # One store for all examples: whatever earlier requests did, a request
    # gets a reply, never an exception.
    reply = control.dispatch(store, message)
    assert reply["version"] == control.API_VERSION
    if reply["ok"]:
        assert message["op"] in control.HANDLERS
    else:
        assert set(reply["error"]) >= {"code", "message"}
    assert control.decode(control.encode(reply)[4:]) == reply


def test_a_reply_too_large_to_send_becomes_an_error_reply_and_long_messages_are_cut() -> None:
    huge = control.reply_ok(["x" * 1000] * 2000)  # 2 MB of result
    reply = control.decode(control.encode_reply(huge)[4:])
    assert not reply["ok"] and reply["error"]["code"] == "reply-too-large"
    quoted = control.reply_error(errors.BadRequest("unknown-op", "unknown op " + "\0" * 900_000))
    encoded = control.encode_reply(quoted)
    assert len(encoded) < 4 * control.MAX_ERROR_MESSAGE
    assert control.decode(encoded[4:])["error"]["message"].endswith("(900011 chars)")
