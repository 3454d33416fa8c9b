"""`python -m cfgfast ...`: the command line of cfgfast.cli."""

import sys

from cfgfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
