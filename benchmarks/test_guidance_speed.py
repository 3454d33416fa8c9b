"""Speed of one guided step with SPEC §7's guidance methods beside the plain fused step and the eager steps users
compose with diffusers, in one run.

    OMP_NUM_THREADS=1 pytest benchmarks/test_guidance_speed.py --benchmark-only        # the timings, side by side
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/test_guidance_speed.py --benchmark-disable  # CI smoke run, one small size

Variants at SMALL_SIZE (256x3x64x64), every one a "ddim" step (eta 0) of the same transition, except thresholding's,
a "ddpm" step (its diffusers peer is DDPMScheduler):
- cfgfast: the plain fused step; with guidance_rescale 0.7 (the moments, then the fused step on scaled weights);
  with APG, norm threshold 5, without momentum (the moments of x~_c and Delta, then the fused step on per-sample
  weights with a multiple of z) and with momentum -0.5 (the running value updated first, then the same); ddpm
  plain and with dynamic thresholding (0.995, 1.5) (x~ formed, its quantile from one topk per sample). On the cpu
  backend rescale and APG run each sample through every stage in one task; "whole-batch passes" times them composed
  of one pass over the batch a stage, as the other backends run them;
- eager, as users write them: torch CFG + diffusers' rescale_noise_cfg + DDIMScheduler.step; diffusers'
  normalized_guidance (with its MomentumBuffer, on the x-predictions) + DDIMScheduler.step on x0
  (prediction_type "sample"); torch CFG + DDPMScheduler(thresholding=True).step.
The summary prints each median: a method's fused step / the plain fused step, and the eager step / the fused one,
are the ratios to read.
"""

from __future__ import annotations

import pytest
import torch

from cfgfast.backends import choose
from cfgfast.guidance import APG, Guide, given_x_rows
from cfgfast.step import guidance_weights

from .utils import DEVICES, FAST_BACKENDS, SEED, SMALL_SIZE, require_backend, require_device, step_bytes

DIFFUSERS_STEPS = 50
TIMED = DIFFUSERS_STEPS // 2
RESCALE = 0.7
APG_SETTINGS = APG(eta_parallel=0.0, norm_threshold=5.0, momentum=-0.5)
APG_NO_MOMENTUM = APG(eta_parallel=0.0, norm_threshold=5.0)
THRESHOLD = (0.995, 1.5)
METHODS = ("plain", "rescale", "apg_no_momentum", "apg", "threshold")
COMPOSED = ("rescale", "apg_no_momentum", "apg")  # also timed as whole-batch passes where the backend fuses them


def guidance_label(backend: str, method: str) -> str:
    if method.endswith(" passes"):
        return guidance_label(backend, method.removesuffix(" passes")) + ", whole-batch passes"
    return {"plain": f"cfgfast {backend}: ddim step", "rescale": f"cfgfast {backend}: ddim step + rescale 0.7",
            "apg_no_momentum": f"cfgfast {backend}: ddim step + APG, no momentum",
            "apg": f"cfgfast {backend}: ddim step + APG, momentum", "plain_ddpm": f"cfgfast {backend}: ddpm step",
            "threshold": f"cfgfast {backend}: ddpm step + threshold"}[method]


EAGER_LABELS = {"rescale": "eager: torch CFG + rescale_noise_cfg + DDIMScheduler.step",
                "apg": "eager: normalized_guidance + DDIMScheduler.step (x0)",
                "threshold": "eager: torch CFG + DDPMScheduler(thresholding).step"}


def _scheduler(kind: str, device, **config):
    try:
        import diffusers
    except ImportError as error:
        pytest.skip(f"diffusers cannot be imported ({error}); pip install diffusers to time it")
    scheduler = getattr(diffusers, kind)(clip_sample=False, **config)
    scheduler.set_timesteps(DIFFUSERS_STEPS, device=device)
    return scheduler


