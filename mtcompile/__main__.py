"""`python -m mtcompile` runs the command line."""

import sys

from mtcompile.cli import main

sys.exit(main())
