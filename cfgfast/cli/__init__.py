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
    try:  # (the subcommands' imports take seconds: a Ctrl-C there is an interruption too, not a traceback)
        parser = argparse.ArgumentParser(prog="cfgfast", description=DESCRIPTION)
        sub = parser.add_subparsers(dest="command", required=True)
        for name, module in COMMANDS.items():
            importlib.import_module(f"cfgfast.cli.{module}").add_parser(sub, name)
    except KeyboardInterrupt:
        print("cfgfast: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (for a command that records how it was run)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, OverflowError) as exc:
        # (ImportError: an optional dependency a command needs, e.g. scikit-learn for the digits; its message says
        # what to install. OverflowError: a number too large for torch, e.g. --batch-size 1e20)
        message = str(exc).split("\nException raised from ")[0]  # (torch's C++ errors append their stack)
        print(f"cfgfast: error: {_in_flags(message, sub.choices[args.command])}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # e.g. a picture or batch too large for this machine (numpy's has a message)
        print(f"cfgfast: error: out of memory{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"cfgfast: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


def _in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """An argument check of the library ("NAME must ..."), told in the command's flags: "steps must be at least 2"
    becomes "--steps must be at least 2" where the command has --steps (a module's ERROR_NAMES adds names that differ,
    such as evaluate's ws for --w). Other messages, and the compiled ops' own checks of internal tensors ("cfgfast:
    out must ..."), are left as they are (without a doubled "cfgfast: ")."""
    if message.startswith("cfgfast: "):
        return message.removeprefix("cfgfast: ")
    names = {action.dest: max(action.option_strings, key=len) for action in parser._actions
             if action.option_strings and action.dest != "help"}
    names.update(getattr(importlib.import_module(f"cfgfast.cli.{COMMANDS[parser.prog.split()[-1]]}"),
                         "ERROR_NAMES", {}))
    name, _, rest = message.partition(" ")
    return f"{names[name]} {rest}" if name in names and rest.startswith("must ") else message
