"""The NBD protocol (NetworkBlockDevice/nbd, doc/proto.md): constants, wire
structs, the parsers of what a client sends and the builders of every reply.

Names are the spec's minus the ``NBD_`` prefix. Every struct is big-endian
("network byte order") and preceded by the spec's field list. Nothing here
does I/O: parsers take bytes and return values or raise ``ProtocolError``
(the connection must end) / ``RequestError`` (one request fails, the
connection goes on); builders take the spec's fields and return bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import NamedTuple

# -- handshake ----------------------------------------------------------------

# S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC')
# S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
# S: 16 bits, handshake flags
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
SERVER_GREETING = struct.Struct("!QQH")

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# C: 32 bits, client flags
CLIENT_FLAGS = struct.Struct("!I")

# C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
# C: 32 bits, option
# C: 32 bits, length of option data (unsigned)
OPTION_HEADER = struct.Struct("!QII")

# S: 64 bits, 0x3e889045565a9 (magic number for replies)
# S: 32 bits, the option as sent by the client
# S: 32 bits, reply type
# S: 32 bits, length of the reply (may be zero)
OPTION_REPLY_MAGIC = 0x3E889045565A9
OPTION_REPLY = struct.Struct("!QIII")

# NBD_OPT_EXPORT_NAME reply: 64 bits size, 16 bits transmission flags, then
# 124 zero bytes unless the client set NO_ZEROES.
EXPORT_NAME_REPLY = struct.Struct("!QH")
EXPORT_NAME_PADDING = 124


class Opt(enum.IntEnum):
    """Option types a client sends during the handshake."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR | 1
    ERR_POLICY = REP_ERR | 2
    ERR_INVALID = REP_ERR | 3
    ERR_PLATFORM = REP_ERR | 4
    ERR_TLS_REQD = REP_ERR | 5
    ERR_UNKNOWN = REP_ERR | 6
    ERR_SHUTDOWN = REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = REP_ERR | 8
    ERR_TOO_BIG = REP_ERR | 9


class Info(enum.IntEnum):
    """NBD_INFO_* items of an NBD_REP_INFO reply to INFO/GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# NBD_INFO_EXPORT: 16 bits type, 64 bits size, 16 bits transmission flags
INFO_EXPORT = struct.Struct("!HQH")
# NBD_INFO_BLOCK_SIZE: 16 bits type, 32 bits minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct("!HIII")


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


# -- transmission -------------------------------------------------------------

# C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
# C: 16 bits, command flags
# C: 16 bits, type
# C: 64 bits, cookie
# C: 64 bits, offset (unsigned)
# C: 32 bits, length (unsigned)
REQUEST_MAGIC = 0x25609513
REQUEST = struct.Struct("!IHHQQI")

# S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
# S: 32 bits, error (MAY be zero)
# S: 64 bits, cookie
SIMPLE_REPLY_MAGIC = 0x67446698
SIMPLE_REPLY = struct.Struct("!IIQ")

# S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
# S: 16 bits, flags
# S: 16 bits, type
# S: 64 bits, cookie
# S: 32 bits, length of payload (unsigned)
STRUCTURED_REPLY_MAGIC = 0x668E33EF
STRUCTURED_REPLY = struct.Struct("!IHHQI")

# OFFSET_DATA payload: 64 bits offset, then data
OFFSET = struct.Struct("!Q")
# OFFSET_HOLE payload: 64 bits offset, 32 bits hole size
OFFSET_HOLE = struct.Struct("!QI")
# ERROR payload: 32 bits error, 16 bits message length, message
ERROR = struct.Struct("!IH")
# BLOCK_STATUS payload: 32 bits context id, then descriptors of
# 32 bits extent length, 32 bits status flags
BLOCK_STATUS_ID = struct.Struct("!I")
EXTENT = struct.Struct("!II")


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


REPLY_FLAG_DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(enum.IntEnum):
    """Error values on the wire (the spec's, which match Linux's)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# qemu:dirty-bitmap:NAME flags
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# Limits. Strings (names, messages) must be at most 4096 bytes per the spec.
MAX_STRING = 4096
# qemu-nbd's: reads and block status requests; also what we advertise as the
# maximum block size (virtnbdbackup reads in chunks of the advertised maximum).
MAX_REQUEST = 32 * 1024 * 1024
# Option payloads larger than this are refused without being read into memory.
MAX_OPTION = 64 * 1024
# Extents in one BLOCK_STATUS chunk (qemu's NBD_MAX_BLOCK_STATUS_EXTENTS).
MAX_EXTENTS = 128 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends."""


class RequestError(Exception):
    """One request fails with ``errno``; the connection goes on."""

    def __init__(self, errno: Errno, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class BadRequestMagic(ProtocolError):
    """A request header without NBD_REQUEST_MAGIC. Its cookie is kept: as
    qemu-nbd does, the server fails that request by it, then hangs up."""

    def __init__(self, magic: int, cookie: int) -> None:
        super().__init__(f"bad request magic {magic:#x}")
        self.cookie = cookie


def parse_request(header: bytes | bytearray | memoryview, offset: int = 0) -> Request:
    """The request header at ``offset`` of ``header`` (the server parses its
    receive buffer in place)."""
    magic, flags, kind, cookie, start, length = REQUEST.unpack_from(header, offset)
    if magic != REQUEST_MAGIC:
        raise BadRequestMagic(magic, cookie)
    return Request(flags, kind, cookie, start, length)


# -- replies ------------------------------------------------------------------
#
# Every header the server sends is made here, as qemu's server makes every
# structured chunk's header in one function (set_be_chunk): pure functions of
# the spec's fields, no I/O. The server only appends what follows a header
# (read data, block status descriptors). A reply to a request is one of:
#
#   simple reply:      [SIMPLE_REPLY error cookie]  (+ the data of a READ)
#   structured reply:  [chunk] [chunk] ... [chunk, DONE]
#
# with chunks of type OFFSET_DATA (+ data), OFFSET_HOLE, BLOCK_STATUS (+
# descriptors), ERROR, or NONE (a reply with nothing to say).

# Chunk headers packed with the fixed start of their payload, in one call:
# S: the structured reply header (STRUCTURED_REPLY)
# S: 64 bits, offset of the data (OFFSET_DATA; the data follows)
OFFSET_DATA_HEADER = struct.Struct("!IHHQIQ")
# S: the structured reply header
# S: 64 bits, offset of the hole; 32 bits, hole size (OFFSET_HOLE)
OFFSET_HOLE_CHUNK = struct.Struct("!IHHQIQI")
# S: the structured reply header
# S: 32 bits, metadata context id (BLOCK_STATUS; the descriptors follow)
BLOCK_STATUS_HEADER = struct.Struct("!IHHQII")


def simple_reply(cookie: int, errno: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, errno, cookie)


def structured_chunk(cookie: int, kind: int, payload: bytes, *, done: bool) -> bytes:
    """A chunk whose payload is all in memory (NONE, ERROR, ...)."""
    flags = REPLY_FLAG_DONE if done else 0
    return (
        STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload
    )


def none_chunk(cookie: int) -> bytes:
    """The whole reply to a request that succeeded with nothing to send."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)


