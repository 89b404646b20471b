"""``python -m benchmarks``: run every benchmark, print the table, write benchmarks/RESULTS.md."""

import sys

from .runner import main

sys.exit(main())