def _rows(scheduler, sampler: str):
    """cfgfast's rows of the scheduler's transition TIMED -> TIMED + 1 (its lambdas), and their given-x~ form."""
    import cfgfast

    alphas = scheduler.alphas_cumprod.double()
    timesteps = scheduler.timesteps.cpu()
    lams = [float(torch.log(alphas[t] / (1 - alphas[t]))) for t in timesteps[TIMED:TIMED + 2]]
    table = cfgfast.step_table(sampler, lams, v=0.0) if sampler == "ddpm" else cfgfast.step_table(sampler, lams)
    return table[0].tolist(), given_x_rows(table)[0].tolist()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("method", METHODS + ("plain_ddpm",) + tuple(f"{m} passes" for m in COMPOSED))
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_guided_method_step(step_benchmark, step_inputs, size, method, backend):
    device = require_backend(backend)
    label = guidance_label(backend, method)
    per_sample = not method.endswith(" passes")
    method = method.removesuffix(" passes")
    if not per_sample and not choose(backend, torch.device(device)).per_sample_guidance:
        pytest.skip(f"backend {backend!r} runs the methods as whole-batch passes only: timed as {method!r}")
    x = step_inputs(size, torch.float32, device)
    sampler = "ddpm" if method in ("threshold", "plain_ddpm") else "ddim"
    kind = "DDPMScheduler" if sampler == "ddpm" else "DDIMScheduler"
    row, row_x = _rows(_scheduler(kind, "cpu"), sampler)
    stepper = choose(backend, x.z.device)
    weights = guidance_weights(x.w)
    buffer = torch.zeros_like(x.z) if method == "apg" else None
    settings = {"apg": APG_SETTINGS, "apg_no_momentum": APG_NO_MOMENTUM}.get(method, "cfg")
    guide = Guide(settings, RESCALE if method == "rescale" else 0.0,
                  THRESHOLD if method == "threshold" else None, None, buffer, per_sample=per_sample)
    out = torch.empty_like(x.z)

    def step():
        guide.step(stepper, out, x.z, x.eps_cond, x.eps_uncond, weights, None, None, None, row, row_x, SEED, TIMED, 0,
                   True)
        return out

    step_benchmark(step, device=device, size=size, label=label, bytes_moved=step_bytes(x.z.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ("rescale", "apg", "threshold"))
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_eager_method_step(step_benchmark, step_inputs, size, method, device):
    """The eager step of each method, checked before timing against cfgfast's reference backend on the first two
    samples (the same transition of the scheduler's grid; thresholding's DDPMScheduler draws its own noise: both
    steps take the same noise there)."""
    require_device(device)
    x = step_inputs(size, torch.float32, device)
    per_sample = (-1,) + (1,) * (x.z.dim() - 1)
    s = (1 + x.w).reshape(per_sample)
    if method == "rescale":
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        scheduler = _scheduler("DDIMScheduler", device, set_alpha_to_one=True)
        timestep = scheduler.timesteps[TIMED]

        def step():
            eps = x.eps_uncond + s * (x.eps_cond - x.eps_uncond)
            eps = rescale_noise_cfg(eps, x.eps_cond, guidance_rescale=RESCALE)
            return scheduler.step(eps, timestep, x.z).prev_sample
    elif method == "apg":
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

        scheduler = _scheduler("DDIMScheduler", device, set_alpha_to_one=True, prediction_type="sample")
        timestep = scheduler.timesteps[TIMED]
        alpha_bar = scheduler.alphas_cumprod[timestep.cpu()].to(device)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        buffer = MomentumBuffer(APG_SETTINGS.momentum)

        def step():
            buffer.running_average = 0  # each call the first guided step, as cfgfast's below
            x_c, x_u = (x.z - sigma * x.eps_cond) / alpha, (x.z - sigma * x.eps_uncond) / alpha
            x0 = normalized_guidance(x_c, x_u, x.w.reshape(per_sample), buffer, eta=APG_SETTINGS.eta_parallel,
                                     norm_threshold=APG_SETTINGS.norm_threshold, use_original_formulation=True)
            return scheduler.step(x0, timestep, x.z).prev_sample
    else:
        from diffusers.schedulers import scheduling_ddpm

        scheduler = _scheduler("DDPMScheduler", device, variance_type="fixed_small", thresholding=True,
                               dynamic_thresholding_ratio=THRESHOLD[0], sample_max_value=THRESHOLD[1])
        timestep = scheduler.timesteps[TIMED]
        scheduling_ddpm_randn = scheduling_ddpm.randn_tensor

        def step():
            eps = x.eps_uncond + s * (x.eps_cond - x.eps_uncond)
            scheduler._step_index = None
            return scheduler.step(eps, timestep, x.z).prev_sample

    # the same transition through cfgfast's reference backend, on the first two samples
    two = slice(0, 2)
    sampler = "ddpm" if method == "threshold" else "ddim"
    row, row_x = _rows(scheduler, sampler)
    guide = Guide(APG_SETTINGS if method == "apg" else "cfg", RESCALE if method == "rescale" else 0.0,
                  THRESHOLD if method == "threshold" else None, None,
                  torch.zeros_like(x.z[two]) if method == "apg" else None)
    want = torch.empty_like(x.z[two])
    noise = x.noise[two] if method == "threshold" else None
    guide.step(choose("reference", x.z.device), want, x.z[two], x.eps_cond[two], x.eps_uncond[two],
               guidance_weights(x.w[two]), None, None, noise, row, row_x, SEED, TIMED, 0, True)
    if method == "threshold":
        scheduling_ddpm.randn_tensor = lambda *a, **k: x.noise
        try:
            got = step()
        finally:
            scheduling_ddpm.randn_tensor = scheduling_ddpm_randn
    else:
        got = step()
    torch.testing.assert_close(got[two], want, rtol=1e-4, atol=1e-4, msg=f"the eager {method} step is not cfgfast's")
    step_benchmark(step, device=device, size=size, label=EAGER_LABELS[method], bytes_moved=step_bytes(x.z.shape))
