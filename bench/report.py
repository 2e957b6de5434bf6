"""The ratios every benchmark measures, and the one table ``python -m bench`` ends with.

Each benchmark prints its own detailed tables as it goes; it also returns one
``Ratio`` per comparison it made (dirtydiff against the peer run side by side
in the same invocation), so that a run of several benchmarks closes with a
single summary of ratios and targets instead of leaving them scattered over
pages of output.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Comparison = Literal[">=", ">", "<="]

_COMPARE: dict[Comparison, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
}


@dataclass(frozen=True)
class Target:
    """What the ratio ours/peer must satisfy, e.g. ``>= 0.9``."""

    comparison: Comparison
    value: float

    def met(self, ratio: float) -> bool:
        # NaN (a peer that measured zero) never meets a target.
        return not math.isnan(ratio) and _COMPARE[self.comparison](ratio, self.value)

    def __str__(self) -> str:
        return f"{self.comparison} {self.value:g}"


@dataclass(frozen=True)
class Ratio:
    """One comparison: dirtydiff's median against its peer's, in the same unit.

    The ratio is always ours / peer; whether higher or lower is better is in
    the target's comparison (``<=`` for times, ``>=`` for rates).
    """

    benchmark: str  # the name given to ``python -m bench``
    case: str  # what was measured and against which peer
    unit: str  # of ``ours`` and ``peer``: IOPS, GiB/s, s
    ours: float
    peer: float
    target: Target | None = None  # None: shown for information only

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else math.nan

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.ratio)


@dataclass
class Outcome:
    """What one benchmark run gives back: its exit status and its ratios."""

    status: int
    ratios: list[Ratio] = field(default_factory=list)


HEADER = ("benchmark", "case", "unit", "ours", "peer", "ratio", "target", "met")


def _number(value: float) -> str:
    # Three significant digits at any scale: IOPS in the tens of thousands and
    # map times in milliseconds share a column.
    if math.isnan(value):
        return "nan"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summary_rows(ratios: Sequence[Ratio]) -> list[tuple[str, ...]]:
    return [
        (
            r.benchmark,
            r.case,
            r.unit,
            _number(r.ours),
            _number(r.peer),
            "nan" if math.isnan(r.ratio) else f"{r.ratio:.2f}",
            "-" if r.target is None else str(r.target),
            {None: "-", True: "yes", False: "no"}[r.met],
        )
        for r in ratios
    ]


def format_summary(ratios: Sequence[Ratio]) -> str:
    """The summary table: one row per ratio, then how many targets were met
    (the met column says which; rows without a target are not counted)."""
    rows = summary_rows(ratios)
    widths = [max(len(row[i]) for row in (HEADER, *rows)) for i in range(len(HEADER))]
    numeric = {3, 4, 5}  # right-aligned: ours, peer, ratio

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(HEADER), line(["-" * w for w in widths])]
    lines += [line(row) for row in rows]
    judged = [r.met for r in ratios if r.met is not None]
    lines.append(f"{sum(judged)} of {len(judged)} targets met")
    return "\n".join(lines)
