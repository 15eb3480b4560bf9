"""``python -m blora.server``: the same as ``blora serve``."""

import sys

from blora.server.cli import main

sys.exit(main())
