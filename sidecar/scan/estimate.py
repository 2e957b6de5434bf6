"""The estimate a scan may begin with: what fraction of the disk changed.

A uniform random sample of granules (without replacement; ``seed`` makes it
repeatable) is read on both sides, or on the disk and looked up in the
manifest. The changed fraction gets a 95% Wilson score interval, which keeps
its coverage near 95% even at fractions near 0 or 1 where the normal
approximation does not; the sample is a small part of the disk, so the
finite-population correction is left out (the interval is then a little
wide, never narrow).

The full scan's time is told from the sample: the share of granules holding
data on some side (a scan reads only those) at the rate the sample was read.
The sample reads one granule at a time, in offset order, which is slower per
byte than the scan's large reads: the time told is an upper bound more than
a forecast.

``--max-changed PCT`` refuses the scan when the interval's *lower* bound is
above PCT: the disk has then surely changed more than that, and a full
backup would read less than a scan (which reads the disk, and the backup
too unless a manifest stands in for it). Nothing is marked or created.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dirtydiff import errors
from sidecar.scan.engine import FileSide, NbdSide

if TYPE_CHECKING:  # imported by a manifest scan only: numpy and blake3 cost start-up
    from sidecar.scan.manifest import ManifestSide

SAMPLE = 1024  # granules: +-3 points at 30% changed
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(changed: int, sampled: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``changed`` out of ``sampled``."""
    if sampled <= 0:
        return 0.0, 1.0
    p = changed / sampled
    z2 = z * z
    centre = (p + z2 / (2 * sampled)) / (1 + z2 / sampled)
    half = z * math.sqrt(p * (1 - p) / sampled + z2 / (4 * sampled * sampled)) / (1 + z2 / sampled)
    # Exactly 0 or 1 at the ends: no rounding may put the truth outside.
    low = 0.0 if changed == 0 else max(0.0, centre - half)
    high = 1.0 if changed == sampled else min(1.0, centre + half)
    return low, high


def sample_granules(granules: int, count: int, seed: int | None = None) -> list[int]:
    """``count`` distinct granules drawn uniformly (all of them if fewer), in order."""
    return sorted(random.Random(seed).sample(range(granules), min(count, granules)))


@dataclass(frozen=True)
class Estimate:
    sampled: int
    changed: int
    low: float  # of the changed fraction, 95%
    high: float
    data_fraction: float  # sampled granules holding data on some side
    seconds: float  # the sample's own time
    full_scan_seconds: float

    @property
    def fraction(self) -> float:
        return self.changed / self.sampled if self.sampled else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}

    def describe(self) -> str:
        return describe_estimate(self.as_dict())

    def refuse_above(self, max_changed: float | None) -> None:
        """Conflict if the disk surely changed more than ``max_changed`` percent."""
        if max_changed is not None and 100 * self.low > max_changed:
            raise errors.Conflict(
                "too-changed",
                f"{self.describe()}: at least {100 * self.low:.1f}% changed, over "
                f"--max-changed {max_changed:g}%; a full backup would read less than a "
                "scan (nothing was marked)",
            )


def describe_estimate(told: dict[str, Any]) -> str:
    """An estimate in one line, from its ``as_dict`` (a sidecar job's, too)."""
    return (
        f"estimated changed: {100 * told['fraction']:.1f}% "
        f"(95% interval {100 * told['low']:.1f}% to {100 * told['high']:.1f}%, "
        f"{told['changed']} of {told['sampled']} granules sampled); "
        f"a full scan would take about {told['full_scan_seconds']:.0f} s"
    )


def _read(side: NbdSide | FileSide, offset: int, length: int) -> bytes:
    if isinstance(side, FileSide):
        return bytes(side.read(offset, bytearray(length)))
    data: bytes = side._call(side.h.pread, length, offset)
    return data


def sample_changed(
    disk: NbdSide | FileSide,
    backup: NbdSide | FileSide | ManifestSide,
    granularity: int,
    *,
    count: int = SAMPLE,
    seed: int | None = None,
    cancel: threading.Event | None = None,
) -> Estimate:
    """Read a sample of granules and estimate the changed fraction (see the
    module's docstring). Called before the scan's reads begin."""
    size = disk.size
    granules = -(-size // granularity)
    chosen = sample_granules(granules, count, seed)
    started = time.monotonic()
    changed = data = read = 0
    for g in chosen:
        if cancel is not None and cancel.is_set():
            raise errors.DirtydiffError("cancelled", "the estimate was cancelled")
        offset = g * granularity
        length = min(granularity, size - offset)
        ours = _read(disk, offset, length)
        read += length
        zero = ours.count(0) == length
        if not isinstance(backup, NbdSide | FileSide):  # the manifest
            differs = bool(backup.differing(offset, length, None if zero else bytearray(ours)))
            theirs_zero = all(backup.manifest.is_zero(i) for i in _manifest_granules(backup, g))
        else:
            theirs = _read(backup, offset, length)
            read += length
            differs = ours != theirs
            theirs_zero = theirs.count(0) == length
        changed += differs
        data += not (zero and theirs_zero)
    seconds = time.monotonic() - started
    sampled = len(chosen)
    low, high = wilson(changed, sampled)
    data_fraction = data / sampled if sampled else 0.0
    rate = read / seconds if seconds > 0 else math.inf
    sides = 2 if isinstance(backup, NbdSide | FileSide) else 1
    full = sides * size * data_fraction / rate if rate > 0 else 0.0
    return Estimate(sampled, changed, low, high, data_fraction, seconds, full)


def _manifest_granules(side: ManifestSide, granule: int) -> range:
    """The manifest's granules within the bitmap's granule ``granule``."""
    first = granule * side.per_granule
    return range(first, min(first + side.per_granule, side.manifest.granules))
