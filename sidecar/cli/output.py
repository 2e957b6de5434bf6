"""How the command line shows results: sizes, the bitmap table, JSON for
scripts, and a scan's progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dirtydiff.control import replies
from dirtydiff.state import BitmapInfo

if TYPE_CHECKING:  # the scan engine loads libnbd: not for the bitmap commands
    from sidecar.scan.engine import Progress
    from sidecar.scan.job import ScanResult


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_table(bitmaps: list[BitmapInfo]) -> None:
    rows = [("NAME", "GRANULARITY", "RECORDING", "CONSISTENT", "DIRTY")]
    for b in bitmaps:
        rows.append(
            (
                b.name,
                human_size(b.granularity),
                "yes" if b.recording else ("enabled" if b.enabled else "no"),
                "yes" if b.consistent else f"NO: {b.reason}",
                human_size(b.dirty_bytes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def emit(result: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        human(result)


def emit_bitmap(result: object, as_json: bool) -> None:
    """A request's BitmapInfo, as one line of the table or as JSON (the map
    it travels as)."""
    info = replies.bitmap_info(result)
    emit(info.as_dict(), as_json, lambda _: print_table([info]))


# -- commands -------------------------------------------------------------


def progress_printer(enabled: bool) -> Callable[[Progress], None]:
    def show(p: Progress) -> None:
        if not enabled:
            return
        width = 30
        filled = int(width * p.ratio)
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * p.ratio:5.1f}% "
            f"{human_size(p.position)}/{human_size(p.total)} {human_size(int(p.rate))}/s "
            f"differing {p.differing_granules} granules, eta {eta}   "
        )
        sys.stderr.flush()

    return show


def scan_summary(result: ScanResult) -> str:
    p, b = result.progress, result.bitmap
    return (
        f"{human_size(p.compared)} compared in {p.elapsed:.1f}s "
        f"({human_size(int(p.rate))}/s), read {human_size(p.read_disk)} of the disk and "
        f"{human_size(p.read_backup)} of the backup; {p.differing_granules} granules "
        f"differ; {b.name} is consistent and recording ({human_size(b.dirty_bytes)} dirty)"
    )
