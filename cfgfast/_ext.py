"""The optional compiled extension, cfgfast._C.

`import cfgfast` works without it (the reference backend is plain PyTorch); asking for a compiled
backend then raises one message with the command that rebuilds it (cfgfast.backends).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import warnings

REBUILD = "pip install --no-build-isolation ."

_module = None
_error: str | None = None
cuda_kernel = False  # the extension holds the CUDA kernels (a plain bool: torch.compile reads it while tracing)


def load():
    """cfgfast._C, or None if it is missing or was built against another torch."""
    global _module, _error, cuda_kernel
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("cfgfast._C")
            from cfgfast import _ops  # noqa: F401  (fake kernels for the ops just registered)
        except (ImportError, OSError) as exc:
            _error = f"{type(exc).__name__}: {exc}"
            here = os.path.dirname(os.path.abspath(__file__))
            installed = None if _has_build(here) else shadowed_build(here, sys.path)
            if installed is not None:
                # (the reference backend would run everything, silently and many times slower)
                _error = (f"this cfgfast is the source folder {here}, which has no compiled kernels, imported instead "
                          f"of the installed build in {installed} because Python looks in the current folder first: "
                          "run from another folder, or build the kernels into this one with pip install "
                          f"--no-build-isolation -e . ({_error})")
                warnings.warn(f"cfgfast: {_error}", stacklevel=2)
        else:
            cuda_kernel = bool(_module.build_info()["cuda_kernel"])
    return _module


def shadowed_build(package: str, path: list[str]) -> str | None:
    """Where `package` (the folder of the cfgfast being imported) is a source checkout's (setup.py beside it) and a
    cfgfast folder further along the import path holds a compiled _C: that folder (the installed build it hides)."""
    if not os.path.isfile(os.path.join(os.path.dirname(package), "setup.py")):
        return None
    for entry in path:
        folder = os.path.join(entry or os.getcwd(), "cfgfast")
        if os.path.isdir(folder) and not os.path.samefile(folder, package) and _has_build(folder):
            return folder
    return None


def _has_build(folder: str) -> bool:
    """A compiled _C in the folder (whether or not it loads: one that fails has its own error to tell)."""
    return any(os.path.isfile(os.path.join(folder, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def error() -> str | None:
    """Why the extension could not be loaded (None if it loaded)."""
    load()
    return _error
