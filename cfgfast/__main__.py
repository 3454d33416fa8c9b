"""`python -m cfgfast ...`: the command line of cfgfast.cli."""

import sys

if __name__ == "__main__":
    try:
        from cfgfast.cli import main
    except KeyboardInterrupt:  # (importing torch takes seconds)
        print("cfgfast: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
