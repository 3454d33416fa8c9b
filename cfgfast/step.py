"""One guided sampler step (SPEC §6) on any backend: the public calls a user's own sampling loop makes.

They convert their arguments (numbers to the op's scalars, w to per-sample weights, the coefficient row) and pass
the tensors on as given: the op checks them by name (csrc/op_checks.h, or its twin in cfgfast/_checks.py)."""

from __future__ import annotations

import functools
import math
import re
import weakref

import numpy as np
import torch

from . import _checks
from .backends import choose
from .guidance import APG, Guide, check_method, check_rescale, check_threshold, given_x_rows
from .samplers import NUM_COEFFICIENTS, StepCoefficients, final_coefficients, sampler_step


def _ddpm_row(lam, lam_next, v, last) -> list[float]:
    """reverse_step's coefficient row (sampler "ddpm", or x~ on the last step) from its arguments."""
    lam = _checks.log_snr("lam", lam)
    lam_next = _checks.log_snr("lam_next", lam_next)
    if not isinstance(last, (bool, np.bool_)):
        raise TypeError(f"last must be a bool, got {type(last).__name__}")
    if not last and not lam < lam_next:
        raise ValueError(f"lam must be below lam_next on a non-last step, got lam={lam} >= lam_next={lam_next}")
    v = _checks.unit_interval("v", v)
    if last:
        return final_coefficients("epsilon", lam).as_list()
    return sampler_step("ddpm", [lam, lam_next], 0, v=v).as_list()


# A loop that samples batch after batch asks for the same (lam, lam_next, v, last) again: the float64 formulas cost
# more host time than the rest of a small step's call. Plain numbers only (typed: last=1 is not last=True), and not
# while torch.compile traces (it would graph-break on the cache).
_cached_ddpm_row = functools.lru_cache(maxsize=4096, typed=True)(_ddpm_row)
_PLAIN_NUMBERS = (float, int, bool)


def guidance_weights(w: torch.Tensor) -> torch.Tensor:
    """float32 [B, 2]: (1 + w, w) per sample, so that g = (1 + w) o_c - w o_u (the paper's Eq. 6)."""
    return torch.stack([1.0 + w, w], dim=1)


# The weights of the last w seen: a loop passes the same w (a number, or a tensor it does not change) at every
# step, and making them costs more host time than the rest of a small step's call (a tensor w is checked finite
# there: a host read, on a GPU a synchronisation). A tensor w is matched by identity and version counter (every
# in-place change of it, also through a view, advances it); writes that bypass the counter (through .data, a NumPy
# view, a CUDA graph's replay) are not seen, and a non-finite value there gives non-finite samples.
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


def _arguments(z, w, seed, index_offset, clip, out, **tensors):
    """What every step call converts: (weights [B, 2] float32, seed, index_offset, clip, out). The tensors (None: not
    given) are passed on as they are: their dtypes, shapes, devices and memory are the op's to check."""
    for name, t in (("z", z), ("out", out), *tensors.items()):
        if t is not None:
            _checks.tensor(name, t)
    batch = z.shape[0] if z.dim() else 0  # (a 0-d z is the op's to refuse)
    index_offset = _checks.index_offset(index_offset, batch, "z's batch")  # (first: w below has batch elements)
    weights = _weights(w, batch, z.device)
    seed = _checks.seed(seed)
    clip = None if clip is None else _checks.real("clip", clip)
    if out is None:  # (empty_like: a third of torch.empty's host time, which parses a shape and a device)
        out = torch.empty_like(z, dtype=torch.float32, memory_format=torch.contiguous_format)
    return weights, seed, index_offset, clip, out


