"""Training data, all offline: scikit-learn's digits (1,797 real 8x8 images shipped inside scikit-learn), a
folder with one subfolder of images per class, or an ADM-format .npz (arr_0 uint8 [N, H, W, C], arr_1 labels).
Images come back as float32 [N, C, H, W] in [-1, 1], the range the model is trained and sampled in."""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ._images import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# class ids index the model's label embedding (one row each): an .npz label beyond this is a wrong array, not a class
MAX_CLASSES = 100_000


@dataclass
class Dataset:
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # int64 [N] in [0, num_classes)
    num_classes: int
    class_names: list
    name: str


def to_unit_range(uint8_images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1]."""
    return torch.from_numpy(uint8_images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (the ADM sample format), rounded and clipped."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset is read from scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    # pixel values are 0..16; map them onto 0..255 so every dataset shares the uint8 path
    pixels = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Dataset(to_unit_range(pixels), torch.from_numpy(data.target.astype(np.int64)), 10,
                   [str(k) for k in range(10)], "digits")


def image_folder(root: str) -> Dataset:
    """root/<class name>/<image>: classes in sorted order; all images must share one size and channel count."""
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not names:
        raise ValueError(f"--dataset {root}: no class subfolders (expected {root}/<class>/<image>.png)")
    images, labels, first = [], [], None
    for label, name in enumerate(names):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"--dataset {root}: class folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            path = os.path.join(root, name, f)
            image = read_image(path)
            if first is None:
                first = (path, image.shape)
            elif image.shape != first[1]:
                raise ValueError(f"--dataset {root}: images of mixed sizes: {first[0]} is {first[1][:2]} with "
                                 f"{first[1][2]} channels, {path} is {image.shape[:2]} with {image.shape[2]}")
            images.append(image)
            labels.append(label)
    return Dataset(to_unit_range(np.stack(images)), torch.tensor(labels, dtype=torch.int64), len(names), names,
                   os.path.basename(os.path.normpath(root)))


def npz_file(path: str) -> Dataset:
    """An ADM-format .npz: arr_0 uint8 [N, H, W, C], arr_1 integer labels [N] in [0, K)."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a .npy: one array
            raise ValueError("it holds a single array (.npy), not arrays arr_0 and arr_1")
        with f:
            files = sorted(f.files)
            arrays = (f["arr_0"], f["arr_1"]) if "arr_0" in files and "arr_1" in files else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        # (numpy takes a file that is not a zip for a pickle, which allow_pickle=False refuses)
        detail = "not an .npz archive" if "pickled" in str(exc) else str(exc)
        raise ValueError(f"--dataset {path}: cannot read it as .npz: {detail}") from None
    if arrays is None:
        raise ValueError(f"--dataset {path}: expected arrays arr_0 (images) and arr_1 (labels), got {files}")
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"--dataset {path}: arr_0 must be uint8 [N, H, W, C] with C = 1 or 3, got {images.dtype} "
                         f"{images.shape}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"--dataset {path}: arr_1 must be integer labels [{images.shape[0]}], got {labels.dtype} "
                         f"{labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"--dataset {path}: labels must be non-negative, got {labels.min()}")
    if labels.size and int(labels.max()) >= MAX_CLASSES:  # (uint64 too: compared as Python ints, before any cast)
        raise ValueError(f"--dataset {path}: arr_1 must hold class ids 0..K-1 with K at most {MAX_CLASSES}, got a "
                         f"label of {int(labels.max())}")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    return Dataset(to_unit_range(images), torch.from_numpy(labels.astype(np.int64)), num_classes,
                   [str(k) for k in range(num_classes)], os.path.basename(path))


def load_dataset(spec: str) -> Dataset:
    """'digits', a folder of class subfolders, or an .npz file."""
    if spec == "digits":
        data = digits()
    elif os.path.isdir(spec):
        data = image_folder(spec)
    elif spec.endswith(".npz"):
        if not os.path.isfile(spec):
            raise ValueError(f"--dataset {spec}: no such file")
        data = npz_file(spec)
    else:
        raise ValueError(f"--dataset must be 'digits', a folder with one subfolder per class, or an ADM .npz file; "
                         f"got {spec!r}")
    if len(data.labels) == 0:
        raise ValueError(f"--dataset {spec}: no images")
    return data
