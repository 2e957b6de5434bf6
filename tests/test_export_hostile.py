"""Hostile clients: each session is replayed against qemu-nbd and against
dirtydiff's export, and both must answer alike (reply types, errnos, when the
connection ends). Meanwhile other clients keep being served.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Cmd, CmdFlag, Opt, Rep
from tests.conftest import Processes, Server, qemu_bitmap_pair
from tests.rawnbd import Outcome, RawClient, info_payload, meta_payload

MiB = 1 << 20
SIZE = 16 * MiB


@dataclass
class Servers:
    ours: Server
    qemu: Server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("hostile")
    procs = Processes(tmp)
    try:
        raw, state, qemu = qemu_bitmap_pair(
            procs, tmp, SIZE, ["write -P 1 1M 64k", "write -P 2 5M 1"]
        )
        sock = tmp / "ours.sock"
        ours = procs.start(
            [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
             "--disk", str(raw), "--socket", str(sock), "--bitmap", "b0"], sock,
        )  # fmt: skip
        yield Servers(ours, qemu)
    finally:
        procs.stop_all()


Session = Callable[[RawClient], list[Outcome]]


def both(servers: Servers, session: Session) -> list[Outcome]:
    """Run a session on both servers, assert equal outcomes, return them."""
    results = []
    for server in (servers.qemu, servers.ours):
        with RawClient(server.sock) as client:
            results.append(session(client))
    theirs, ours = results
    assert ours == theirs
    # The server is still serving everybody else.
    with RawClient(servers.ours.sock) as other:
        other.greet()
        assert other.option(Opt.LIST)[-1][0] == Rep.ACK
    return ours


def kinds(replies: list[Outcome]) -> list[object]:
    return [r[0] for r in replies]


# -- handshake -----------------------------------------------------------------


def test_unknown_client_flags_end_the_connection(servers: Servers) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet(client_flags=0x80 | proto.FLAG_C_FIXED_NEWSTYLE)
        return [("closed",)] if c.closed() else [("open",)]

    assert both(servers, session) == [("closed",)]


def test_bad_option_magic_ends_the_connection(servers: Servers) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        c.send_option(Opt.LIST, magic=0x1234)
        return c.option_replies()

    assert both(servers, session) == [("closed",)]


@pytest.mark.parametrize("option", [Opt.EXTENDED_HEADERS, Opt.PEEK_EXPORT, 99, 0x7FFFFFFF])
def test_unknown_options_are_unsupported_and_the_handshake_goes_on(
    servers: Servers, option: int
) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        first = kinds(c.option(option, b"some payload"))
        return [tuple(first), tuple(kinds(c.option(Opt.LIST)))]

    outcome = both(servers, session)
    assert outcome[0] == (Rep.ERR_UNSUP,)


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("list with payload", [(Opt.LIST, b"x")]),
        ("structured twice", [(Opt.STRUCTURED_REPLY, b""), (Opt.STRUCTURED_REPLY, b"")]),
        ("structured with payload", [(Opt.STRUCTURED_REPLY, b"xx")]),
        ("set before structured", [(Opt.SET_META_CONTEXT, meta_payload("", ("base:allocation",)))]),
        ("starttls", [(Opt.STARTTLS, b"")]),
        ("info unknown export", [(Opt.INFO, info_payload("nope"))]),
        ("go unknown export", [(Opt.GO, info_payload("nope"))]),
        ("info truncated", [(Opt.INFO, b"\0\0\0\x09ab")]),
        ("info name overruns", [(Opt.INFO, b"\0\0\0\x40\0\0")]),
        ("info ok", [(Opt.INFO, info_payload("", (proto.Info.NAME, proto.Info.BLOCK_SIZE)))]),
        ("list meta unknown export", [(Opt.LIST_META_CONTEXT, meta_payload("nope", ()))]),
        ("list meta truncated", [(Opt.LIST_META_CONTEXT, b"\0\0")]),
        ("abort", [(Opt.ABORT, b"")]),
    ],
)
def test_handshake_errors_match_qemu(
    servers: Servers, name: str, steps: list[tuple[int, bytes]]
) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        found: list[Outcome] = []
        for option, payload in steps:
            found.append(tuple(kinds(c.option(option, payload))))
        return found

    both(servers, session)


@pytest.mark.parametrize(
    "queries",
    [
        (),
        ("base:",),
        ("qemu:",),
        ("qemu:dirty-bitmap:",),
        ("qemu:dirty-bitmap:b0",),
        ("nope:",),
        ("base:allocation", "qemu:dirty-bitmap:zz"),
    ],
)
@pytest.mark.parametrize("structured", [False, True])
def test_list_meta_context_matches_qemu(
    servers: Servers, queries: tuple[str, ...], structured: bool
) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        if structured:
            c.option(Opt.STRUCTURED_REPLY)
        return c.option(Opt.LIST_META_CONTEXT, meta_payload("", queries))

    both(servers, session)


@pytest.mark.parametrize(
    "queries",
    [("base:allocation", "qemu:dirty-bitmap:b0"), ("qemu:",), ("qemu:dirty-bitmap:nope",)],
)
def test_set_meta_context_matches_qemu(servers: Servers, queries: tuple[str, ...]) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        c.option(Opt.STRUCTURED_REPLY)
        return c.option(Opt.SET_META_CONTEXT, meta_payload("", queries))

    both(servers, session)


@pytest.mark.parametrize("cut", [3, 10, 17, 20])
def test_truncated_handshake(servers: Servers, cut: int) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        message = proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, 10) + b"\0" * 10
        c.send(message[:cut])
        c.sock.shutdown(2)
        return [("sent",)]

    both(servers, session)


# -- transmission --------------------------------------------------------------


def transmission(c: RawClient) -> None:
    c.greet()
    c.go(contexts=("base:allocation", "qemu:dirty-bitmap:b0"))


@pytest.mark.parametrize(
    ("kind", "offset", "length", "flags"),
    [
        (Cmd.READ, SIZE - 10, 20, 0),
        (Cmd.READ, SIZE, 0, 0),
        (Cmd.READ, 0, 0, 0),
        (Cmd.READ, 0, 33 * MiB, 0),
        (Cmd.READ, 2**64 - 1, 1, 0),
        (Cmd.READ, 0, 4096, 0x8000),
        (Cmd.READ, 0, 4096, CmdFlag.DF),
        (Cmd.READ, 0, 4096, CmdFlag.FUA),
        (Cmd.BLOCK_STATUS, 0, 0, 0),
        (Cmd.BLOCK_STATUS, 0, 2**32 - 1, 0),
        (Cmd.BLOCK_STATUS, SIZE - 1, 2, 0),
        (Cmd.BLOCK_STATUS, 0, SIZE, CmdFlag.REQ_ONE),
        (Cmd.BLOCK_STATUS, 0, SIZE, CmdFlag.DF),
        (Cmd.TRIM, 0, 4096, 0),
        (Cmd.WRITE_ZEROES, 0, 4096, 0),
        (Cmd.FLUSH, 0, 0, 0),
        (Cmd.CACHE, 0, 4096, 0),
        (Cmd.CACHE, SIZE, 1, 0),
        (42, 0, 0, 0),
    ],
)
def test_requests_match_qemu(
    servers: Servers, kind: int, offset: int, length: int, flags: int
) -> None:
    def session(c: RawClient) -> list[Outcome]:
        transmission(c)
        c.request(kind, offset, length, flags, cookie=7)
        found = c.structured_reply()
        c.request(Cmd.READ, 0, 512, cookie=8)  # the connection goes on
        return found + c.structured_reply()

    both(servers, session)


@pytest.mark.parametrize("length", [1, 4096, 32 * MiB])
def test_write_to_read_only_export(servers: Servers, length: int) -> None:
    def session(c: RawClient) -> list[Outcome]:
        transmission(c)
        c.request(Cmd.WRITE, 0, length, cookie=9)
        c.send(b"\xab" * length)
        found = c.structured_reply()
        c.request(Cmd.READ, 0, 512, cookie=10)
        return found + c.structured_reply()

    # qemu-nbd 7.2 says EINVAL (not EPERM) for a write to a read-only export.
    assert both(servers, session)[0] == (proto.ReplyType.ERROR, proto.Errno.EINVAL)


def test_simple_replies_without_structured(servers: Servers) -> None:
    def session(c: RawClient) -> list[Outcome]:
        c.greet()
        assert c.option(Opt.GO, info_payload(""))[-1][0] == Rep.ACK
        found = []
        for kind, offset, length in (
            (Cmd.READ, SIZE, 1),
            (Cmd.BLOCK_STATUS, 0, 512),
            (Cmd.FLUSH, 0, 0),
        ):
            c.request(kind, offset, length)
            found.append(c.simple_reply())
        c.request(Cmd.READ, 0, 512)
        found.append(c.simple_reply())
        found.append((len(c.recv(512) or b""),))
        return found

    both(servers, session)


def test_bad_request_magic_ends_the_connection(servers: Servers) -> None:
    def session(c: RawClient) -> list[Outcome]:
        transmission(c)
        c.send(struct.pack("!IHHQQI", 0xDEADBEEF, 0, Cmd.READ, 1, 0, 512))
        return [*c.structured_reply(), ("closed",) if c.closed() else ("open",)]

    assert both(servers, session) == [(proto.ReplyType.ERROR, proto.Errno.EINVAL), ("closed",)]


def test_client_vanishing_mid_request(servers: Servers) -> None:
    def session(c: RawClient) -> list[Outcome]:
        transmission(c)
        c.send(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 512)[:13])
        c.close()
        return [("gone",)]

    both(servers, session)
    # And one that vanishes with many reads in flight.
    with RawClient(servers.ours.sock) as c:
        transmission(c)
        for cookie in range(64):
            c.request(Cmd.READ, 0, 4 * MiB, cookie=cookie)


def test_many_requests_in_flight_are_all_answered(servers: Servers) -> None:
    with RawClient(servers.ours.sock) as c:
        transmission(c)
        cookies = set(range(100, 300))
        for cookie in cookies:
            kind = Cmd.READ if cookie % 2 else Cmd.BLOCK_STATUS
            c.request(kind, (cookie * 4096) % SIZE, 4096, cookie=cookie)
        seen: set[int] = set()
        while len(seen) < len(cookies):
            head = c.recv(proto.STRUCTURED_REPLY.size)
            assert head is not None
            _, flags, kind, cookie, length = proto.STRUCTURED_REPLY.unpack(head)
            assert c.recv(length) is not None
            assert kind != proto.ReplyType.ERROR
            if flags & proto.REPLY_FLAG_DONE:
                seen.add(cookie)
        assert seen == cookies


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200))
def test_random_bytes_after_the_greeting_never_break_the_server(
    servers: Servers, junk: bytes
) -> None:
    with RawClient(servers.ours.sock) as c:
        c.greet()
        c.send(junk)
    with RawClient(servers.ours.sock) as other:
        other.greet()
        assert other.option(Opt.LIST)[-1][0] == Rep.ACK


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 12),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 0xFFFF),
        ),
        max_size=8,
    )
)
def test_random_requests_get_answers_or_a_clean_close(
    servers: Servers, requests: list[tuple[int, int, int, int]]
) -> None:
    with RawClient(servers.ours.sock) as c:
        transmission(c)
        for kind, offset, length, flags in requests:
            if kind in (Cmd.WRITE, Cmd.DISC):
                continue  # a payload or a goodbye: covered above
            c.request(kind, offset, min(length, 64 * MiB) if kind == Cmd.READ else length, flags)
            reply = c.structured_reply()
            assert reply[-1] != ("closed",), (kind, offset, length, flags)
    with RawClient(servers.ours.sock) as other:
        other.greet()
        assert other.option(Opt.LIST)[-1][0] == Rep.ACK


# -- every flag on every command -------------------------------------------------

# Each command with an offset and length in range, so that only its flags
# decide the answer; a write's payload follows its header.
FLAG_MATRIX_COMMANDS = [
    (Cmd.READ, 0, 4096),
    (Cmd.WRITE, 0, 512),
    (Cmd.FLUSH, 0, 0),
    (Cmd.TRIM, 0, 4096),
    (Cmd.CACHE, 0, 4096),
    (Cmd.WRITE_ZEROES, 0, 4096),
    (Cmd.BLOCK_STATUS, 0, 4096),
    (Cmd.RESIZE, 0, 0),
    (42, 0, 0),
]
# No flag, every one of the 16 bits alone, and FUA with each flag a command
# may take (the spec: a server that advertises SEND_FUA accepts it on all).
FLAG_MATRIX_FLAGS = [0, *(1 << bit for bit in range(16))] + [
    int(CmdFlag.FUA | other)
    for other in (CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
]


def reply_of(c: RawClient, kind: int, length: int, structured: bool) -> list[Outcome]:
    """The whole reply, payload included (a simple READ reply's data too)."""
    if structured:
        return c.structured_reply()
    found = c.simple_reply()
    if found == ("simple", 0) and kind == Cmd.READ:
        return [found, ("data", len(c.recv(length) or b""))]
    return [found]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize(
    ("kind", "offset", "length"),
    FLAG_MATRIX_COMMANDS,
    ids=[getattr(k, "name", str(k)).lower() for k, _, _ in FLAG_MATRIX_COMMANDS],
)
def test_every_flag_on_every_command_matches_qemu(
    servers: Servers, structured: bool, kind: int, offset: int, length: int
) -> None:
    """The flag matrix, as libnbd with strict mode off would send it: each
    command with no flag, with each of the 16 bits, and with FUA added to
    each flag it takes, on one connection; then a read shows it goes on.
    Replies and errnos must be qemu-nbd's (FUA is accepted everywhere)."""

    def session(c: RawClient) -> list[Outcome]:
        if structured:
            transmission(c)
        else:
            c.greet()
            assert c.option(Opt.GO, info_payload(""))[-1][0] == Rep.ACK
        found: list[Outcome] = []
        for cookie, flags in enumerate(FLAG_MATRIX_FLAGS):
            c.request(kind, offset, length, flags, cookie=cookie)
            if kind == Cmd.WRITE:
                c.send(b"\xab" * length)
            replies = reply_of(c, kind, length, structured)
            found.append((flags, *replies))
            if replies[-1] == ("closed",):
                return found
        c.request(Cmd.READ, 0, 512, cookie=99)
        return [*found, tuple(reply_of(c, Cmd.READ, 512, structured))]

    outcome = both(servers, session)
    fua = dict(zip(FLAG_MATRIX_FLAGS, outcome, strict=False))[int(CmdFlag.FUA)]
    assert fua[1:] == dict(zip(FLAG_MATRIX_FLAGS, outcome, strict=False))[0][1:]


@pytest.mark.parametrize("flags", [0, *(1 << bit for bit in range(16))])
def test_disconnect_with_any_flag_matches_qemu(servers: Servers, flags: int) -> None:
    def session(c: RawClient) -> list[Outcome]:
        transmission(c)
        c.request(Cmd.DISC, flags=flags)
        return [("closed",) if c.closed() else ("open",)]

    assert both(servers, session) == [("closed",)]
