"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import math
import os

FLOAT32_MAX = 3.4028234663852886e38


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


def refuse_existing(path: str, overwrite: bool, option: str = "--out") -> None:
    """An existing output file (perhaps hours of work) is replaced only with --overwrite."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{option} {path} exists: add --overwrite to replace it")


def finite_float(text: str) -> float:
    """An argparse type: a number finite in float32 (nan, inf and 1e39 refused while parsing, before any work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):  # as the kernels read it
        raise argparse.ArgumentTypeError(f"must be finite in float32, got {text}")
    return value
