"""Fake (meta) kernels of the compiled ops, so torch.compile can trace through them. Their checks
mirror csrc/op_checks.h."""

from __future__ import annotations

import torch

from ._checks import EPS_DTYPES


@torch.library.register_fake("cfgfast::reverse_step_")
def _reverse_step_fake(out, z, eps_cond, eps_uncond, w, noise, coef, seed, step, index_offset, clip, last):
    torch._check(z.dtype == torch.float32, lambda: f"cfgfast: z must be float32, got {z.dtype}")
    torch._check(z.dim() >= 1, lambda: "cfgfast: z needs a batch dimension")
    torch._check(eps_cond.dtype in EPS_DTYPES, lambda: f"cfgfast: bad eps_cond dtype {eps_cond.dtype}")
    torch._check(eps_uncond.dtype == eps_cond.dtype, lambda: "cfgfast: eps_uncond must have the dtype of eps_cond")
    torch._check(eps_cond.shape == z.shape and eps_uncond.shape == z.shape, lambda: "cfgfast: eps must have z's shape")
    torch._check(w.dtype == torch.float32 and w.shape == (z.shape[0],), lambda: "cfgfast: w must be float32 [B]")
    torch._check(noise is None or (noise.shape == z.shape and noise.dtype == torch.float32),
                 lambda: "cfgfast: noise must be float32 like z")
    torch._check(out.shape == z.shape and out.dtype == torch.float32, lambda: "cfgfast: out must be float32 like z")
    torch._check(out.is_contiguous(), lambda: "cfgfast: out must be contiguous")
    torch._check(len(coef) == 7, lambda: "cfgfast: coef must hold 7 numbers")
    _check_noise_out(out, step, 1, index_offset)


def _check_noise_out(out, step, stream, index_offset):
    torch._check(out.dtype == torch.float32, lambda: f"cfgfast: out must be float32, got {out.dtype}")
    torch._check(out.dim() >= 1, lambda: "cfgfast: out needs a batch dimension")
    torch._check(out.is_contiguous(), lambda: "cfgfast: out must be contiguous")
    torch._check(0 <= step < 2**32, lambda: f"cfgfast: step must be in [0, 2^32), got {step}")
    torch._check(0 <= stream < 2**32, lambda: f"cfgfast: stream must be in [0, 2^32), got {stream}")
    torch._check(0 <= index_offset and index_offset + out.shape[0] <= 2**32,
                 lambda: f"cfgfast: index_offset + batch must be in [0, 2^32], got index_offset={index_offset}")


@torch.library.register_fake("cfgfast::normal_noise_")
def _normal_noise_fake(out, seed, step, stream, index_offset):
    _check_noise_out(out, step, stream, index_offset)


@torch.library.register_fake("cfgfast::reverse_step_table_")
def _reverse_step_table_fake(out, z, eps_cond, eps_uncond, w, coef_table, step, seed, index_offset, clip):
    torch._check(coef_table.dtype == torch.float64, lambda: f"cfgfast: coef_table must be float64, got {coef_table.dtype}")
    torch._check(coef_table.dim() == 2 and coef_table.shape[1] == 7, lambda: "cfgfast: coef_table must be [T, 7]")
    torch._check(step.dtype == torch.int64 and step.numel() == 1, lambda: "cfgfast: step must be one int64")
    _reverse_step_fake(out, z, eps_cond, eps_uncond, w, None, [1.0] * 7, seed, 0, index_offset, clip, False)
