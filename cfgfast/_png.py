"""A dependency-free PNG writer and reader (8-bit grey/RGB/RGBA), a scatter-plot rasteriser and an image grid,
for the pictures the command line draws and the image-folder datasets. Writes are atomic (cfgfast._io)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from ._io import atomic_open


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
    with atomic_open(path) as f:
        f.write(png)


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


class UnsupportedPNG(ValueError):
    """A valid PNG of a kind read_png does not decode (bit depth, colour type, interlacing): Pillow may."""


def read_png(path: str) -> np.ndarray:
    """uint8 [H, W, C] (C = 1, 3 or 4) from an 8-bit, non-interlaced grey, RGB, grey+alpha or RGBA PNG. A damaged
    file is a ValueError naming it; a PNG of another kind an UnsupportedPNG (a ValueError too)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            if len(body) != 13:
                raise ValueError(f"{path} is a corrupt PNG file (an IHDR chunk of {len(body)} bytes, not 13)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError(f"{path} is a truncated PNG file")
    width, height, depth, color, compression, filtering, interlace = header
    if not (1 <= width < 2**31 and 1 <= height < 2**31) or compression or filtering:
        raise ValueError(f"{path} is a corrupt PNG file (IHDR: {width} x {height} pixels, compression method "
                         f"{compression}, filter method {filtering})")
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise UnsupportedPNG(f"{path}: only 8-bit non-interlaced grey/RGB/RGBA PNGs are read (got bit depth {depth}, "
                             f"colour type {color}, interlace {interlace}); convert it or install Pillow")
    stride = width * channels
    expected = height * (stride + 1)
    try:
        # at most the declared image's bytes (and one more, to tell a longer stream): a small file that inflates to
        # gigabytes is refused without allocating them
        inflate = zlib.decompressobj()
        raw = inflate.decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        raise ValueError(f"{path} is a corrupt PNG file: {exc}") from None
    if len(raw) != expected or not inflate.eof:
        raise ValueError(f"{path} is a corrupt PNG file (image data of the wrong size)")
    raw = np.frombuffer(raw, dtype=np.uint8)
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    for y in range(height):  # undo the per-row filters of the PNG standard
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        up = out[y - 1] if y else np.zeros(stride, dtype=np.int32)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + up) & 255
        elif kind in (1, 3, 4):
            cur = out[y]
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up[x]) >> 1
                else:
                    upleft = up[x - channels] if x >= channels else 0
                    p = left + up[x] - upleft
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - upleft)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else upleft)
                cur[x] = (line[x] + pred) & 255
        else:
            raise ValueError(f"{path} is a corrupt PNG file (filter type {kind})")
    return out.astype(np.uint8).reshape(height, width, channels)


def image_grid(images: np.ndarray, rows: int, cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """uint8 [rows * cols, H, W, C] (C = 1 or 3), row-major, -> one RGB picture with white gaps, each pixel
    drawn as a scale x scale square."""
    n, height, width, channels = images.shape
    if n != rows * cols:
        raise ValueError(f"image_grid: {n} images do not fill {rows} x {cols}")
    if channels == 1:
        images = np.repeat(images, 3, axis=3)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = height * scale, width * scale
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    return grid
