"""`python -m mtcompile` runs the command line."""

import sys

from mtcompile.tools.cli import main

sys.exit(main())