def data_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """An OFFSET_DATA chunk up to its ``length`` bytes of data."""
    flags = REPLY_FLAG_DONE if done else 0
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie, OFFSET.size + length, offset
    )


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes of zeroes from ``offset``."""
    flags = REPLY_FLAG_DONE if done else 0
    return OFFSET_HOLE_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, OFFSET_HOLE.size,
        offset, length,
    )  # fmt: skip


def block_status_header(cookie: int, context_id: int, descriptors: int, *, done: bool) -> bytes:
    """A BLOCK_STATUS chunk up to its ``descriptors`` bytes of descriptors."""
    flags = REPLY_FLAG_DONE if done else 0
    return BLOCK_STATUS_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, flags, ReplyType.BLOCK_STATUS, cookie,
        BLOCK_STATUS_ID.size + descriptors, context_id,
    )  # fmt: skip


def error_chunk(cookie: int, errno: int, message: str) -> bytes:
    text = message.encode()[:512]  # clients drop chunks over 1000 bytes
    return structured_chunk(cookie, ReplyType.ERROR, ERROR.pack(errno, len(text)) + text, done=True)


# -- read replies ---------------------------------------------------------------


# One piece of a READ reply: (header, offset, length): the header (a hole's
# chunk whole), then ``length`` bytes of the disk from ``offset`` (0: none).
# A plain tuple: a NamedTuple costs a Python-level call per chunk.
ReadChunk = tuple[bytes, int, int]


def read_reply(
    cookie: int,
    offset: int,
    length: int,
    *,
    structured: bool,
    allocation: Iterable[tuple[int, int, int]] | None = None,
) -> list[ReadChunk]:
    """The reply to a READ of [offset, offset+length), in the disk's order.

    Without structured replies: the simple reply, then the data. With them,
    a read of nothing is one NONE chunk; given no ``allocation`` (the client
    set DF, or it is not worth asking), one OFFSET_DATA chunk. Given the
    disk's allocation extents, (offset, length, flags) as ``Connection.extents``
    reports them, one chunk per extent of the request (``clip_extents``), as
    qemu-nbd does: an OFFSET_HOLE where the extent reads as zeroes, else
    OFFSET_DATA::

        allocation:  |-- data --|------ zero ------|-- data --|
        request:           [offset ..................... end)
        reply:             [DATA][HOLE             ][DATA,DONE]
    """
    if not structured:
        return [(simple_reply(cookie), offset, length)]
    if not length:
        return [(none_chunk(cookie), offset, 0)]
    if allocation is None:
        return [(data_header(cookie, offset, length, done=True), offset, length)]
    pieces = clip_extents(allocation, offset, length)
    chunks: list[ReadChunk] = []
    last = len(pieces) - 1
    for i, (size, flags) in enumerate(pieces):
        if flags & STATE_ZERO:
            chunks.append((hole_chunk(cookie, offset, size, done=i == last), offset, 0))
        else:
            chunks.append((data_header(cookie, offset, size, done=i == last), offset, size))
        offset += size
    return chunks


def clip_extents(
    found: Iterable[tuple[int, int, int]], offset: int, count: int, *, one: bool = False
) -> list[tuple[int, int]]:
    """Allocation extents (offset, length, flags) -> (length, flags) covering
    exactly [offset, offset+count), neighbours with equal flags merged; a
    range the source did not describe counts as data (flags 0). With
    ``one`` (REQ_ONE), only the first::

        found:     |--A--|     |--B--|--B--|
        request:      [offset .............. end)
        answer:       [A ][ 0  ][ B        ][0]
    """
    end = offset + count
    merged: list[list[int]] = []

    def add(length: int, flags: int) -> None:
        if merged and merged[-1][1] == flags:
            merged[-1][0] += length
        else:
            merged.append([length, flags])

    pos = offset
    for start, length, flags in found:
        stop = min(start + length, end)
        if stop <= pos:
            continue
        if start >= end:
            break  # past the request: what is left of it is undescribed
        if start > pos:
            add(start - pos, 0)
        add(stop - max(start, pos), flags)
        pos = stop
        if pos >= end:
            break
    if pos < end:
        add(end - pos, 0)
    if one:
        merged = merged[:1]
    return [(length, flags) for length, flags in merged]


# -- option replies -------------------------------------------------------------


def server_greeting(flags: int) -> bytes:
    """What the server says first: NBDMAGIC, IHAVEOPT, its handshake flags."""
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The reply to NBD_OPT_EXPORT_NAME, padded unless the client set NO_ZEROES."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def server_reply(option: int, name: str, description: str) -> bytes:
    """NBD_REP_SERVER (to LIST).

    S: 32 bits, length of the export name
    S: String, the export name
    S: String, its description (the rest of the reply)
    """
    encoded = name.encode()
    return option_reply(
        option, Rep.SERVER, struct.pack("!I", len(encoded)) + encoded + description.encode()
    )


def info_export_reply(option: int, size: int, flags: int) -> bytes:
    """NBD_REP_INFO with NBD_INFO_EXPORT: the export's size and transmission flags."""
    return option_reply(option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, size, flags))


