"""``python -m discrep``: same as the ``discrep`` console script (runs the CLI in the main thread)."""
import sys

from .cli import main

sys.exit(main())
