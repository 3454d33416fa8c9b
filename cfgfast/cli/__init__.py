"""Command line (SPEC §4): one module per subcommand, each with `add_parser(sub, name)` and `run(args)`.

`cfgfast info` prints the build facts; `toy`, `demo`, `sample`, `train`, `train-classifier` and `evaluate`
live in their own modules."""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("Classifier-free guided diffusion (Ho & Salimans) with fused reverse-step kernels: sample from a "
               "bundled or trained model, train one, evaluate the trade-off in w, or see what was built (info). "
               "`cfgfast COMMAND --help` for each command.")

# subcommand -> module in this package
COMMANDS = {
    "demo": "demo",
    "info": "info",
    "toy": "toy",
    "sample": "sample",
    "train": "train",
    "train-classifier": "train_classifier",
    "evaluate": "evaluate",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cfgfast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(f"cfgfast.cli.{module}").add_parser(sub, name)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"cfgfast: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # e.g. a picture or batch too large for this machine (numpy's has a message)
        print(f"cfgfast: error: out of memory{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"cfgfast: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
