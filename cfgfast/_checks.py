"""Argument checks of the public API (SPEC §5): a ValueError or TypeError naming the argument, what
was expected and what was given."""

from __future__ import annotations

import math
import numbers

import torch

EPS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_WORD = 2**32  # counter words of SPEC §3 are 32 bits


def integer(name: str, value, *, low: int = 0, high: int | None = None) -> int:
    """A Python int (or integral 0-d tensor) in [low, high)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        upper = "" if high is None else f", below {high}"
        raise ValueError(f"{name} must be at least {low}{upper}, got {value}")
    return value


def real(name: str, value) -> float:
    """A finite Python float from a real number or a 0-d tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def like_z(name: str, value, z: torch.Tensor) -> torch.Tensor:
    """A tensor with z's shape and device."""
    value = tensor(name, value)
    if value.shape != z.shape:
        raise ValueError(f"{name} must have the shape of z {tuple(z.shape)}, got {tuple(value.shape)}")
    return like_device(name, value, z)


def like_device(name: str, value, z: torch.Tensor) -> torch.Tensor:
    """A tensor on z's device."""
    value = tensor(name, value)
    if value.device != z.device:
        raise ValueError(f"{name} must be on z's device {z.device}, got {value.device}")
    return value


def guidance(w, batch: int, device: torch.device) -> torch.Tensor:
    """w as a float32 tensor [batch] on device: a number, a 0-d tensor or one value per sample."""
    if isinstance(w, torch.Tensor):
        if w.dim() == 0:
            w = w.reshape(1).expand(batch)
        elif w.shape != (batch,):
            raise ValueError(f"w must be a number or a tensor of shape [{batch}] (one per sample), got {tuple(w.shape)}")
        if not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"w must be a real tensor, got {w.dtype}")
        w = w.to(device=device, dtype=torch.float32)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(w).all()):
            raise ValueError("w must be finite, got a non-finite value")
        return w.contiguous()
    return torch.full((batch,), real("w", w), dtype=torch.float32, device=device)


def unit_interval(name: str, value) -> float:
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def seed(value) -> int:
    return integer("seed", value, high=2**64)


def seed_as_int64(value: int) -> int:
    """The op schema carries the seed as int64: two's complement of a seed in [0, 2^64)."""
    return value - 2**64 if value >= 2**63 else value
