"""The control protocol of the tracker's and the sidecar's sockets.

- ``wire``: framing, encoding, and the shape of requests and replies;
- ``handlers``: what each request asks of a BitmapStore, its arguments checked;
- ``client``: one request over a socket.

Who a request goes to (the tracker, the sidecar, or the files under the
lock) is decided by ``dirtydiff.owner``.
"""

from dirtydiff.control.client import CALL_TIMEOUT, call, call_within, listening
from dirtydiff.control.handlers import (
    HANDLERS,
    INT64_MAX,
    MAX_TIMEOUT,
    NUMBERS,
    Extra,
    arg,
    check_numbers,
    disk_seen,
    dispatch,
    parse_request,
)
from dirtydiff.control.wire import (
    API_VERSION,
    MAX_ERROR_MESSAGE,
    MAX_MESSAGE,
    Message,
    decode,
    encode,
    encode_reply,
    frame_length,
    read_message,
    reply_error,
    reply_ok,
    request,
    result_of,
)

__all__ = [
    "API_VERSION",
    "CALL_TIMEOUT",
    "HANDLERS",
    "INT64_MAX",
    "MAX_ERROR_MESSAGE",
    "MAX_MESSAGE",
    "MAX_TIMEOUT",
    "NUMBERS",
    "Extra",
    "Message",
    "arg",
    "call",
    "call_within",
    "check_numbers",
    "decode",
    "disk_seen",
    "dispatch",
    "encode",
    "encode_reply",
    "frame_length",
    "listening",
    "parse_request",
    "read_message",
    "reply_error",
    "reply_ok",
    "request",
    "result_of",
]
