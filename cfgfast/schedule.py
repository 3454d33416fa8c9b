"""The continuous-time schedule in log-SNR lambda (SPEC §1) and the per-step coefficients (SPEC §2).

alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam). Every scalar is computed in float64 on the host with
expm1 / log-sigmoid forms, never as 1 - sigmoid(.) in float32, and rounded to float32 once, in the kernel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

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


def sampling_lambdas(steps: int, lambda_min: float = LAMBDA_MIN, lambda_max: float = LAMBDA_MAX) -> torch.Tensor:
    """The sampling grid: float64 [steps], increasing from lambda_min to lambda_max.

    lam_t = -2 log tan(a u_t + b) at u_t = 1 - t / (steps - 1): evenly spaced in u, not in lambda.
    """
    steps = _checks.steps(steps)
    lambda_min, lambda_max = _check_range(lambda_min, lambda_max)
    u = 1.0 - torch.arange(steps, dtype=torch.float64) / (steps - 1)
    lam = _sech_map(u, lambda_min, lambda_max).clamp(lambda_min, lambda_max)
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


@dataclass(frozen=True)
class StepCoefficients:
    """The float64 scalars of one reverse step lam -> lam_next (SPEC §2), in the kernels' order.

    mu = mean_z z - mean_eps eps           (second form, no clipping)
    mu = mean_z_clip z + mean_x_clip x     (first form, with clipped x)
    z' = mu + noise_std n
    """

    alpha: float
    sigma: float
    mean_z: float
    mean_eps: float
    mean_z_clip: float
    mean_x_clip: float
    noise_std: float

    def as_list(self) -> list[float]:
        # explicit, not dataclasses.astuple (which deep-copies): torch.compile traces this
        return [self.alpha, self.sigma, self.mean_z, self.mean_eps, self.mean_z_clip, self.mean_x_clip,
                self.noise_std]


def step_coefficients(lam: float, lam_next: float, v: float) -> StepCoefficients:
    """Coefficients of the step lam -> lam_next with variance interpolation v (float64 throughout).

    r = e^(lam - lam_next); 1 - r = -expm1(lam - lam_next);
    var = ((1 - r) sigma_next^2)^(1 - v) ((1 - r) sigma^2)^v, formed in log space.
    For lam_next <= lam (only allowed on the last step, which uses alpha and sigma alone) the mean
    and variance terms are meaningless and set to nan.
    """
    lam, lam_next = _checks.log_snr("lam", lam), _checks.log_snr("lam_next", lam_next)
    v = _checks.unit_interval("v", v)
    log_alpha2, log_sigma2 = log_sigmoid(lam), log_sigmoid(-lam)
    alpha, sigma = math.exp(0.5 * log_alpha2), math.exp(0.5 * log_sigma2)
    if not lam < lam_next:
        nan = float("nan")
        return StepCoefficients(alpha, sigma, nan, nan, nan, nan, nan)
    log_alpha2_next, log_sigma2_next = log_sigmoid(lam_next), log_sigmoid(-lam_next)
    one_minus_r = -math.expm1(lam - lam_next)
    r = math.exp(lam - lam_next)
    ratio = math.exp(0.5 * (log_alpha2_next - log_alpha2))  # alpha_next / alpha
    alpha_next = math.exp(0.5 * log_alpha2_next)
    log_var = math.log(one_minus_r) + (1.0 - v) * log_sigma2_next + v * log_sigma2
    return StepCoefficients(
        alpha=alpha,
        sigma=sigma,
        mean_z=ratio,
        mean_eps=one_minus_r * ratio * sigma,
        mean_z_clip=r * ratio,
        mean_x_clip=one_minus_r * alpha_next,
        noise_std=math.exp(0.5 * log_var),
    )


def coefficient_table(lambdas, v: float) -> torch.Tensor:
    """float64 [T, 7]: row t holds step_coefficients(lam_t, lam_t+1, v) in the kernels' order; the last
    row (the last step, which returns x~) holds alpha and sigma of lam_T-1 and nan elsewhere.

    With cfgfast.reverse_step_table this lets one captured CUDA graph replay every step.
    """
    v = _checks.unit_interval("v", v)
    lam = _checks.lambda_grid("lambdas", lambdas)
    for t, x in enumerate(lam):
        _checks.log_snr(f"lambdas[{t}]", x)
    for t in range(len(lam) - 1):
        if not lam[t] < lam[t + 1]:
            raise ValueError(f"lambdas must be increasing, got lambdas[{t}]={lam[t]} >= lambdas[{t + 1}]={lam[t + 1]}")
    rows = [step_coefficients(lam[t], lam[t + 1], v).as_list() for t in range(len(lam) - 1)]
    rows.append(step_coefficients(lam[-1], lam[-1], v).as_list())
    return torch.tensor(rows, dtype=torch.float64)


def diffuse(x: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The forward process: z_λ = α_λ x + σ_λ ε per sample (lam [B]), in x's float32."""
    alpha, sigma = alpha_sigma(lam)
    per_sample = (-1,) + (1,) * (x.dim() - 1)
    return alpha.float().view(per_sample) * x + sigma.float().view(per_sample) * eps
