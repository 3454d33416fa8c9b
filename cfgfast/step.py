"""One reverse step lam -> lam_next of classifier-free guided sampling (SPEC §2), on any backend."""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import _checks
from .backends import choose
from .schedule import step_coefficients

# A loop that samples batch after batch asks for the same (lam, lam_next, v) again: the float64 formulas cost
# more Python time than the rest of a small step's checks. (Not while torch.compile traces: it would graph-break
# on the cache.)
_cached_step_coefficients = functools.lru_cache(maxsize=4096)(step_coefficients)


def _check_common(z, eps_cond, eps_uncond, w, seed, index_offset, clip, out):
    """The checks reverse_step and reverse_step_table share; returns (w [B] float32, seed, index_offset,
    clip, out)."""
    z = _checks.tensor("z", z)
    if z.dtype != torch.float32:
        raise TypeError(f"z must be float32, got {z.dtype}")
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension [B, ...], got a 0-d tensor")
    for name, eps in (("eps_cond", eps_cond), ("eps_uncond", eps_uncond)):
        _checks.like_z(name, eps, z)
        if eps.dtype not in _checks.EPS_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {eps.dtype}")
    if eps_uncond.dtype != eps_cond.dtype:
        raise TypeError(f"eps_uncond must have eps_cond's dtype {eps_cond.dtype}, got {eps_uncond.dtype}")
    batch = z.shape[0]
    index_offset = _checks.index_offset(index_offset, batch, "z's batch")  # (first: w below has batch elements)
    w = _checks.guidance(w, batch, z.device)
    seed = _checks.seed(seed)
    clip = _checks.clip(clip)
    if out is None:
        out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == z.shape
              and out.device == z.device and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of z's shape {tuple(z.shape)} on {z.device}")
    else:
        _checks.writable_out(out)
        _checks.out_may_alias(out, z=z, eps_cond=eps_cond, eps_uncond=eps_uncond, w=w)
    return w, seed, index_offset, clip, out


def reverse_step(z, eps_cond, eps_uncond, lam, lam_next, w, v=0.3, *, noise=None, seed=0, step=0, index_offset=0,
                 last=False, clip=None, backend="auto", out=None) -> torch.Tensor:
    """z' = mu~ + sqrt((sigma~^2)^(1-v) (sigma^2)^v) n  with  eps~ = (1 + w) eps_cond - w eps_uncond.

    z: float32 [B, ...] at log-SNR lam; eps_cond, eps_uncond: the model's predictions, float32,
    bfloat16 or float16, z's shape; w: a number or one per sample [B]; v: variance interpolation in
    [0, 1]. The noise n is that of SPEC §3 (stream 1, t = step, samples index_offset ...) unless
    `noise` is given. last=True returns x~ = (z - sigma eps~) / alpha with no noise. clip=c clamps x~
    to [-c, c] first. out: an optional contiguous float32 tensor of z's shape to write into (may be z).
    """
    w, seed, index_offset, clip, out = _check_common(z, eps_cond, eps_uncond, w, seed, index_offset, clip, out)
    lam = _checks.log_snr("lam", lam)
    lam_next = _checks.log_snr("lam_next", lam_next)
    if not isinstance(last, (bool, np.bool_)):
        raise TypeError(f"last must be a bool, got {type(last).__name__}")
    last = bool(last)
    if not last and not lam < lam_next:
        raise ValueError(f"lam must be below lam_next on a non-last step, got lam={lam} >= lam_next={lam_next}")
    v = _checks.unit_interval("v", v)
    if noise is not None:
        noise = _checks.like_z("noise", noise, z)
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        noise = noise.float()
        _checks.out_may_alias(out, noise=noise)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    coef = step_coefficients(lam, lam_next, v) if torch.compiler.is_compiling() else \
        _cached_step_coefficients(lam, lam_next, v)
    choose(backend, z.device).reverse_step(out, z, eps_cond, eps_uncond, w, noise, coef, seed, step, index_offset,
                                           clip, last)
    return out


def reverse_step_table(z, eps_cond, eps_uncond, coef_table, step, w, *, seed=0, index_offset=0, clip=None,
                       backend="auto", out=None) -> torch.Tensor:
    """reverse_step with the step's coefficients taken from row t = step[0] of coef_table.

    coef_table: float64 [T, 7] from cfgfast.schedule.coefficient_table(lambdas, v), on z's device;
    step: an int64 tensor of one element on z's device holding t (row T - 1 is the last step, which
    returns x~). On CUDA, t is read by the kernel, so a captured CUDA graph that also advances `step`
    (step += 1) replays every step of a sampling loop. The noise is that of SPEC §3 at t.
    """
    w, seed, index_offset, clip, out = _check_common(z, eps_cond, eps_uncond, w, seed, index_offset, clip, out)
    coef_table = _checks.like_device("coef_table", coef_table, z)
    if coef_table.dtype != torch.float64 or coef_table.dim() != 2 or coef_table.shape[1] != 7:
        raise ValueError(f"coef_table must be a float64 tensor [T, 7], got {coef_table.dtype} {tuple(coef_table.shape)}")
    step = _checks.like_device("step", step, z)
    if step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError(f"step must be an int64 tensor holding one number, got {step.dtype} {tuple(step.shape)}")
    choose(backend, z.device).reverse_step_table(out, z, eps_cond, eps_uncond, w, coef_table, step, seed,
                                                 index_offset, clip)
    return out
