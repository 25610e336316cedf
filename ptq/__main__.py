"""``python -m ptq ...``: the same command line as ``ptq ...``."""

import sys

from ptq.cli import main

if __name__ == "__main__":
    sys.exit(main())
