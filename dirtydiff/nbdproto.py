"""The NBD protocol (NetworkBlockDevice/nbd, doc/proto.md): constants and wire structs.

Names are the spec's minus the ``NBD_`` prefix. Every struct is big-endian
("network byte order") and preceded by the spec's field list. Parsers here do
no I/O: they take bytes and return values or raise ``ProtocolError`` (the
connection must end) / ``RequestError`` (one request fails, the connection
goes on).
"""

from __future__ import annotations

import enum
import struct
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


def parse_request(header: bytes) -> Request:
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def structured_chunk(cookie: int, kind: int, payload: bytes, *, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return (
        STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload
    )


def error_chunk(cookie: int, errno: int, message: str) -> bytes:
    text = message.encode()[:512]  # clients drop chunks over 1000 bytes
    return structured_chunk(cookie, ReplyType.ERROR, ERROR.pack(errno, len(text)) + text, done=True)


def simple_reply(cookie: int, errno: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, errno, cookie)


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
