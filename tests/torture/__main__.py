"""``python -m tests.torture``: see tests.torture.runner."""

import sys

from tests.torture.runner import main

sys.exit(main())
