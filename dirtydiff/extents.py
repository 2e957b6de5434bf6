"""Extent logic: runs of equal bits, and byte extents as NBD clients see them.

Answers cover exactly the range asked for (clipped to the disk's end), never
more, and neighbouring extents never share a state: what ``qemu-nbd -B`` and
``nbdinfo --map`` show for the same bitmap.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from dirtydiff.bitmapfile import BitmapFile

Bits = bytes | bytearray | memoryview


class Extent(NamedTuple):
    offset: int
    length: int
    dirty: bool


_NOT_CLEAN = re.compile(rb"[^\x00]")
_NOT_DIRTY = re.compile(rb"[^\xff]")


def _bit(bits: Bits, i: int) -> int:
    return (bits[i >> 3] >> (i & 7)) & 1


def _run_end(bits: Bits, i: int, stop: int, dirty: int) -> int:
    """First bit index in ``[i, stop)`` whose state is not ``dirty``, else stop."""
    while i < stop and i & 7:
        if _bit(bits, i) != dirty:
            return i
        i += 1
    # Whole bytes: let the regex engine scan in C for the first differing byte.
    full_stop = stop >> 3
    if (i >> 3) < full_stop:
        pattern = _NOT_DIRTY if dirty else _NOT_CLEAN
        found = pattern.search(bits, i >> 3, full_stop)
        i = (found.start() if found else full_stop) << 3
    while i < stop:
        if _bit(bits, i) != dirty:
            return i
        i += 1
    return stop


def runs(bits: Bits, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first, count, dirty)`` of equal bits covering ``[start, stop)``."""
    i = start
    while i < stop:
        dirty = _bit(bits, i)
        end = _run_end(bits, i, stop, dirty)
        yield i, end - i, bool(dirty)
        i = end


def extent_arrays(
    bits: Bits,
    granularity: int,
    disk_size: int,
    offset: int,
    length: int,
    max_extents: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Extents of ``[offset, offset+length)`` as arrays (byte lengths, dirty 0/1).

    The same answer as ``extents`` computed in numpy: the export answers
    block status over up to 4 GiB with thousands of extents, and Python
    per-bit or per-extent work there would cost more than the request.

    It works on the bitmap's bytes, not one element per granule, so its
    temporaries are the size of the bitmap window rather than 8 times it: a
    4 GiB range at 64 KiB granules (an 8 KiB window) took ~30 us instead of
    ~120, and 64 GiB ~0.17 ms instead of 1.5 (the export answers several
    requests of a client's walk over the disk at once).
    """
    end = min(disk_size, offset + length)
    if offset >= end:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    first = offset // granularity
    stop = (end + granularity - 1) // granularity
    byte0, byte1 = first >> 3, (stop + 7) >> 3
    window = np.frombuffer(bits, dtype=np.uint8, count=byte1 - byte0, offset=byte0)
    lo, hi = first & 7, stop - byte0 * 8  # the granules asked for, as window bits [lo, hi)
    # Bit k of flips[j] is set when window bit 8j+k differs from the bit
    # before it, i.e. an extent starts there. (x + x is x << 1 in uint8; the
    # add is the vectorised one.)
    flips = window + window
    flips ^= window
    flips[1:] ^= window[:-1] >> 7
    flips[0] &= (0xFF << (lo + 1)) & 0xFF  # no extent starts at or before lo
    if hi & 7:
        flips[-1] &= (1 << (hi & 7)) - 1  # nor at or after hi
    where = (flips != 0).nonzero()[0]
    found = np.unpackbits(flips[where], bitorder="little").view(bool).nonzero()[0]
    # Extent boundaries in window bits, then in bytes clipped to the request.
    bounds = np.empty(len(found) + 2, np.int64)
    bounds[0] = lo
    bounds[1:-1] = where[found >> 3]
    bounds[1:-1] *= 8
    bounds[1:-1] += found & 7
    bounds[-1] = hi
    if max_extents is not None:
        bounds = bounds[: max_extents + 1]
    bounds += byte0 * 8
    bounds *= granularity
    bounds[0] = offset
    bounds[-1] = min(bounds[-1], end)
    # Each boundary flips the state, so the states alternate from the first.
    state = np.arange(len(bounds) - 1, dtype=np.uint8)
    state &= 1
    state ^= (int(window[0]) >> lo) & 1
    return bounds[1:] - bounds[:-1], state


def extents(
    bits: Bits,
    granularity: int,
    disk_size: int,
    offset: int = 0,
    length: int | None = None,
    *,
    max_extents: int | None = None,
) -> list[Extent]:
    """Byte extents covering ``[offset, offset+length)`` clipped to the disk.

    The first and last extent are clipped even in the middle of a granule, as
    qemu-nbd does. With ``max_extents`` the answer may stop short, but always
    covers at least one byte when the range is not empty.
    """
    end = disk_size if length is None else min(disk_size, offset + length)
    if offset >= end:
        return []
    result: list[Extent] = []
    first = offset // granularity
    stop = (end + granularity - 1) // granularity
    for g, count, dirty in runs(bits, first, stop):
        start_byte = max(offset, g * granularity)
        end_byte = min(end, (g + count) * granularity)
        result.append(Extent(start_byte, end_byte - start_byte, dirty))
        if max_extents is not None and len(result) >= max_extents:
            break
    return result


def bitmap_extents(bitmap: BitmapFile, offset: int = 0, length: int | None = None) -> list[Extent]:
    return extents(bitmap.bits, bitmap.granularity, bitmap.header.disk_size, offset, length)  # type: ignore[arg-type]


def granules_of(offset: int, length: int, granularity: int) -> range:
    """Indexes of the granules that ``[offset, offset+length)`` touches."""
    if length <= 0:
        return range(0)
    return range(offset // granularity, (offset + length - 1) // granularity + 1)


def nbdinfo_json(found: list[Extent]) -> str:
    """Format extents exactly as ``nbdinfo --json --map=qemu:dirty-bitmap:X`` does."""
    lines = [
        f'{{ "offset": {e.offset}, "length": {e.length}, "type": {int(e.dirty)}, '
        f'"description": "{"dirty" if e.dirty else "clean"}"}}'
        for e in found
    ]
    return "[\n" + ",\n".join(lines) + ("\n" if lines else "") + "]\n"


def nbdinfo_text(found: list[Extent]) -> str:
    """Format extents as ``nbdinfo --map=qemu:dirty-bitmap:X`` does."""
    return "".join(
        f"{e.offset:>10}  {e.length:>10}  {int(e.dirty):>3}  {'dirty' if e.dirty else 'clean'}\n"
        for e in found
    )
