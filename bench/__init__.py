"""dirtydiff's benchmarks, run as ``python -m bench [NAME ...] [options]``.

Each benchmark is a module with ``run(argv) -> report.Outcome`` (its exit
status and the ratios it measured) and ``main(argv) -> int`` for running it
alone; ``bench.__main__`` dispatches by name, runs them all when none is
named, and ends with one summary table of every ratio.
"""
