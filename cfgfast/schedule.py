"""The continuous-time schedule in log-SNR lambda (SPEC §1): the sampling and training grids.

alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam). Every scalar is computed in float64 on the host with
expm1 / log-sigmoid forms, never as 1 - sigmoid(.) in float32, and rounded to float32 once, in the kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _checks

LAMBDA_MIN = -20.0
LAMBDA_MAX = 20.0


def _check_range(lambda_min, lambda_max) -> tuple[float, float]:
    """The range as Python floats (any real number or 0-d tensor given)."""
    lambda_min = _checks.log_snr("lambda_min", lambda_min)
    lambda_max = _checks.log_snr("lambda_max", lambda_max)
    if not lambda_min < lambda_max:
        raise ValueError(f"lambda_min must be below lambda_max, got {lambda_min} >= {lambda_max}")
    return lambda_min, lambda_max


def _sech_map(u: torch.Tensor, lambda_min: float, lambda_max: float) -> torch.Tensor:
    # lam = -2 log tan(a u + b): a hyperbolic secant truncated to [lambda_min, lambda_max] (paper, Sec. 2)
    b = math.atan(math.exp(-0.5 * lambda_max))
    a = math.atan(math.exp(-0.5 * lambda_min)) - b
    return -2.0 * torch.log(torch.tan(a * u + b))


SPACINGS = ("paper", "uniform")


def sampling_lambdas(steps: int, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX,
                     spacing: str = "paper") -> torch.Tensor:
    """The sampling grid: float64 [steps], increasing from lambda_min to lambda_max.

    spacing="paper": lam_t = -2 log tan(a u_t + b) at u_t = 1 - t / (steps - 1), evenly spaced in u (the training
    density's quantiles: dense near lam = 0, a large last step). spacing="uniform": evenly spaced in lambda.
    """
    steps = _checks.steps(steps)
    lambda_min, lambda_max = _check_range(lambda_min, lambda_max)
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {spacing!r}")
    t = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    if spacing == "uniform":
        lam = lambda_min + (lambda_max - lambda_min) * t
    else:
        lam = _sech_map(1.0 - t, lambda_min, lambda_max).clamp(lambda_min, lambda_max)
    lam[0], lam[-1] = lambda_min, lambda_max  # exact ends: the last step is recognised by lam == lambda_max
    if not bool((lam[1:] > lam[:-1]).all()):  # float64 rounding, on a range too narrow for so many steps
        raise ValueError(f"steps={steps} is too many for the range [{lambda_min!r}, {lambda_max!r}]: float64 cannot "
                         f"hold that many increasing log-SNRs in it; take fewer steps or a wider range")
    return lam


def training_lambdas(
    u: torch.Tensor, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX, *, uniform: bool = False
) -> torch.Tensor:
    """Training log-SNRs from u ~ U(0, 1) (paper, Algorithm 1), in u's floating dtype.

    The truncated hyperbolic secant of SPEC §1, or with uniform=True lambda uniform on the range;
    either way u = 0 gives lambda_max and u = 1 lambda_min, as on the sampling grid.
    """
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {u.dtype}")
    if u.device.type == "meta":
        raise ValueError("u must have values, got a tensor on the meta device")
    lambda_min, lambda_max = _check_range(lambda_min, lambda_max)
    uniform = _checks.flag("uniform", uniform)
    u64 = u.double()
    if not bool(((u64 >= 0) & (u64 <= 1)).all()):
        raise ValueError("u must lie in [0, 1], got values outside it (or nan)")
    if uniform:
        lam = lambda_max - (lambda_max - lambda_min) * u64
    else:
        lam = _sech_map(u64, lambda_min, lambda_max)
    return lam.clamp(lambda_min, lambda_max).to(u.dtype)


def log_sigmoid(x: float) -> float:
    """log(sigmoid(x)) without overflow or cancellation, float64."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def alpha_sigma(lam):
    """(alpha, sigma) at log-SNR lam: floats for a float, float64 tensors for a tensor."""
    if isinstance(lam, torch.Tensor):
        lam = lam.double()
        logsig = torch.nn.functional.logsigmoid
        return torch.exp(0.5 * logsig(lam)), torch.exp(0.5 * logsig(-lam))
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a real number or a tensor, got {type(lam).__name__}")
    if math.isnan(lam):
        raise ValueError("lam must not be NaN")
    return math.exp(0.5 * log_sigmoid(lam)), math.exp(0.5 * log_sigmoid(-lam))


def diffuse(x: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The forward process: z_λ = α_λ x + σ_λ ε per sample (lam [B]), in x's float32."""
    alpha, sigma = alpha_sigma(lam)
    per_sample = (-1,) + (1,) * (x.dim() - 1)
    return alpha.float().view(per_sample) * x + sigma.float().view(per_sample) * eps
