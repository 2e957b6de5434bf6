"""Run many seeded scenarios and print what they proved.

The long run, from the repository root (as root: each scenario mounts a tmpfs
as its state directory)::

    .venv/bin/python -m tests.torture --scenarios 200 --seed 1

Each scenario's seed is drawn from the master seed and printed with its
result; ``--replay SEED`` runs that one scenario again (``--kinds`` picks its
actions instead of the seed's). The last line is the summary: scenarios,
faults injected per kind, bytes verified, granules lost (must be 0), and the
seed to replay a failure. The exit status is 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.torture.scenario import KINDS, Outcome, Scenario

GiB = 1 << 30


def scenario_seeds(master: int, count: int) -> list[int]:
    rng = random.Random(master)
    return [rng.randrange(1 << 32) for _ in range(count)]


@dataclass
class Summary:
    master: int | None
    scenarios: int = 0
    failed: list[Outcome] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0
    granules_lost: int = 0
    claims_verified: int = 0
    claims_unprovable: int = 0
    writes: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.scenarios += 1
        self.faults += outcome.faults
        self.writes += outcome.writes
        self.reconnects += outcome.writer_reconnects
        if outcome.verdict is not None:
            self.bytes_verified += outcome.verdict.bytes_verified
            self.granules_lost += outcome.verdict.granules_lost
            self.claims_verified += outcome.verdict.claims_verified
            self.claims_unprovable += outcome.verdict.claims_unprovable
        if outcome.failed:
            self.failed.append(outcome)

    def line(self) -> str:
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        replay = (
            f"replay: python -m tests.torture --replay {self.failed[0].seed}"
            if self.failed
            else "replay one with --replay SEED"
        )
        return (
            f"torture: {self.scenarios} scenarios, {len(self.failed)} failed, "
            f"{self.seconds:.0f}s; faults {sum(self.faults.values())} ({faults}); "
            f"{self.writes} writes ({self.reconnects} writer reconnects); "
            f"{self.bytes_verified / GiB:.2f} GiB verified in "
            f"{self.claims_verified} backup+bitmap restores "
            f"({self.claims_unprovable} unprovable, reported inconsistent); "
            f"granules lost: {self.granules_lost}; master seed {self.master}; {replay}"
        )


def describe(index: int, total: int, outcome: Outcome) -> str:
    verdict = outcome.verdict
    checked = (
        f"{verdict.claims_verified} restores verified, {verdict.claims_unprovable} unprovable, "
        f"granules changed/dirty/all {verdict.granules_changed}/{verdict.granules_dirty}/"
        f"{verdict.granules_total}, lost {verdict.granules_lost}"
        if verdict is not None
        else "not checked"
    )
    faults = ",".join(f"{k}={v}" for k, v in sorted(outcome.faults.items()))
    head = (
        f"[{index}/{total}] seed {outcome.seed}: {'FAILED' if outcome.failed else 'ok'} "
        f"{outcome.seconds:.1f}s; {outcome.description}; {outcome.writes} writes; "
        f"faults {faults}; {checked}"
    )
    details = [f"    problem: {p}" for p in outcome.problems]
    details += [f"    note: {n}" for n in outcome.notes]
    if outcome.error:
        details.append("    " + outcome.error.strip().replace("\n", "\n    "))
    return "\n".join([head, *details])


def run_scenarios(
    seeds: list[int],
    *,
    master: int | None = None,
    base: Path | None = None,
    kinds: list[str] | None = None,
    out: Callable[[str], None] = print,
) -> Summary:
    summary = Summary(master)
    started = time.monotonic()
    try:
        for i, seed in enumerate(seeds, 1):
            outcome = Scenario(seed, base, kinds).run()
            summary.add(outcome)
            out(describe(i, len(seeds), outcome))
    except KeyboardInterrupt:
        out(f"torture: interrupted; the summary covers the {summary.scenarios} scenarios done")
    summary.seconds = time.monotonic() - started
    out(summary.line())
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.torture",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--seed", type=int, help="master seed (default: from the clock)")
    parser.add_argument("--replay", type=int, metavar="SEED", help="run this one scenario")
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, help="these actions, in order, in every scenario"
    )
    parser.add_argument("--tmp", type=Path, help="where scenarios make their temp dirs")
    args = parser.parse_args(argv)
    # A run started in the background (nohup ... &) inherits SIGINT ignored;
    # SIGINT and SIGTERM both end it the same way: the scenario under way
    # stops its processes and unmounts its tmpfs, and the summary is printed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.replay is not None:
        seeds, master = [args.replay], None
    else:
        master = args.seed if args.seed is not None else int(time.time())
        seeds = scenario_seeds(master, args.scenarios)
        print(f"torture: master seed {master}, {args.scenarios} scenarios", flush=True)

    def out(text: str) -> None:
        print(text, flush=True)

    summary = run_scenarios(seeds, master=master, base=args.tmp, kinds=args.kinds, out=out)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
