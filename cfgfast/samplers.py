"""The samplers of SPEC §6 as rows of float64 coefficients of one affine step (csrc/include/cfgfast/step.h).

Every sampler is affine in (z, x~, x~_prev, n) and every prediction type makes x~ affine in (z, g), so a sampler
is a function that returns, per transition lam -> lam', the coefficients of

    x~ = pred_z z + pred_g g                                  (the prediction type at lam)
    z' = mean_z z + mean_x x~ + prev x~_prev + noise_std n    (the sampler)

and the step kernels of every backend read one such row. Everything here is float64 on the host, with
expm1 / log-sigmoid forms (SPEC §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks
from .schedule import log_sigmoid, sampling_lambdas

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Samplers whose step reads the previous transition's x~ (the multistep state).
MULTISTEP = frozenset({"dpmpp_2m", "dpmpp_2m_sde"})
# Default grid per sampler (SPEC §6): (spacing, lambda_min, lambda_max). A second-order multistep step extrapolates
# by h / h_prev, which the paper's grid (dense near lam = 0, a large last step) makes large at few steps: even
# spacing in lambda for the DPM-Solver++ samplers, over [-10, 10], where the digits model's FD at 10 and 20 steps
# was lower than over [-20, 20] (docs/evaluation/samplers.md) as the toy's covariance error was (SPEC §6).
DEFAULT_GRID = {"ddpm": ("paper", -20.0, 20.0), "ddim": ("paper", -20.0, 20.0),
                "dpmpp_2m": ("uniform", -10.0, 10.0), "dpmpp_2m_sde": ("uniform", -10.0, 10.0)}
DEFAULT_SPACING = {sampler: grid[0] for sampler, grid in DEFAULT_GRID.items()}
DEFAULT_V = 0.3  # the paper's variance interpolation at 64x64


@dataclass(frozen=True)
class StepCoefficients:
    """The float64 coefficients of one step, in the kernels' order (StepCoef in csrc/include/cfgfast/step.h).

    x~ = pred_z z + pred_g g, clamped with clip;  g = (1 + w) o_c - w o_u
    z' = mean_z z + mean_x x~          (x~ clipped)
       = direct_z z + direct_g g       (not clipped: the same, without forming x~)
         + prev x~_prev + uncond o_u + noise_std exp(noise_nu nu) n
    """

    pred_z: float
    pred_g: float
    mean_z: float
    mean_x: float
    direct_z: float
    direct_g: float
    prev: float = 0.0
    uncond: float = 0.0
    noise_std: float = 0.0
    noise_nu: float = 0.0

    def as_list(self) -> list[float]:
        # explicit, not dataclasses.astuple (which deep-copies): torch.compile traces this
        return [self.pred_z, self.pred_g, self.mean_z, self.mean_x, self.direct_z, self.direct_g, self.prev,
                self.uncond, self.noise_std, self.noise_nu]


NUM_COEFFICIENTS = _checks.NUM_COEFFICIENTS


def _alpha_sigma(lam: float) -> tuple[float, float]:
    return math.exp(0.5 * log_sigmoid(lam)), math.exp(0.5 * log_sigmoid(-lam))


def prediction_coefficients(prediction_type: str, lam: float) -> tuple[float, float]:
    """(pred_z, pred_g) with x~ = pred_z z + pred_g g for a model output g of `prediction_type` at lam (SPEC §6)."""
    alpha, sigma = _alpha_sigma(lam)
    if prediction_type == "epsilon":  # x~ = (z - sigma eps) / alpha
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x, so x~ = alpha z - sigma v
        return alpha, -sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def _affine_step(prediction_type: str, lam: float, mean_z: float, mean_x: float, prev: float = 0.0,
                 uncond: float = 0.0, noise_std: float = 0.0, noise_nu: float = 0.0) -> StepCoefficients:
    """The row of a sampler step z' = mean_z z + mean_x x~ + ... for a model of `prediction_type` at lam."""
    pred_z, pred_g = prediction_coefficients(prediction_type, lam)
    return StepCoefficients(pred_z, pred_g, mean_z, mean_x, mean_z + mean_x * pred_z, mean_x * pred_g, prev, uncond,
                            noise_std, noise_nu)


def final_coefficients(prediction_type: str, lam: float) -> StepCoefficients:
    """The last step of every sampler: x~ at lam itself, no noise."""
    return _affine_step(prediction_type, lam, 0.0, 1.0)


