"""``python -m bench [NAME ...] [OPTIONS]``: run the named benchmarks, or all of them.

Options after the names go to every benchmark run; ``python -m bench NAME
--help`` shows a benchmark's own options. ``--quick`` (small sizes, one round)
is understood by every benchmark. Each benchmark prints its own tables; the
run ends with one summary table of every ratio measured (``bench.report``).
"""

from __future__ import annotations

import compileall
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from bench.report import Outcome, Ratio, format_summary

# name -> (module in this package with ``run(argv) -> Outcome``, what it measures).
# Modules are imported only when they run: one broken benchmark cannot stop
# the others.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "tracker": ("tracker_fio", "fio writes: nbdkit file plugin vs the dirtydiff tracker"),
    "scan": ("scan", "diff scan vs the two-sided read limit and qemu-img compare"),
    "export": ("export", "sidecar export vs qemu-nbd: bitmap map and nbdcopy"),
    "snapshot-read": ("snapshot_read", "nbdcopy of a snapshot export vs QEMU's fleecing"),
}

Benchmark = Callable[[Sequence[str]], Outcome]


def usage() -> str:
    lines = ["usage: python -m bench [NAME ...] [OPTIONS]", "", "benchmarks:"]
    lines += [f"  {name:10s} {doc}" for name, (_, doc) in BENCHMARKS.items()]
    lines += [
        "",
        "With no NAME, every benchmark runs. `python -m bench NAME --help` for options;",
        "--quick (small sizes, one round) works for all of them.",
    ]
    return "\n".join(lines)


def run_one(name: str, args: Sequence[str]) -> Outcome:
    module, _ = BENCHMARKS[name]
    try:
        run = cast(Benchmark, importlib.import_module(f"bench.{module}").run)
        return run(args)
    except Exception:
        # The others still run, and the summary still shows what they measured.
        traceback.print_exc()
        print(f"bench {name}: failed", file=sys.stderr, flush=True)
        return Outcome(1)


def compile_product() -> None:
    """Byte-compile dirtydiff's packages first, as an installed package is.
    An editable install run with PYTHONDONTWRITEBYTECODE set compiles every
    changed module again at each start (~30 ms of every scan command here)."""
    root = Path(__file__).resolve().parent.parent
    for package in ("dirtydiff", "sidecar", "nbd_plugins"):
        compileall.compile_dir(root / package, quiet=1)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(usage())
        return 0
    names: list[str] = []
    while args and not args[0].startswith("-"):
        name = args.pop(0)
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
            return 2
        names.append(name)
    compile_product()
    status = 0
    ratios: list[Ratio] = []
    silent: list[str] = []
    for name in names or list(BENCHMARKS):
        print(f"== bench {name}", flush=True)
        outcome = run_one(name, args)
        status = max(status, outcome.status)
        ratios += outcome.ratios
        if not outcome.ratios:
            silent.append(name)
    print("\n== summary: dirtydiff (ours) against its peer, ratio = ours / peer")
    print(format_summary(ratios))
    if silent:
        print(f"no ratios from: {', '.join(silent)} (see its output above)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
