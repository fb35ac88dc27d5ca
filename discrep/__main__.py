"""``python -m discrep``: same as the ``discrep`` console script (runs the CLI in the main thread)."""
import sys

from discrep.cli.main import main

sys.exit(main())
