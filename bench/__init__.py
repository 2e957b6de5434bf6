"""dirtydiff's benchmarks, run as ``python -m bench [NAME ...] [options]``.

Each benchmark is a module with ``main(argv) -> int``; ``bench.__main__``
dispatches by name and runs them all when none is named.
"""
