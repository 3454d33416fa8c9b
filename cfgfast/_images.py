"""Pictures: PNGs read and written with Pillow, plots drawn with matplotlib (its Agg renderer: no display needed),
image grids tiled with numpy. Writes are atomic (cfgfast._io): no partial file is ever left behind."""

from __future__ import annotations

import warnings

import numpy as np

from ._io import atomic_open


def pillow():
    """PIL.Image, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("cfgfast reads and writes images with Pillow, which is not installed: "
                          "pip install pillow") from None
    return Image


def matplotlib_agg():
    """(matplotlib's Figure, its Agg canvas), or an ImportError that says how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("cfgfast draws its plots with matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def figure(width: float, height: float, dpi: float, **options):
    """A matplotlib Figure of width x height inches (options: Figure's, e.g. layout) on the Agg canvas; pyplot's
    global state is left alone."""
    Figure, FigureCanvasAgg = matplotlib_agg()
    fig = Figure(figsize=(width, height), dpi=dpi, **options)
    FigureCanvasAgg(fig)
    return fig


def save_figure(path: str, fig) -> None:
    with atomic_open(path) as f:
        # no "Software" tag: the same plot gives the same bytes with any matplotlib version
        fig.savefig(f, format="png", facecolor="white", metadata={"Software": None})


def save_png(path: str, rgb: np.ndarray) -> None:
    """rgb: uint8 [H, W, 3]."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    image = pillow().fromarray(np.ascontiguousarray(rgb))
    with atomic_open(path) as f:
        image.save(f, format="PNG", optimize=True)


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 1] (greyscale, 16-bit ones rescaled to 8 bits) or [H, W, 3] (anything else, alpha dropped). A
    damaged file, or one over Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), is a ValueError naming it."""
    Image = pillow()
    try:
        with warnings.catch_warnings():
            # over MAX_IMAGE_PIXELS Pillow only warns (an error over twice that): a dataset image that large is
            # refused, not decoded into gigabytes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _pixels(im, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        message = str(exc)  # Pillow's own messages mostly do not name the file
        raise ValueError(message if path in message else f"{path}: {message}") from None


def _pixels(im, path: str) -> np.ndarray:
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit greyscale (convert("L") would saturate it at 255, not rescale): to 8 bits, rounded
        wide = np.asarray(im).astype(np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ValueError(f"{path}: a greyscale image of mode {im.mode} with values outside 0..65535")
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)[..., None]
    array = np.asarray(im.convert("L" if im.mode in ("L", "LA", "La", "1") else "RGB"), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


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
