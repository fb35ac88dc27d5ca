"""``python -m discrep``: same as the ``discrep`` console script."""
import sys

from .cli import main

sys.exit(main())
