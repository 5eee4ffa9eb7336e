"""``python -m moe_hpc``: the same as the ``moe-hpc`` command."""
import sys

from .cli import main

sys.exit(main())
