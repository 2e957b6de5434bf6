"""Target: dirtydiff.control's framing and request parsing, walked over a
stream of frames as a control server reads it.

``frame_length`` may refuse only a length over the limit, ``decode`` may
fail only as ProtocolError and return only a map, ``parse_request`` may fail
only as BadRequest and return only a known op with a map of arguments; and
every error becomes a reply that encodes.
"""

from __future__ import annotations

import struct

from dirtydiff import control, errors


def one_input(data: bytes) -> None:
    pos = 0
    while len(data) - pos >= 4:
        prefix = data[pos : pos + 4]
        pos += 4
        try:
            length = control.frame_length(prefix)
        except errors.ProtocolError as e:
            assert struct.unpack("!I", prefix)[0] > control.MAX_MESSAGE
            control.encode(control.reply_error(e))
            return
        assert length == struct.unpack("!I", prefix)[0] <= control.MAX_MESSAGE
        if length > len(data) - pos:
            return  # cut short: the connection ends
        payload = data[pos : pos + length]
        pos += length
        try:
            message = control.decode(payload)
        except errors.ProtocolError as e:
            control.encode(control.reply_error(e))
            return
        assert isinstance(message, dict)
        try:
            op, args = control.parse_request(message)
        except errors.BadRequest as e:
            assert isinstance(e.message, str)
            control.encode(control.reply_error(e))
            continue
        assert op in control.HANDLERS
        assert isinstance(args, dict)
        assert type(message["version"]) is int and message["version"] == control.API_VERSION


if __name__ == "__main__":
    from tests.fuzz.atheris_main import fuzz

    fuzz(one_input)
