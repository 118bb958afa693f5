"""``python -m pipeline.tools.bench``, and ``python -m pipeline.bench`` through its shim: the benchmark's command."""

import sys

from pipeline.tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
