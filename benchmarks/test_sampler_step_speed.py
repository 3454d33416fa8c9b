"""Speed of one guided step per sampler (SPEC §6) against the eager dpmpp_2m step users compose and the copy
floor of the same bytes, in one run.

    pytest benchmarks/test_step_speed.py benchmarks/test_sampler_step_speed.py --benchmark-only
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable      # CI smoke run, one small size

Variants per size (SAMPLER_SIZES): cfgfast.guided_step with row STEPS // 2 of each sampler's step_table on its
default grid, into out= ("ddpm"; "ddim" at eta 0 and "dpmpp_2m", which draw no noise; "dpmpp_2m_sde"; the
multistep ones with their x~_prev state, read and overwritten each call); the eager dpmpp_2m step as users
compose it (CFG in torch, then diffusers' DPMSolverMultistepScheduler.step, second order); and the copy floor of
a multistep step's bytes, three out.copy_(z) (test_step_speed.py times the two-copy floor of the others' bytes).
The summary prints ddpm / each sampler, eager dpmpp_2m / fused dpmpp_2m and each step / the copy floor of its
bytes; the GB/s column counts per sampler z, the two predictions and z' (plus x~_prev read and written).
"""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.samplers import MULTISTEP

from .utils import (
    COPY_MULTISTEP_LABEL,
    DEVICES,
    DPM_DIFFUSERS_LABEL,
    FAST_BACKENDS,
    SAMPLER_CASES,
    SAMPLER_SIZES,
    SEED,
    STEPS,
    require_backend,
    require_device,
    sampler_label,
    sampler_row,
    step_bytes,
)

DPM_STEPS = 25  # a usual DPM-Solver++ step count; its middle step is the one timed
DPM_TIMED = DPM_STEPS // 2


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("sampler", "eta"), SAMPLER_CASES, ids=[s for s, _ in SAMPLER_CASES])
@pytest.mark.parametrize("size", SAMPLER_SIZES)
def test_sampler_step(step_benchmark, step_inputs, size, sampler, eta, backend):
    device = require_backend(backend)
    x = step_inputs(size, torch.float32, device)
    row = sampler_row(sampler, eta)
    # x~ of the previous step: its values do not change the time, and each call overwrites it with its own x~
    x_prev = x.noise.clone() if sampler in MULTISTEP else None
    out = torch.empty_like(x.z)

    def step():
        return cfgfast.guided_step(x.z, x.eps_cond, x.eps_uncond, row, x.w, x_prev=x_prev, seed=SEED,
                                   step=STEPS // 2, backend=backend, out=out)

    # what is timed is the step: its first two samples against the reference backend (z' and the x~ it leaves)
    two = slice(0, 2)
    prev_two = None if x_prev is None else x_prev[two].clone()
    expected = cfgfast.guided_step(x.z[two], x.eps_cond[two], x.eps_uncond[two], row, x.w[two], x_prev=prev_two,
                                   seed=SEED, step=STEPS // 2, backend="reference")
    torch.testing.assert_close(step()[two], expected, rtol=1e-5, atol=1e-5)
    if x_prev is not None:
        torch.testing.assert_close(x_prev[two], prev_two, rtol=1e-5, atol=1e-5)
    step_benchmark(step, device=device, size=size, label=sampler_label(backend, sampler, eta),
                   bytes_moved=step_bytes(x.z.shape, sampler=sampler))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SAMPLER_SIZES)
def test_diffusers_dpmpp_2m_step(step_benchmark, step_inputs, size, device):
    """The eager dpmpp_2m step users compose: eps = eps_u + s (eps_c - eps_u) with s = 1 + w in torch, then
    diffusers' DPMSolverMultistepScheduler.step (dpmsolver++, order 2, midpoint) at the middle of DPM_STEPS steps,
    after a warm-up step, so that its model_outputs hold the previous x0 and the timed step is second order.

    Equivalent: checked before timing against cfgfast's "dpmpp_2m" row of the same transition (diffusers' grid,
    lam = -2 log of its sigmas), with diffusers' own previous x0 as x~_prev. Each timed call is that same step:
    the scheduler's step index and its previous output are put back first (an attribute and a list item).
    Not equivalent: diffusers allocates its outputs (the guided eps, x0, z'), keeps x0 in its list instead of
    writing x~_prev in place, and forms its coefficients from float32 tensors. bytes_moved is the fused step's.
    """
    require_device(device)
    try:
        import diffusers
    except ImportError as error:  # not installed, or an install that does not fit this torch
        pytest.skip(f"diffusers cannot be imported ({error}); pip install diffusers to time it")
    x = step_inputs(size, torch.float32, device)
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                      solver_type="midpoint", final_sigmas_type="zero",
                                                      lower_order_final=False)
    scheduler.set_timesteps(DPM_STEPS, device=device)
    scheduler.step(x.noise, scheduler.timesteps[DPM_TIMED - 1], x.z)  # the warm-up: a first-order step
    x0_prev = scheduler.model_outputs[-1]
    timestep = scheduler.timesteps[DPM_TIMED]
    s = (1 + x.w).reshape((-1,) + (1,) * (x.z.dim() - 1))

    def step():
        scheduler._step_index = DPM_TIMED
        scheduler.model_outputs[-1] = x0_prev
        eps = x.eps_uncond + s * (x.eps_cond - x.eps_uncond)
        return scheduler.step(eps, timestep, x.z).prev_sample

    lambdas = (-2.0 * torch.log(scheduler.sigmas[:-1].double())).tolist()  # k-diffusion sigma = sigma / alpha
    row = cfgfast.step_table("dpmpp_2m", lambdas)[DPM_TIMED]
    want = cfgfast.guided_step(x.z, x.eps_cond, x.eps_uncond, row, x.w, x_prev=x0_prev.clone(), backend="reference")
    torch.testing.assert_close(step(), want, rtol=1e-4, atol=1e-4, msg="the diffusers step is not cfgfast's dpmpp_2m")
    step_benchmark(step, device=device, size=size, label=DPM_DIFFUSERS_LABEL,
                   bytes_moved=step_bytes(x.z.shape, sampler="dpmpp_2m"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SAMPLER_SIZES)
def test_copy_floor_multistep(step_benchmark, step_inputs, size, device):
    """Floor: moving a multistep step's bytes (z, two predictions, x~_prev read; z', x~ written): three copies."""
    require_device(device)
    z = step_inputs(size, torch.float32, device).z
    out = torch.empty_like(z)

    def copy_thrice():
        out.copy_(z)
        out.copy_(z)
        return out.copy_(z)

    step_benchmark(copy_thrice, device=device, size=size, label=COPY_MULTISTEP_LABEL,
                   bytes_moved=3 * 2 * 4 * z.numel())
