"""``python -m sidecar.cli``: what the ``dirtydiff`` entry point runs."""

import sys

from sidecar.cli import main

sys.exit(main())