def _ddpm(lam, lam_next, prediction_type, v, learned_variance):
    # SPEC §2: mu = r (alpha'/alpha) z + (1 - r) alpha' x~, var = ((1 - r) sigma'^2)^(1 - v) ((1 - r) sigma^2)^v
    log_alpha2, log_alpha2_next = log_sigmoid(lam), log_sigmoid(lam_next)
    log_one_minus_r = math.log(-math.expm1(lam - lam_next))
    r = math.exp(lam - lam_next)
    ratio = math.exp(0.5 * (log_alpha2_next - log_alpha2))  # alpha' / alpha
    alpha_next = math.exp(0.5 * log_alpha2_next)
    log_small = log_one_minus_r + log_sigmoid(-lam_next)  # posterior variance (1 - r) sigma'^2: DDPM's beta~
    log_large = log_one_minus_r + log_sigmoid(-lam)  # forward variance (1 - r) sigma^2: DDPM's beta
    if learned_variance:
        # v = (nu + 1) / 2 per element: log std = 0.5 log_small + 0.25 (nu + 1)(log_large - log_small)
        quarter = 0.25 * (log_large - log_small)
        noise_std, noise_nu = math.exp(0.5 * log_small + quarter), quarter
    else:
        noise_std, noise_nu = math.exp(0.5 * ((1.0 - v) * log_small + v * log_large)), 0.0
    return _affine_step(prediction_type, lam, r * ratio, -math.expm1(lam - lam_next) * alpha_next,
                        noise_std=noise_std, noise_nu=noise_nu)


def _ddim(lam, lam_next, prediction_type, eta, cfgpp=False):
    # z' = alpha' x~ + sqrt(sigma'^2 - s^2) eps^ + s n,  eps^ = (z - alpha x~) / sigma,  s^2 = eta^2 (1 - r) sigma'^2
    alpha, sigma = _alpha_sigma(lam)
    alpha_next, sigma_next = _alpha_sigma(lam_next)
    one_minus_r = -math.expm1(lam - lam_next)
    r = math.exp(lam - lam_next)
    s = eta * math.sqrt(one_minus_r) * sigma_next
    k = sigma_next * math.sqrt(1.0 - eta * eta * one_minus_r)  # sqrt(sigma'^2 - s^2)
    # mean_x = alpha' - k alpha / sigma = alpha' (1 - q), q = sqrt(r (1 - eta^2 (1 - r))) near 1 for a small step:
    # 1 - q = (1 - r)(1 + eta^2 r) / (1 + q) without the cancellation
    q = math.sqrt(r * (1.0 - eta * eta * one_minus_r))
    mean_x = alpha_next * one_minus_r * (1.0 + eta * eta * r) / (1.0 + q)
    if not cfgpp:
        return _affine_step(prediction_type, lam, k / sigma, mean_x, noise_std=s)
    # CFG++ (SPEC §7): the direction is the unconditional noise eps^_u = (z - alpha x~_u) / sigma, x~_u = p z + q o_u
    # unclipped: z' = alpha' x~ + (k / sigma)(1 - alpha p) z - (k alpha q / sigma) o_u + s n
    pred_z, pred_g = prediction_coefficients(prediction_type, lam)
    one_minus_alpha_p = {"epsilon": 0.0, "v_prediction": sigma * sigma, "sample": 1.0}[prediction_type]
    return _affine_step(prediction_type, lam, k / sigma * one_minus_alpha_p, alpha_next,
                        uncond=-k * alpha * pred_g / sigma, noise_std=s)


def _dpmpp_2m(lam, lam_next, lam_prev, prediction_type, sde):
    # h in half-log-SNR (DPM-Solver's log(alpha / sigma)); D = (1 + 1/(2 rho)) x~ - (1/(2 rho)) x~_prev,
    # rho = h_prev / h, first order (D = x~) on the first step.
    alpha, sigma = _alpha_sigma(lam)
    alpha_next, sigma_next = _alpha_sigma(lam_next)
    h = 0.5 * (lam_next - lam)
    if sde:  # z' = (sigma'/sigma) e^-h z + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) n
        mean_z = sigma_next / sigma * math.exp(-h)
        gain = -alpha_next * math.expm1(-2.0 * h)
        noise_std = sigma_next * math.sqrt(-math.expm1(-2.0 * h))
    else:  # z' = (sigma'/sigma) z + alpha' (1 - e^-h) D
        mean_z = sigma_next / sigma
        gain = -alpha_next * math.expm1(-h)
        noise_std = 0.0
    if lam_prev is None:
        return _affine_step(prediction_type, lam, mean_z, gain, noise_std=noise_std)
    half_over_rho = 0.5 * h / (0.5 * (lam - lam_prev))  # 1 / (2 rho)
    return _affine_step(prediction_type, lam, mean_z, gain * (1.0 + half_over_rho), prev=-gain * half_over_rho,
                        noise_std=noise_std)