def _noise(noise):
    """Explicit noise as float32, as the op reads it."""
    if noise is None or noise.dtype == torch.float32:
        return noise
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    return noise.float()


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
                index_offset=0, clip=None, guidance="cfg", guidance_rescale=0.0, threshold=None,
                momentum_buffer=None, backend="auto", out=None) -> torch.Tensor:
    """One step of any sampler of SPEC §6: z' from z and the model's outputs with and without the label.

    coef: the step's coefficients, row t of cfgfast.step_table(sampler, lambdas, ...) (or a StepCoefficients);
    w: a number or one per sample [B], g = (1 + w) pred_cond - w pred_uncond. x_prev: the multistep samplers'
    state ("dpmpp_2m", "dpmpp_2m_sde"), a float32 tensor of z's shape that the step reads (from its second step
    on) and overwrites with this step's x~. nu: a learned-variance model's nu of the conditional pass ("ddpm" with
    a learned_variance table). The noise is SPEC §3's (stream 1, t = step, samples index_offset ...) unless
    `noise` is given; a step whose row has no noise draws none. clip=c clamps x~ to [-c, c]. out: an optional
    contiguous float32 tensor of z's shape to write into (may be z). The row of the last step returns x~.

    SPEC §7, as in cfgfast.sample: guidance "cfg" or cfgfast.APG(...) (CFG++ is a table of its own:
    step_table("ddim", ..., guidance="cfgpp")); guidance_rescale=phi in [0, 1] (diffusers' rescale_noise_cfg);
    threshold=(p, M): dynamic thresholding of x~ instead of clip. momentum_buffer: APG's running value where its
    momentum is not 0, a contiguous float32 tensor of z's shape, zero before the first guided step and updated in
    place by each call for the samples whose w is not 0.
    """
    weights, seed, index_offset, clip, out = _arguments(z, w, seed, index_offset, clip, out, pred_cond=pred_cond,
                                                        pred_uncond=pred_uncond, x_prev=x_prev, nu=nu, noise=noise,
                                                        momentum_buffer=momentum_buffer)
    guide = _guide(guidance, guidance_rescale, threshold, clip, momentum_buffer, z)
    row = _coefficient_row(coef)
    noise = _noise(noise)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    stepper = choose(backend, z.device)
    if guide is None:
        stepper.guided_step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, row, seed, step,
                            index_offset, clip)
        return out
    # (the guide reads pred_cond and pred_uncond, and moves APG's running value, before the op: checked first, by
    # the op's twin, and the running value against every tensor the step reads or writes)
    _checks.op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, row, step, index_offset,
                                clip)
    if momentum_buffer is not None:
        _checks.disjoint(momentum_buffer, "momentum_buffer", z=z, pred_cond=pred_cond, pred_uncond=pred_uncond,
                         out=out, x_prev=x_prev, nu=nu, noise=noise)
    row_x = given_x_rows(row) if guide.forms_x else row
    guide.step(stepper, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, row, row_x, seed, step,
               index_offset, guided=True)
    return out


def _guide(guidance, guidance_rescale, threshold, clip, momentum_buffer, z) -> Guide | None:
    """guided_step's SPEC §7 settings as a Guide, or None for the paper's combination alone (the op as it is)."""
    if isinstance(guidance, str) and guidance == "cfg" and threshold is None and momentum_buffer is None \
            and type(guidance_rescale) in _PLAIN_NUMBERS and guidance_rescale == 0:
        return None
    method = check_method(None, guidance)
    rescale = check_rescale(guidance_rescale)
    threshold = check_threshold(threshold, clip)
    if momentum_buffer is not None:
        if not isinstance(method, APG):
            raise ValueError("momentum_buffer is APG's running value: give it with guidance=cfgfast.APG(momentum=...) "
                             f"only, got guidance={guidance!r}")
        if momentum_buffer.dtype != torch.float32 or momentum_buffer.shape != z.shape \
                or momentum_buffer.device != z.device or not momentum_buffer.is_contiguous():
            raise ValueError(f"momentum_buffer must be a contiguous float32 tensor of z's shape {list(z.shape)} on "
                             f"{z.device}, got {momentum_buffer.dtype} {list(momentum_buffer.shape)} on "
                             f"{momentum_buffer.device}")
    return Guide(method, rescale, threshold, clip, momentum_buffer)


def guided_step_table(z, pred_cond, pred_uncond, coef_table, step, w, *, x_prev=None, nu=None, seed=0,
                      index_offset=0, clip=None, backend="auto", out=None) -> torch.Tensor:
    """guided_step with the step's coefficients taken from row t = step[0] of coef_table.

    coef_table: float64 [T, 10] from cfgfast.step_table(...), on z's device; step: an int64 tensor of one element
    on z's device holding t. On CUDA, t is read by the kernel, so a captured CUDA graph that also advances `step`
    (step += 1) replays every step of a sampling loop. The noise is that of SPEC §3 at t.
    """
    weights, seed, index_offset, clip, out = _arguments(z, w, seed, index_offset, clip, out, pred_cond=pred_cond,
                                                        pred_uncond=pred_uncond, coef_table=coef_table, step=step,
                                                        x_prev=x_prev, nu=nu)
    choose(backend, z.device).guided_step_table(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step,
                                                seed, index_offset, clip)
    return out


# The op names the model's outputs pred_cond and pred_uncond; reverse_step's arguments are eps_cond and eps_uncond.
_EPS_NAMES = re.compile(r"\bpred_(cond|uncond)\b")


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
    weights, seed, index_offset, clip, out = _arguments(z, w, seed, index_offset, clip, out, eps_cond=eps_cond,
                                                        eps_uncond=eps_uncond, noise=noise)
    if type(lam) in _PLAIN_NUMBERS and type(lam_next) in _PLAIN_NUMBERS and type(v) in _PLAIN_NUMBERS \
            and type(last) in _PLAIN_NUMBERS and not torch.compiler.is_compiling():
        row = _cached_ddpm_row(lam, lam_next, v, last)
    else:
        row = _ddpm_row(lam, lam_next, v, last)
    noise = _noise(noise)
    step = _checks.integer("step", step, high=_checks.MAX_WORD)
    stepper = choose(backend, z.device)
    try:
        stepper.guided_step(out, z, eps_cond, eps_uncond, weights, None, None, noise, row, seed, step, index_offset,
                            clip)
    except (TypeError, ValueError) as error:
        raise type(error)(_EPS_NAMES.sub(r"eps_\1", str(error))) from None
    return out
