"""Fake (meta) kernels of the compiled ops, so torch.compile can trace through them. Their checks are
cfgfast/_checks.py's twin of csrc/op_checks.h."""

from __future__ import annotations

import torch

from ._checks import op_guided_step_args, op_guided_table_args, op_moments_args, op_noise_out


@torch.library.register_fake("cfgfast::guided_step_")
def _guided_step_fake(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset,
                      clip):
    op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip)


@torch.library.register_fake("cfgfast::guided_step_table_")
def _guided_step_table_fake(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed,
                            index_offset, clip):
    op_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset, clip)


@torch.library.register_fake("cfgfast::normal_noise_")
def _normal_noise_fake(out, seed, step, stream, index_offset):
    op_noise_out(out, step, stream, index_offset)


@torch.library.register_fake("cfgfast::sample_moments")
def _sample_moments_fake(inputs, combos, num_vectors):
    op_moments_args(inputs, combos, num_vectors)
    return inputs[0].new_empty((inputs[0].shape[0], num_vectors, num_vectors + 1), dtype=torch.float64)
