"""The noise of SPEC §3: a pure function of (seed, sample index, step, stream, element index), the
same on every backend, batch size and split."""

from __future__ import annotations

import torch

from . import _checks
from .backends import choose


def normal_noise(shape, seed: int, step: int = 0, stream: int = 1, index_offset: int = 0, *, device="cpu",
                 backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normals of SPEC §3, float32 of `shape` = [B, *sample_shape].

    Sample i of the result is global sample index_offset + i; element j of a sample is its C-order
    index. stream 0, step 0 is the initial z of the sampler; stream 1, step t the noise of the
    transition lam_t -> lam_(t+1). out: an optional contiguous float32 tensor of `shape` on `device`
    to write into (saves the allocation when drawing repeatedly).
    """
    if isinstance(shape, torch.Size) or (isinstance(shape, (tuple, list))):
        shape = tuple(_checks.integer("shape", s) for s in shape)
    else:
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension, got ()")
    seed = _checks.seed(seed)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    stream = _checks.integer("stream", stream, high=_checks.MAX_WORD)
    index_offset = _checks.index_offset(index_offset, shape[0], "shape[0]")
    device = _checks.resolve_device(device)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == shape
              and out.device == device and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape} on {device}")
    stepper = choose(backend, device)
    if out.numel():  # (the reference would build a sample's element indices even for an empty batch)
        stepper.normal_noise(out, seed, step, stream, index_offset)
    return out
