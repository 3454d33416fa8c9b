"""A dependency-free RGB PNG writer and a scatter-plot rasteriser, for the pictures the command line draws.
Writes go to a temporary file renamed when complete, so no partial file is ever left behind."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np


def write_png(path: str, rgb: np.ndarray) -> None:
    """rgb: uint8 [H, W, 3]."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def scatter_panel(points: np.ndarray, colors: np.ndarray, size: int, extent: float) -> np.ndarray:
    """A white size x size panel with points [N, 2] in [-extent, extent]^2 drawn as 2x2 dots of colors
    [N, 3] (uint8), a light cross at the origin and a grey frame."""
    panel = np.full((size, size, 3), 255, dtype=np.uint8)
    mid = size // 2
    panel[mid, :] = panel[:, mid] = 225
    px = np.round((points[:, 0] + extent) / (2 * extent) * (size - 2)).astype(int)
    py = np.round((extent - points[:, 1]) / (2 * extent) * (size - 2)).astype(int)
    keep = (px >= 0) & (px < size - 1) & (py >= 0) & (py < size - 1)
    for dy in (0, 1):
        for dx in (0, 1):
            panel[py[keep] + dy, px[keep] + dx] = colors[keep]
    panel[0, :] = panel[-1, :] = panel[:, 0] = panel[:, -1] = 150
    return panel
