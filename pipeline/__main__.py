"""``python -m pipeline``: the single command-line entry point."""
import sys

from pipeline.cli import main

sys.exit(main())