def info_text_reply(option: int, info: Info, text: str) -> bytes:
    """NBD_REP_INFO with NBD_INFO_NAME or NBD_INFO_DESCRIPTION: 16 bits type, the string."""
    return option_reply(option, Rep.INFO, struct.pack("!H", info) + text.encode())


def info_block_size_reply(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO with NBD_INFO_BLOCK_SIZE."""
    payload = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
    return option_reply(option, Rep.INFO, payload)


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT: 32 bits context id, then its name."""
    return option_reply(option, Rep.META_CONTEXT, struct.pack("!I", context_id) + name.encode())


# -- option payloads ------------------------------------------------------------


def parse_string_list(payload: bytes) -> tuple[str, list[str]]:
    """Parse the payload of LIST_META_CONTEXT / SET_META_CONTEXT.

    C: 32 bits, length of export name
    C: String, name of export
    C: 32 bits, number of queries
    C: 32 bits, length of query, then the query, for each
    """
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n > len(payload) - pos:
            raise RequestError(Errno.EINVAL, "option payload too short")
        chunk = payload[pos : pos + n]
        pos += n
        return chunk

    def string() -> str:
        (length,) = struct.unpack("!I", take(4))
        if length > MAX_STRING:
            raise RequestError(Errno.EINVAL, "string too long")
        try:
            return take(length).decode()
        except UnicodeDecodeError:
            raise RequestError(Errno.EINVAL, "string is not UTF-8") from None

    export = string()
    (count,) = struct.unpack("!I", take(4))
    queries = [string() for _ in range(count)]
    if pos != len(payload):
        raise RequestError(Errno.EINVAL, "trailing bytes in option payload")
    return export, queries


def parse_info_request(payload: bytes) -> tuple[str, list[int]]:
    """Parse the payload of INFO / GO.

    C: 32 bits, length of name (unsigned); MUST be no larger than the option data length - 6
    C: String: name of the export
    C: 16 bits, number of information requests
    C: 16 bits x n - list of NBD_INFO information requests
    """
    if len(payload) < 6:
        raise RequestError(Errno.EINVAL, "option payload too short")
    (name_length,) = struct.unpack_from("!I", payload)
    if name_length > len(payload) - 6:
        raise RequestError(Errno.EINVAL, "export name longer than the payload")
    try:
        name = payload[4 : 4 + name_length].decode()
    except UnicodeDecodeError:
        raise RequestError(Errno.EINVAL, "export name is not UTF-8") from None
    (count,) = struct.unpack_from("!H", payload, 4 + name_length)
    rest = payload[6 + name_length :]
    if len(rest) != 2 * count:
        raise RequestError(Errno.EINVAL, "information request list has the wrong length")
    return name, list(struct.unpack(f"!{count}H", rest))
