"""``python -m kerasrt ...``: the same command line as ``kerasrt ...``."""

import sys

from kerasrt.cli import main

sys.exit(main())
