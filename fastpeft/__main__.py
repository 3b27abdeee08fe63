"""``python -m fastpeft ...`` = the ``fastpeft`` command."""
import sys

from .cli import main

sys.exit(main())
