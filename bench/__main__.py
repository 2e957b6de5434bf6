"""``python -m bench [NAME ...] [OPTIONS]``: run the named benchmarks, or all of them.

Options after the names go to every benchmark run; ``python -m bench NAME
--help`` shows a benchmark's own options.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module in this package with ``main(argv) -> int``, what it measures).
# Modules are imported only when they run: one broken benchmark cannot stop
# the others.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "tracker": ("tracker_fio", "fio writes: nbdkit file plugin vs the dirtydiff tracker"),
    "scan": ("scan", "diff scan vs the two-sided read limit and qemu-img compare"),
    "export": ("export", "sidecar export vs qemu-nbd: bitmap map and nbdcopy"),
}


def usage() -> str:
    lines = ["usage: python -m bench [NAME ...] [OPTIONS]", "", "benchmarks:"]
    lines += [f"  {name:10s} {doc}" for name, (_, doc) in BENCHMARKS.items()]
    lines += ["", "With no NAME, every benchmark runs. `python -m bench NAME --help` for options."]
    return "\n".join(lines)


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
    status = 0
    for name in names or list(BENCHMARKS):
        module, _ = BENCHMARKS[name]
        print(f"== bench {name}", flush=True)
        run = importlib.import_module(f"bench.{module}").main
        status = max(status, int(run(args)))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
