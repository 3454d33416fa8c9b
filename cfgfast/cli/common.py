"""Helpers shared by the subcommands."""

from __future__ import annotations

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
