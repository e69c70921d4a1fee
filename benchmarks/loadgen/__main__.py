"""`python -m benchmarks.loadgen ...`, or `python benchmarks/loadgen ...` from the repository root."""

import sys
from pathlib import Path

if not __package__:  # run as a directory: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.loadgen.cli import main

sys.exit(main())
