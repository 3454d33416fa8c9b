"""Fake (meta) kernels of the compiled ops, so torch.compile can trace through them. Their checks
mirror csrc/op_checks.h."""

from __future__ import annotations

import torch

from ._checks import check, op_clip, op_noise_out, op_step_args


@torch.library.register_fake("cfgfast::reverse_step_")
def _reverse_step_fake(out, z, eps_cond, eps_uncond, w, noise, coef, seed, step, index_offset, clip, last):
    op_step_args(out, z, eps_cond, eps_uncond, w, noise, coef, step, index_offset)
    op_clip(clip)


@torch.library.register_fake("cfgfast::normal_noise_")
def _normal_noise_fake(out, seed, step, stream, index_offset):
    op_noise_out(out, step, stream, index_offset)


@torch.library.register_fake("cfgfast::reverse_step_table_")
def _reverse_step_table_fake(out, z, eps_cond, eps_uncond, w, coef_table, step, seed, index_offset, clip):
    check(coef_table.dtype == torch.float64, lambda: f"cfgfast: coef_table must be float64, got {coef_table.dtype}")
    check(coef_table.dim() == 2 and coef_table.shape[1] == 7, lambda: "cfgfast: coef_table must be [T, 7]")
    check(step.dtype == torch.int64 and step.numel() == 1, lambda: "cfgfast: step must be one int64")
    check(coef_table.device == z.device and step.device == z.device,
          lambda: f"cfgfast: coef_table and step must be on {z.device}")
    _reverse_step_fake(out, z, eps_cond, eps_uncond, w, None, [1.0] * 7, seed, 0, index_offset, clip, False)
