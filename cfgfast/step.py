"""One guided sampler step (SPEC §6) on any backend: the public calls a user's own sampling loop makes."""

from __future__ import annotations

import functools
import math
import weakref

import numpy as np
import torch

from . import _checks
from .backends import choose
from .samplers import NUM_COEFFICIENTS, StepCoefficients, final_coefficients, sampler_step

# A loop that samples batch after batch asks for the same (lam, lam_next, v) again: the float64 formulas cost
# more Python time than the rest of a small step's checks. (Not while torch.compile traces: it would graph-break
# on the cache.)
@functools.lru_cache(maxsize=4096)
def _ddpm_row(lam: float, lam_next: float, v: float, last: bool) -> list[float]:
    if last:
        return final_coefficients("epsilon", lam).as_list()
    return sampler_step("ddpm", [lam, lam_next], 0, v=v).as_list()


def guidance_weights(w: torch.Tensor) -> torch.Tensor:
    """float32 [B, 2]: (1 + w, w) per sample, so that g = (1 + w) o_c - w o_u (the paper's Eq. 6)."""
    return torch.stack([1.0 + w, w], dim=1)


def rescaled_weights(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, weights: torch.Tensor,
                     guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (SPEC §7; Lin et al. 2023, diffusers' rescale_noise_cfg) as per-sample weights:
    g <- phi g std(o_c) / std(g) + (1 - phi) g is g scaled by k = phi std(o_c) / std(g) + 1 - phi per sample, so the
    fused step reads (k w_cond, k w_uncond). Population standard deviations over each sample, in float32; a sample's
    k reads that sample alone."""
    per_sample = (-1,) + (1,) * (pred_cond.dim() - 1)
    dims = tuple(range(1, pred_cond.dim()))
    out_cond, out_uncond = pred_cond.float(), pred_uncond.float()
    g = weights[:, 0].reshape(per_sample) * out_cond - weights[:, 1].reshape(per_sample) * out_uncond
    std_cond = out_cond.std(dim=dims, correction=0)
    std_g = g.std(dim=dims, correction=0)
    k = guidance_rescale * std_cond / std_g + (1.0 - guidance_rescale)
    return weights * k[:, None]


# The weights of the last w seen: a loop passes the same w (a number, or a tensor it does not change) at every
# step, and making them costs more host time than the rest of a small step's call. A tensor w is matched by
# identity and version counter (every in-place change of it advances the counter).
_LAST_WEIGHTS: tuple | None = None


def _weights(w, batch: int, device: torch.device) -> torch.Tensor:
    global _LAST_WEIGHTS
    if torch.compiler.is_compiling():  # (a traced graph holds its own weights; dynamo cannot trace the cache)
        return guidance_weights(_checks.guidance(w, batch, device))
    if isinstance(w, torch.Tensor):
        # an inference tensor has no version counter: never cached
        key = None if w.is_inference() else ("tensor", id(w), w._version, batch, device)
    elif isinstance(w, float) or (isinstance(w, int) and not isinstance(w, bool) and abs(w) < 2**53):
        key = ("number", float(w), batch, device)
    else:
        key = None
    last = _LAST_WEIGHTS
    if key is not None and last is not None and last[0] == key and (key[0] == "number" or last[2]() is w):
        return last[1]
    weights = guidance_weights(_checks.guidance(w, batch, device))
    if key is not None:
        _LAST_WEIGHTS = (key, weights, weakref.ref(w) if key[0] == "tensor" else None)
    return weights


def _check_common(z, pred_cond, pred_uncond, w, seed, index_offset, clip, out, names=("pred_cond", "pred_uncond")):
    """The checks every step call shares; returns (weights [B, 2] float32, seed, index_offset, clip, out)."""
    z = _checks.tensor("z", z)
    if z.dtype != torch.float32:
        raise TypeError(f"z must be float32, got {z.dtype}")
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension [B, ...], got a 0-d tensor")
    for name, pred in zip(names, (pred_cond, pred_uncond)):
        _checks.like_z(name, pred, z)
        if pred.dtype not in _checks.EPS_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {pred.dtype}")
    if pred_uncond.dtype != pred_cond.dtype:
        raise TypeError(f"{names[1]} must have {names[0]}'s dtype {pred_cond.dtype}, got {pred_uncond.dtype}")
    batch = z.shape[0]
    index_offset = _checks.index_offset(index_offset, batch, "z's batch")  # (first: w below has batch elements)
    weights = _weights(w, batch, z.device)
    seed = _checks.seed(seed)
    clip = _checks.clip(clip)
    if out is None:
        out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == z.shape
              and out.device == z.device and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of z's shape {tuple(z.shape)} on {z.device}")
    else:
        _checks.writable_out(out)
        _checks.out_may_alias(out, z=z, **{names[0]: pred_cond, names[1]: pred_uncond}, w=weights)
    return weights, seed, index_offset, clip, out


def _check_state(x_prev, nu, z, pred_cond, out, inputs):
    """x_prev: float32 contiguous like z, written (so apart from every other tensor); nu: pred_cond's dtype."""
    if x_prev is not None:
        x_prev = _checks.like_z("x_prev", x_prev, z)
        if x_prev.dtype != torch.float32 or not x_prev.is_contiguous():
            raise ValueError(f"x_prev must be a contiguous float32 tensor of z's shape {tuple(z.shape)}")
        _checks.writable_out(x_prev)
        for name, t in inputs.items():
            if t is not None and t.device == x_prev.device and _checks.overlaps(x_prev, t):
                raise ValueError(f"x_prev must not overlap {name}: the step writes x~ into it")
    if nu is not None:
        nu = _checks.like_z("nu", nu, z)
        if nu.dtype != pred_cond.dtype:
            raise TypeError(f"nu must have pred_cond's dtype {pred_cond.dtype}, got {nu.dtype}")
    return x_prev, nu


def _coefficient_row(coef) -> list[float]:
    if isinstance(coef, StepCoefficients):
        return coef.as_list()
    if isinstance(coef, torch.Tensor):
        if coef.shape != (NUM_COEFFICIENTS,) or not coef.is_floating_point() or coef.device.type == "meta":
            raise ValueError(f"coef must be a row of cfgfast.step_table (a float tensor of {NUM_COEFFICIENTS}), got "
                             f"{coef.dtype} of shape {tuple(coef.shape)} on {coef.device}")
        row = coef.tolist()  # Python floats: float64 (a float32 row's values are exact in it)
    elif isinstance(coef, (list, tuple)) and len(coef) == NUM_COEFFICIENTS:
        row = [_checks.real(f"coef[{k}]", c) for k, c in enumerate(coef)]
    else:
        raise TypeError("coef must be a cfgfast.StepCoefficients or a row of cfgfast.step_table, got "
                        f"{type(coef).__name__}")
    if not all(map(math.isfinite, row)):
        k = next(k for k, c in enumerate(row) if not math.isfinite(c))
        raise ValueError(f"coef must be finite, got coef[{k}]={row[k]}")
    return row


def guided_step(z, pred_cond, pred_uncond, coef, w, *, x_prev=None, nu=None, noise=None, seed=0, step=0,
                index_offset=0, clip=None, guidance_rescale=0.0, backend="auto", out=None) -> torch.Tensor:
    """One step of any sampler of SPEC §6: z' from z and the model's outputs with and without the label.

    coef: the step's coefficients, row t of cfgfast.step_table(sampler, lambdas, ...) (or a StepCoefficients);
    w: a number or one per sample [B], g = (1 + w) pred_cond - w pred_uncond. x_prev: the multistep samplers'
    state ("dpmpp_2m", "dpmpp_2m_sde"), a float32 tensor of z's shape that the step reads (from its second step
    on) and overwrites with this step's x~. nu: a learned-variance model's nu of the conditional pass ("ddpm" with
    a learned_variance table). The noise is SPEC §3's (stream 1, t = step, samples index_offset ...) unless
    `noise` is given; a step whose row has no noise draws none. clip=c clamps x~ to [-c, c]. out: an optional
    contiguous float32 tensor of z's shape to write into (may be z). The row of the last step returns x~.
    guidance_rescale=phi in [0, 1] rescales g towards the conditional output's standard deviation per sample
    (SPEC §7, diffusers' rescale_noise_cfg).
    """
    weights, seed, index_offset, clip, out = _check_common(z, pred_cond, pred_uncond, w, seed, index_offset, clip,
                                                           out)
    guidance_rescale = _checks.unit_interval("guidance_rescale", guidance_rescale)
    if guidance_rescale:
        weights = rescaled_weights(pred_cond, pred_uncond, weights, guidance_rescale)
    row = _coefficient_row(coef)
    x_prev, nu = _check_state(x_prev, nu, z, pred_cond, out, dict(z=z, pred_cond=pred_cond, pred_uncond=pred_uncond,
                                                                  out=out, nu=nu, noise=noise))
    noise = _check_noise(noise, z, out)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    choose(backend, z.device).guided_step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, row, seed,
                                          step, index_offset, clip)
    return out


def _check_noise(noise, z, out):
    if noise is None:
        return None
    noise = _checks.like_z("noise", noise, z)
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    noise = noise.float()
    _checks.out_may_alias(out, noise=noise)
    return noise


def guided_step_table(z, pred_cond, pred_uncond, coef_table, step, w, *, x_prev=None, nu=None, seed=0,
                      index_offset=0, clip=None, backend="auto", out=None) -> torch.Tensor:
    """guided_step with the step's coefficients taken from row t = step[0] of coef_table.

    coef_table: float64 [T, 10] from cfgfast.step_table(...), on z's device; step: an int64 tensor of one element
    on z's device holding t. On CUDA, t is read by the kernel, so a captured CUDA graph that also advances `step`
    (step += 1) replays every step of a sampling loop. The noise is that of SPEC §3 at t.
    """
    weights, seed, index_offset, clip, out = _check_common(z, pred_cond, pred_uncond, w, seed, index_offset, clip,
                                                           out)
    coef_table = _checks.like_device("coef_table", coef_table, z)
    if coef_table.dtype != torch.float64 or coef_table.dim() != 2 or coef_table.shape[1] != NUM_COEFFICIENTS:
        raise ValueError(f"coef_table must be a float64 tensor [T, {NUM_COEFFICIENTS}] (cfgfast.step_table), got "
                         f"{coef_table.dtype} {tuple(coef_table.shape)}")
    step = _checks.like_device("step", step, z)
    if step.dtype != torch.int64 or step.numel() != 1:
        raise ValueError(f"step must be an int64 tensor holding one number, got {step.dtype} {tuple(step.shape)}")
    x_prev, nu = _check_state(x_prev, nu, z, pred_cond, out, dict(z=z, pred_cond=pred_cond, pred_uncond=pred_uncond,
                                                                  out=out, nu=nu, coef_table=coef_table, step=step))
    choose(backend, z.device).guided_step_table(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step,
                                                seed, index_offset, clip)
    return out


def reverse_step(z, eps_cond, eps_uncond, lam, lam_next, w, v=0.3, *, noise=None, seed=0, step=0, index_offset=0,
                 last=False, clip=None, backend="auto", out=None) -> torch.Tensor:
    """The paper's step (SPEC §2, sampler "ddpm" on an epsilon model) from lam to lam_next:
    z' = mu~ + sqrt((sigma~^2)^(1-v) (sigma^2)^v) n  with  eps~ = (1 + w) eps_cond - w eps_uncond.

    z: float32 [B, ...] at log-SNR lam; eps_cond, eps_uncond: the model's predictions, float32,
    bfloat16 or float16, z's shape; w: a number or one per sample [B]; v: variance interpolation in
    [0, 1]. The noise n is that of SPEC §3 (stream 1, t = step, samples index_offset ...) unless
    `noise` is given. last=True returns x~ = (z - sigma eps~) / alpha with no noise. clip=c clamps x~
    to [-c, c] first. out: an optional contiguous float32 tensor of z's shape to write into (may be z).
    """
    weights, seed, index_offset, clip, out = _check_common(z, eps_cond, eps_uncond, w, seed, index_offset, clip, out,
                                                           names=("eps_cond", "eps_uncond"))
    lam = _checks.log_snr("lam", lam)
    lam_next = _checks.log_snr("lam_next", lam_next)
    if not isinstance(last, (bool, np.bool_)):
        raise TypeError(f"last must be a bool, got {type(last).__name__}")
    last = bool(last)
    if not last and not lam < lam_next:
        raise ValueError(f"lam must be below lam_next on a non-last step, got lam={lam} >= lam_next={lam_next}")
    v = _checks.unit_interval("v", v)
    noise = _check_noise(noise, z, out)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    row = _ddpm_row.__wrapped__(lam, lam_next, v, last) if torch.compiler.is_compiling() else \
        _ddpm_row(lam, lam_next, v, last)
    choose(backend, z.device).guided_step(out, z, eps_cond, eps_uncond, weights, None, None, noise, row, seed, step,
                                          index_offset, clip)
    return out
