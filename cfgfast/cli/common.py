"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import math
import os


def writable_path(path: str, option: str = "--out") -> str:
    """The path, if a file can be created there (checked before any long work starts)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option}: folder {folder} is not writable")
    return path


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan and inf refused while parsing, before any work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value
