"""`python -m benchmarks`: see benchmarks/__init__.py and `python -m benchmarks --help`."""

import sys

from .runner import main

sys.exit(main())
