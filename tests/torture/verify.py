"""The check that matters, run once the writers are quiet.

As a backup tool would: for each claim (model.py) whose bitmaps dirtydiff
reports consistent, read their ``qemu:dirty-bitmap:NAME`` block status from
the sidecar's export with libnbd, read the dirty extents from the export, lay
them over the backup, and compare with the disk file byte for byte. Every
granule that differs is a **lost granule**: a change the bitmaps did not
report.

Besides: an inconsistent bitmap is never offered by the export (nor may a
client enable it); every consistent one is; every bitmap the scenario knows
may have lost bits (a host crash) is reported inconsistent; no bitmap that
should be whole is reported inconsistent without a cause.

Each bitmap is read over a fresh connection: a connection opened before a
checkpoint is not what a backup tool that starts now would see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nbd

from tests.torture.model import Claim, Model
from tests.torture.world import World

DIRTY = 1  # NBD_STATE_DIRTY in a qemu:dirty-bitmap context
READ_CHUNK = 4 << 20
STATUS_CHUNK = 1 << 30
SCAN_PREFIX = "@scan:"


@dataclass
class Verdict:
    bytes_verified: int = 0
    granules_lost: int = 0
    claims_verified: int = 0
    claims_unprovable: int = 0
    # Over the verified claims, in granules of each claim's finest bitmap:
    granules_total: int = 0
    granules_dirty: int = 0  # reported dirty
    granules_changed: int = 0  # differ between the backup and the disk
    problems: list[str] = field(default_factory=list)


def dirty_ranges(uri: str, name: str, size: int) -> list[tuple[int, int]]:
    """The dirty extents of ``qemu:dirty-bitmap:NAME``, as (offset, length)."""
    context = f"qemu:dirty-bitmap:{name}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        if not h.can_meta_context(context):
            raise AssertionError(f"the export refuses {context}")
        return read_dirty(h, context, 0, size)
    finally:
        h.shutdown()


def read_dirty(h: Any, context: str, offset: int, length: int) -> list[tuple[int, int]]:
    """The dirty extents of ``context`` in [offset, offset+length), read on the
    connection ``h`` (which chose ``context``); an error answer raises nbd.Error."""
    end = offset + length
    found: list[tuple[int, int]] = []
    while offset < end:
        entries: list[int] = []

        def collect(
            meta: str, start: int, e: list[int], err: Any, entries: list[int] = entries
        ) -> int:
            if meta == context:
                entries.extend(e)
            return 0

        h.block_status(min(end - offset, STATUS_CHUNK), offset, collect)
        position = offset
        for i in range(0, len(entries) - 1, 2):
            extent, flags = min(entries[i], end - position), entries[i + 1]
            if extent <= 0:
                break
            if flags & DIRTY:
                found.append((position, extent))
            position += extent
        if position <= offset:
            raise AssertionError(f"{context}: block status made no progress at {offset}")
        offset = position
    return found


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, previous = out[-1]
            out[-1] = (start, max(previous, offset + length - start))
        else:
            out.append((offset, length))
    return out


def restore(uri: str, backup: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """The backup with these extents read from the export laid over it."""
    image = bytearray(backup)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for offset, length in ranges:
            for start in range(offset, offset + length, READ_CHUNK):
                n = min(READ_CHUNK, offset + length - start)
                image[start : start + n] = h.pread(n, start)
    finally:
        h.shutdown()
    return bytes(image)


def lost_granules(restored: bytes, final: bytes, granularity: int) -> list[int]:
    if restored == final:
        return []
    return [
        g // granularity
        for g in range(0, len(final), granularity)
        if restored[g : g + granularity] != final[g : g + granularity]
    ]


def granules(offset: int, length: int, granularity: int) -> range:
    return range(offset // granularity, (offset + length - 1) // granularity + 1)


def verify_claim(
    world: World,
    model: Model,
    claim: Claim,
    status: dict[str, dict[str, Any]],
    final: bytes,
    verdict: Verdict,
) -> tuple[int, str | None]:
    names = model.bitmaps_of(claim)
    granularity = min(int(status[n]["granularity"]) for n in names)
    ranges = merged([r for n in names for r in dirty_ranges(world.export_uri, n, world.size)])
    backup = claim.backup.path.read_bytes()
    restored = restore(world.export_uri, backup, ranges)
    lost = lost_granules(restored, final, granularity)
    # How much the check could tell: a bitmap dirty all over proves nothing.
    verdict.granules_total += -(-len(final) // granularity)
    verdict.granules_dirty += len({g for o, n in ranges for g in granules(o, n, granularity)})
    verdict.granules_changed += len(lost_granules(backup, final, granularity))
    if not lost:
        return 0, None
    shown = ", ".join(f"{g * granularity:#x}" for g in lost[:8])
    return len(lost), (
        f"LOST {len(lost)} granule(s) of {granularity} bytes: backup{claim.backup.index} "
        f"({claim.why}) + dirty granules of {'|'.join(names)} differs from the disk at "
        f"offsets {shown}{' ...' if len(lost) > 8 else ''}"
    )


def check(world: World, model: Model) -> Verdict:
    verdict = Verdict()
    final = world.disk.read_bytes()
    status = world.status()
    exported = world.exported_bitmaps()
    consistent = {n for n, b in status.items() if b["consistent"]}
    problems = verdict.problems

    for name in sorted(exported - consistent):
        problems.append(f"export offers {name!r}, which is not reported consistent")
    for name in sorted(consistent - exported):
        if not name.startswith(SCAN_PREFIX):  # a scan's scratch bitmap is never offered
            problems.append(f"{name!r} is consistent but the export does not offer it")
    for name in sorted(set(status) - consistent):
        _refused_by_a_client(world, name, problems)
    for name in sorted(model.expected_inconsistent() & consistent):
        problems.append(f"{name!r} was recording at a host crash but is reported consistent")
    for name in sorted(model.known() - model.expected_inconsistent()):
        if name not in status:
            problems.append(f"bitmap {name!r} is gone")
        elif name not in consistent:
            problems.append(
                f"{name!r} is reported inconsistent ({status[name]['reason']}) with no cause"
            )
    for name in sorted(set(status) - model.known()):
        if not name.startswith(SCAN_PREFIX) and name in consistent:
            problems.append(f"unexpected consistent bitmap {name!r}: {status[name]}")

    for claim in model.claims:
        names = model.bitmaps_of(claim)
        if not all(n in consistent for n in names):
            verdict.claims_unprovable += 1
            continue
        lost, problem = verify_claim(world, model, claim, status, final, verdict)
        verdict.claims_verified += 1
        verdict.bytes_verified += len(final)
        verdict.granules_lost += lost
        if problem is not None:
            problems.append(problem)
    return verdict


def _refused_by_a_client(world: World, name: str, problems: list[str]) -> None:
    """A client that asks for an inconsistent bitmap's context must not get it."""
    context = f"qemu:dirty-bitmap:{name}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(world.export_uri)
    try:
        if h.can_meta_context(context):
            problems.append(f"a client could enable {context}, which is inconsistent")
    finally:
        h.shutdown()
