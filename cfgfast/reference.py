"""The plain-PyTorch twin of every compiled kernel: the oracle the CPU, CUDA and Triton backends are
tested and benchmarked against.

Noise (SPEC §3): Philox4x32-10 in int64 tensor arithmetic (every product kept below 2^49, so nothing
overflows), and Box–Muller in float64, rounded once to float32. The step (SPEC §6): float32 arithmetic in the
kernels' order, with the float64 coefficients of cfgfast.samplers rounded to float32 once.
"""

from __future__ import annotations

import torch

from .samplers import StepCoefficients

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # m * x with x < 2^32 as (m_hi 2^16 + m_lo) * x: both partial products stay below 2^48.
    p_lo = x * (m & 0xFFFF)
    p_hi = x * (m >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors (or ints) holding 32-bit words; returns four int64 tensors."""
    x0, x1, x2, x3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, x0)
        hi1, lo1 = _mulhilo(PHILOX_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return x0, x1, x2, x3


def words_to_normals(x0, x1, x2, x3) -> torch.Tensor:
    """Box–Muller of SPEC §3 in float64: [..., 4] normals from four word tensors."""
    scale = 2.0**-24
    rho0 = torch.sqrt(-2.0 * torch.log(((x0 >> 8) + 1).double() * scale))
    rho1 = torch.sqrt(-2.0 * torch.log(((x2 >> 8) + 1).double() * scale))
    theta0 = (2.0 * torch.pi * scale) * (x1 >> 8).double()
    theta1 = (2.0 * torch.pi * scale) * (x3 >> 8).double()
    return torch.stack(
        [rho0 * torch.cos(theta0), rho0 * torch.sin(theta0), rho1 * torch.cos(theta1), rho1 * torch.sin(theta1)], -1
    )


def normal_noise_reference(shape, seed: int, step: int = 0, stream: int = 1, index_offset: int = 0, device="cpu"):
    """The noise of SPEC §3 for samples index_offset .. index_offset + shape[0] - 1, float32."""
    shape = tuple(shape)
    batch, per_sample = shape[0], 1
    for size in shape[1:]:
        per_sample *= size
    groups = (per_sample + 3) // 4
    group = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    sample = (index_offset + torch.arange(batch, dtype=torch.int64, device=device))[:, None].expand(batch, groups)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    words = philox4x32_10((group, sample, step, stream), key)
    normals = words_to_normals(*words).reshape(batch, 4 * groups)[:, :per_sample]
    return normals.float().reshape(shape)


def guided_step_reference(
    z: torch.Tensor,
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor,
    weights: torch.Tensor,
    coef: StepCoefficients,
    noise: torch.Tensor | None,
    clip: float | None = None,
    x_prev: torch.Tensor | None = None,
    nu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided sampler step (SPEC §6) in plain float32 PyTorch, in the kernels' order (csrc/include/cfgfast/
    step.h): returns (z', x~). weights: float32 [B, 2], (w_cond, w_uncond) per sample, or [B, 3] with w_z (g plus
    w_z z); noise: float32 like z (read only where coef.noise_std != 0); x_prev: read only where coef.prev != 0; nu:
    learned variance."""
    per_sample = (-1,) + (1,) * (z.dim() - 1)
    w_cond, w_uncond = weights[:, 0].reshape(per_sample), weights[:, 1].reshape(per_sample)
    out_cond, out_uncond = pred_cond.float(), pred_uncond.float()
    c = [torch.tensor(x, dtype=torch.float32) for x in coef.as_list()]  # rounded to float32 once, as the kernels
    pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu = c
    g = w_cond * out_cond - w_uncond * out_uncond
    if weights.shape[1] == 3:
        g = g + weights[:, 2].reshape(per_sample) * z
    x = pred_z * z + pred_g * g
    if clip is not None:
        x = x.clamp(-clip, clip)
        z_next = mean_z * z + mean_x * x
    else:
        z_next = direct_z * z + direct_g * g
    z_next = z_next + uncond * out_uncond
    if coef.prev != 0.0 and x_prev is not None:
        z_next = z_next + prev * x_prev
    if coef.noise_std != 0.0:
        scale = noise_std if nu is None else noise_std * torch.exp(noise_nu * nu.float())
        z_next = z_next + scale * noise
    return z_next, x
