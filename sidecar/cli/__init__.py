"""The ``dirtydiff`` command line.

Every command takes ``--state DIR``. Bitmap commands go to the running tracker
through its control socket; when no tracker runs they take the state lock
themselves and work on the files (the lock keeps a tracker from starting
meanwhile). Both paths run the same request code (dirtydiff.control.dispatch);
who serves a request is decided in one place, dirtydiff.owner.

The package, by role: ``parser`` (the arguments), ``bitmaps`` (bitmap
commands, checkpoint, status), ``scans`` (scan, rebuild), ``processes``
(track, serve) and ``output`` (tables, JSON, progress).

Exit codes: 0 success; 1 the request failed (one line on stderr says why);
2 bad command line; 3 the tracker is running but did not answer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dirtydiff import errors
from sidecar.cli.parser import build_parser

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

__all__ = ["EXIT_FAILED", "EXIT_UNAVAILABLE", "EXIT_USAGE", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s"
    )
    try:
        code: int = args.func(args)
        return code
    except errors.Unavailable as e:
        if args.debug:
            raise
        print(f"dirtydiff: {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.DirtydiffError as e:
        if args.debug:
            raise
        print(f"dirtydiff: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if args.debug:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"dirtydiff:{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
