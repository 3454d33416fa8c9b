"""The optional compiled extension, cfgfast._C.

`import cfgfast` works without it (the reference backend is plain PyTorch); asking for a compiled
backend then raises one message with the command that rebuilds it (cfgfast.backends).
"""

from __future__ import annotations

import importlib

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
        else:
            cuda_kernel = bool(_module.build_info()["cuda_kernel"])
    return _module


def error() -> str | None:
    """Why the extension could not be loaded (None if it loaded)."""
    load()
    return _error
