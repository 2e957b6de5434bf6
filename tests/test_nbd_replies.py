"""The reply builders of dirtydiff.nbdproto, on their own (no I/O, no server).

Each chunk shape has a case against the spec's field list, and the READ
splitter and the extent clipper have property tests: the chunks tile the
request exactly, holes only where the allocation says zero, DONE on the last
chunk alone.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import ReplyType

MAGIC = 0x668E33EF
UNIT = 512  # extents are drawn in sectors: small numbers, every shape reachable


def test_chunk_shapes() -> None:
    # OFFSET_DATA: header (magic, flags, type, cookie, length), offset; data follows.
    assert proto.data_header(7, 4096, 512, done=False) == struct.pack(
        "!IHHQIQ", MAGIC, 0, 1, 7, 8 + 512, 4096
    )
    # OFFSET_HOLE: header, offset, hole size.
    assert proto.hole_chunk(7, 4096, 1 << 20, done=True) == struct.pack(
        "!IHHQIQI", MAGIC, 1, 2, 7, 12, 4096, 1 << 20
    )
    # BLOCK_STATUS: header, context id; descriptors follow.
    assert proto.block_status_header(9, 2, 16, done=True) == struct.pack(
        "!IHHQII", MAGIC, 1, 5, 9, 4 + 16, 2
    )
    # NONE: a header with nothing after it, always the last chunk.
    assert proto.none_chunk(3) == struct.pack("!IHHQI", MAGIC, 1, 0, 3, 0)
    assert proto.none_chunk(3) == proto.structured_chunk(3, ReplyType.NONE, b"", done=True)


def test_option_reply_shapes() -> None:
    def reply(option: int, kind: int, payload: bytes) -> bytes:
        return struct.pack("!QIII", 0x3E889045565A9, option, kind, len(payload)) + payload

    assert proto.server_greeting(3) == struct.pack("!QQH", proto.NBDMAGIC, proto.IHAVEOPT, 3)
    assert proto.server_reply(3, "vda", "disk") == reply(3, 2, b"\0\0\0\3vdadisk")
    assert proto.info_export_reply(7, 1 << 30, 0x48F) == reply(
        7, 3, struct.pack("!HQH", 0, 1 << 30, 0x48F)
    )
    assert proto.info_text_reply(7, proto.Info.NAME, "vda") == reply(7, 3, b"\0\1vda")
    assert proto.info_block_size_reply(7, 1, 4096, 1 << 25) == reply(
        7, 3, struct.pack("!HIII", 3, 1, 4096, 1 << 25)
    )
    assert proto.meta_context_reply(10, 2, "base:allocation") == reply(
        10, 4, b"\0\0\0\2base:allocation"
    )
    assert proto.export_name_reply(512, 3, no_zeroes=True) == struct.pack("!QH", 512, 3)
    assert proto.export_name_reply(512, 3, no_zeroes=False) == struct.pack("!QH", 512, 3) + bytes(
        124
    )


def test_request_header_in_a_buffer() -> None:
    raw = bytearray(3) + proto.REQUEST.pack(proto.REQUEST_MAGIC, 1, 0, 5, 4096, 512)
    assert proto.parse_request(raw, 3) == proto.Request(1, 0, 5, 4096, 512)
    bad = proto.REQUEST.pack(0x12345678, 0, 0, 77, 0, 0)
    try:
        proto.parse_request(bad)
    except proto.BadRequestMagic as e:
        assert e.cookie == 77  # the server fails the garbled request by it
        assert isinstance(e, proto.ProtocolError)
    else:
        raise AssertionError("bad magic accepted")


def test_read_reply_shapes() -> None:
    # Without structured replies: the simple reply, then all the data.
    assert proto.read_reply(5, 4096, 512, structured=False) == [(proto.simple_reply(5), 4096, 512)]
    # A read of nothing: one NONE chunk.
    assert proto.read_reply(5, 4096, 0, structured=True, allocation=[]) == [
        (proto.none_chunk(5), 4096, 0)
    ]
    # DF (no allocation asked): one data chunk, however sparse the disk.
    assert proto.read_reply(5, 0, 8192, structured=True) == [
        (proto.data_header(5, 0, 8192, done=True), 0, 8192)
    ]
    # Sparse: data, hole, data, as the allocation says.
    allocation = [(0, 4096, 0), (4096, 4096, proto.STATE_HOLE | proto.STATE_ZERO), (8192, 4096, 0)]
    assert proto.read_reply(5, 2048, 8192, structured=True, allocation=allocation) == [
        (proto.data_header(5, 2048, 2048, done=False), 2048, 2048),
        (proto.hole_chunk(5, 4096, 4096, done=False), 4096, 0),
        (proto.data_header(5, 8192, 2048, done=True), 8192, 2048),
    ]


@st.composite
def allocations(draw: st.DrawFn) -> tuple[list[tuple[int, int, int]], int, int]:
    """Sorted, disjoint extents (some gaps: undescribed ranges) over a small
    disk, and a request on it."""
    extents = []
    pos = 0
    for _ in range(draw(st.integers(0, 12))):
        pos += draw(st.sampled_from([0, 0, 0, 1, 3])) * UNIT  # mostly no gap
        length = draw(st.integers(1, 16)) * UNIT
        extents.append((pos, length, draw(st.integers(0, 3))))
        pos += length
    disk = pos + draw(st.integers(0, 8)) * UNIT
    offset = draw(st.integers(0, disk))
    length = draw(st.integers(1, max(1, disk - offset + 4 * UNIT)))
    return extents, offset, length


def flags_at(extents: list[tuple[int, int, int]], pos: int) -> int:
    for start, length, flags in extents:
        if start <= pos < start + length:
            return flags
    return 0  # undescribed: data


def flags_over(extents: list[tuple[int, int, int]], pos: int, size: int) -> set[int]:
    """The flags of every byte of [pos, pos+size) (one probe per sector)."""
    probes = [*range(pos, pos + size, UNIT), pos + size - 1]
    return {flags_at(extents, p) for p in probes}


@settings(max_examples=500, deadline=None)
@given(allocations(), st.integers(0, 2**64 - 1))
def test_read_chunks_tile_the_request(
    case: tuple[list[tuple[int, int, int]], int, int], cookie: int
) -> None:
    extents, offset, length = case
    chunks = proto.read_reply(cookie, offset, length, structured=True, allocation=extents)
    pos = offset
    for i, (header, at, size) in enumerate(chunks):
        magic, flags, kind, got_cookie, payload = proto.STRUCTURED_REPLY.unpack_from(header)
        assert (magic, got_cookie) == (MAGIC, cookie)
        assert flags == (proto.REPLY_FLAG_DONE if i == len(chunks) - 1 else 0)
        if kind == ReplyType.OFFSET_HOLE:
            assert len(header) == proto.STRUCTURED_REPLY.size + payload == 32
            hole_at, hole = proto.OFFSET_HOLE.unpack_from(header, proto.STRUCTURED_REPLY.size)
            assert (hole_at, size) == (pos, 0)
            assert hole > 0
            # Zeroes only where the allocation says so, over the whole hole.
            assert all(f & proto.STATE_ZERO for f in flags_over(extents, pos, hole))
            pos += hole
        else:
            assert kind == ReplyType.OFFSET_DATA
            assert len(header) == proto.OFFSET_DATA_HEADER.size
            assert payload == 8 + size
            assert proto.OFFSET.unpack_from(header, proto.STRUCTURED_REPLY.size) == (pos,)
            assert at == pos and size > 0
            # Data where the allocation does not say zero: not one zero byte
            # is sent as data (a chunk is one extent's, of one state).
            assert len(flags_over(extents, pos, size)) == 1
            assert not flags_at(extents, pos) & proto.STATE_ZERO
            pos += size
    assert pos == offset + length  # exactly the request: no gap, no overlap, no overrun
    # One chunk per run of equal flags: as many as the flags change, plus one.
    changes = 1 + sum(
        flags_at(extents, p) != flags_at(extents, p - 1)
        for p in range(offset - offset % UNIT + UNIT, offset + length, UNIT)
    )
    assert len(chunks) == changes


@settings(max_examples=500, deadline=None)
@given(allocations(), st.booleans())
def test_clipped_extents_cover_the_request(
    case: tuple[list[tuple[int, int, int]], int, int], one: bool
) -> None:
    extents, offset, length = case
    clipped = proto.clip_extents(extents, offset, length, one=one)
    full = proto.clip_extents(extents, offset, length)
    assert sum(size for size, _ in full) == length
    assert all(size > 0 for size, _ in full)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(full))  # merged
    pos = offset
    for size, flags in full:
        assert flags_over(extents, pos, size) == {flags}
        pos += size
    if one:
        assert clipped == full[:1]
    else:
        assert clipped == full
