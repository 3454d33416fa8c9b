"""Atomic file writes: every file cfgfast writes (PNG, .npz, checkpoints) goes to a temporary file in the same
folder and is renamed over the target only when complete, so no partial file is ever left behind."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path: str):
    """with atomic_open(path) as f: write to the binary file f; path appears only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    except OSError as error:  # named by the file asked for, not by the temporary one
        raise OSError(error.errno, f"cannot write {path} (no file can be made in {folder}: {error.strerror})") \
            from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno is not None:  # disk full, a folder in the way: named by path
            raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
        raise
