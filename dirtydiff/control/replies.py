"""The results of control requests, typed again once they crossed the wire.

A result travels as a msgpack map (what ``BitmapInfo.as_dict`` and the other
``as_dict`` make, which ``--json`` prints as it is); a client turns it back
into its dataclass here, checking every field, so that code past a control
call reads ``info.consistent`` and decides by ``info.why``, a Reason, never
by a message for people. A reply that does not have the shape of its op is a
ProtocolError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dirtydiff import errors
from dirtydiff.bitmapfile import Reason
from dirtydiff.state import REASONS_BY_CODE, BitmapInfo, reason_code
from dirtydiff.store import CheckpointResult

# A tracker started before replies carried ``reason_code`` goes on under its
# running VM across an upgrade: its ``reason`` text is the only thing that
# tells, and this is the one place that reads it. Such a tracker also tells
# no creation time of a bitmap: 0 stands for none.
_REASONS_BY_TEXT = {r.describe(): r for r in Reason}


def _malformed(what: str, result: object) -> errors.ProtocolError:
    shown = repr(result)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return errors.ProtocolError("malformed-reply", f"a {what} reply has not its shape: {shown}")


def _fields(
    cls: type, result: object, what: str, *, optional: dict[str, object] | None = None
) -> dict[str, Any]:
    """The fields of dataclass ``cls`` from the map ``result``, each of its
    declared type (bool is never taken for int, nor int for bool); one of
    ``optional`` that is missing takes the value given there."""
    if not isinstance(result, dict):
        raise _malformed(what, result)
    found: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in result:
            if optional is None or field.name not in optional:
                raise _malformed(what, result)
            found[field.name] = optional[field.name]
            continue
        value = result[field.name]
        kind = {"int": int, "bool": bool, "str": str, "float": float}.get(str(field.type))
        if kind is not None:
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise _malformed(what, result)
        found[field.name] = value
    return found


def bitmap_info(result: object) -> BitmapInfo:
    """A BitmapInfo from the result of bitmap.info (and every op that
    answers one)."""
    # A tracker from before bitmaps told their creation time tells none (0).
    fields = _fields(BitmapInfo, result, "bitmap", optional={"reason_code": None, "created_ns": 0})
    if fields["reason_code"] is None:
        why = Reason.NONE if fields["consistent"] else _REASONS_BY_TEXT.get(fields["reason"])
        if why is None:
            raise _malformed("bitmap", result)
        fields["reason_code"] = reason_code(why)
    if fields["reason_code"] not in REASONS_BY_CODE:
        raise _malformed("bitmap", result)
    return BitmapInfo(**fields)


def bitmap_infos(result: object) -> list[BitmapInfo]:
    """The BitmapInfos of bitmap.list."""
    if not isinstance(result, list):
        raise _malformed("bitmap list", result)
    return [bitmap_info(item) for item in result]


def checkpoint_result(result: object) -> CheckpointResult:
    return CheckpointResult(**_fields(CheckpointResult, result, "checkpoint"))


@dataclass(frozen=True)
class StoreStatus:
    """What ``status`` tells of the store that answered it."""

    disk_size: int
    recording: bool  # the tracker answered (a store that records), or the files
    inflight: int  # writes the tracker has forwarded and the disk not yet answered
    bitmaps: list[BitmapInfo]

    @classmethod
    def from_wire(cls, result: object) -> StoreStatus:
        fields = _fields(cls, result, "status")
        fields["bitmaps"] = bitmap_infos(fields["bitmaps"])
        return cls(**fields)

    def as_dict(self) -> dict[str, object]:
        return {
            "disk_size": self.disk_size,
            "recording": self.recording,
            "inflight": self.inflight,
            "bitmaps": [b.as_dict() for b in self.bitmaps],
        }


@dataclass(frozen=True)
class ScanBegun:
    """What ``scan.begin`` answers: whether the scan resumes where its
    record says, and the granularity and creation time of the bitmap it
    fills (which tell that bitmap from one added later under its name)."""

    resume: bool
    granularity: int
    created_ns: int

    @classmethod
    def from_wire(cls, result: object) -> ScanBegun:
        return cls(**_fields(cls, result, "scan.begin", optional={"created_ns": 0}))

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