def default_lambdas(steps: int, sampler: str = "ddpm", lambda_min: float | None = None,
                    lambda_max: float | None = None) -> torch.Tensor:
    """The grid cfgfast.sample walks by default for `sampler` (float64 [steps], increasing): the paper's spacing on
    [-20, 20] for "ddpm" and "ddim", even spacing in lambda on [-10, 10] for the DPM-Solver++ samplers; a bound
    given replaces the sampler's."""
    spacing, low, high = DEFAULT_GRID[check_sampler(sampler)]
    return sampling_lambdas(steps, low if lambda_min is None else lambda_min,
                            high if lambda_max is None else lambda_max, spacing)


def check_sampler(sampler) -> str:
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    return sampler


def check_prediction_type(prediction_type) -> str:
    if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
        hint = (" (flow matching is a different process: cfgfast samples diffusion models)"
                if prediction_type == "flow_prediction" else "")
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}{hint}")
    return prediction_type


GUIDANCES = ("cfg", "cfgpp")


def check_guidance(sampler: str, guidance) -> str:
    """"cfg" (the paper's combination, every sampler) or "cfgpp" (CFG++, with "ddim" only)."""
    if not isinstance(guidance, str) or guidance not in GUIDANCES:
        raise ValueError(f"guidance must be one of {list(GUIDANCES)}, got {guidance!r}")
    if guidance == "cfgpp" and sampler != "ddim":
        raise ValueError(f"guidance='cfgpp' (CFG++) is a form of sampler 'ddim' only, got sampler {sampler!r}")
    return guidance


def check_eta(sampler: str, eta) -> float:
    """eta in [0, 1] for "ddim"; the samplers that ignore it take only 0."""
    eta = _checks.unit_interval("eta", eta)
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta is a setting of sampler 'ddim' only (sampler {sampler!r} ignores it), got eta={eta}")
    return eta


def sampler_step(sampler: str, lambdas, t: int, *, prediction_type: str = "epsilon", eta: float = 0.0,
                 v: float = DEFAULT_V, learned_variance: bool = False, guidance: str = "cfg") -> StepCoefficients:
    """The coefficients of step t of `sampler` on the increasing grid `lambdas` (a list of floats): the transition
    lambdas[t] -> lambdas[t + 1], or for t = len(lambdas) - 1 the last step, which returns x~. guidance="cfgpp":
    CFG++'s "ddim" step (SPEC §7), which reads the unconditional output o_u."""
    lam = lambdas[t]
    if t == len(lambdas) - 1:
        return final_coefficients(prediction_type, lam)
    lam_next = lambdas[t + 1]
    if sampler == "ddpm":
        return _ddpm(lam, lam_next, prediction_type, v, learned_variance)
    if sampler == "ddim":
        return _ddim(lam, lam_next, prediction_type, eta, cfgpp=guidance == "cfgpp")
    lam_prev = lambdas[t - 1] if t > 0 else None
    return _dpmpp_2m(lam, lam_next, lam_prev, prediction_type, sde=sampler == "dpmpp_2m_sde")


def step_table(sampler: str, lambdas, *, prediction_type: str = "epsilon", eta: float = 0.0, v: float = DEFAULT_V,
               learned_variance: bool = False, guidance: str = "cfg") -> torch.Tensor:
    """float64 [T, 10]: row t holds the coefficients of step t of `sampler` on the increasing grid `lambdas`
    (T = len(lambdas)); the last row returns x~. Read by cfgfast.guided_step (one row a step) and by
    cfgfast.guided_step_table (the whole table on the device, for CUDA graphs). guidance="cfgpp" (with "ddim"):
    CFG++'s rows, whose step reads the unconditional output at every step, w = 0 included."""
    sampler = check_sampler(sampler)
    prediction_type = check_prediction_type(prediction_type)
    eta = check_eta(sampler, eta)
    v = _checks.unit_interval("v", v)
    learned_variance = _checks.flag("learned_variance", learned_variance)
    guidance = check_guidance(sampler, guidance)
    grid = _checks.increasing_grid("lambdas", lambdas)
    rows = [sampler_step(sampler, grid, t, prediction_type=prediction_type, eta=eta, v=v,
                         learned_variance=learned_variance, guidance=guidance).as_list() for t in range(len(grid))]
    return torch.tensor(rows, dtype=torch.float64)
