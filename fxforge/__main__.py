"""``python -m fxforge``: the console script."""
import sys

from fxforge.cli import main

sys.exit(main())
