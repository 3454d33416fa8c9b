"""`cfgfast info`: what this installation runs (compiled kernels, CPU instruction set, backends)."""

from __future__ import annotations

import json

import cfgfast


def run(args) -> int:
    print(json.dumps({**cfgfast.build_info(), "available_backends": cfgfast.available_backends()}, indent=2))
    return 0


def add_parser(sub, name: str) -> None:
    sub.add_parser(name, help="build facts and available backends").set_defaults(run=run)
