"""Speed of one reverse step (SPEC §2) against the eager PyTorch step and two floors, in one run.

    pytest benchmarks/ --benchmark-only                               # the timings and the ratio table
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable      # CI smoke run, one small size

Variants per size: the fused step (in-kernel noise, into out=; allocating; with noise=; bfloat16 eps at
the small size), the eager step as users write it (utils.eager_step: the paper's formulas in torch ops,
noise from torch.randn_like; checked against the reference twin of cfgfast.reference), the reference twin
itself with the same noise, that eager step under torch.compile (--benchmark-only runs; compiling is
too slow for the CI smoke run), diffusers' DDPMScheduler.step configured to the same transition (where
diffusers is installed), the reference backend (spec noise in plain torch, small size only), and the
floors: drawing the noise alone (cfgfast and torch.randn) and moving the bytes. The other samplers' steps
are in test_sampler_step_speed.py.

The copy floor is two out.copy_(z): a copy reads one float32 array and writes one, so two copies move
the four float32 arrays the step must (read z, eps_cond, eps_uncond; write z'), with the same
write-allocate behaviour on out.
"""

from __future__ import annotations

import math

import pytest
import torch

import cfgfast
from cfgfast.reference import guided_step_reference

from .utils import (
    COMPILED_FALLBACK_LABEL,
    COMPILED_LABEL,
    COPY_LABEL,
    DEVICES,
    DIFFUSERS_LABEL,
    EAGER_LABEL,
    FAST_BACKENDS,
    RANDN_LABEL,
    REFERENCE_LABEL,
    SEED,
    SIZES,
    SMALL_SIZE,
    STEPS,
    TWIN_LABEL,
    StepInputs,
    eager_step,
    fused_label,
    noise_label,
    require_backend,
    require_device,
    step_bytes,
)


def _fused_cases():
    for size in SIZES:
        modes = ("out", "no_out", "noise_arg") + (("bf16_out",) if size == SMALL_SIZE else ())
        for mode in modes:
            yield pytest.param(size, mode, id=f"{size}-{mode}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("size", "mode"), list(_fused_cases()))
def test_fused_step(step_benchmark, step_inputs, size, mode, backend):
    device = require_backend(backend)
    eps_dtype = torch.bfloat16 if mode == "bf16_out" else torch.float32
    x = step_inputs(size, eps_dtype, device)
    noise = x.noise if mode == "noise_arg" else None
    out = None if mode == "no_out" else torch.empty_like(x.z)

    def step():
        return cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v, noise=noise,
                                    seed=SEED, step=x.step, backend=backend, out=out)

    # what is timed is the step: its first two samples against the reference backend (the noise is per sample
    # index, so two samples alone are the same as two of the batch)
    expected = cfgfast.reverse_step(x.z[:2], x.eps_cond[:2], x.eps_uncond[:2], x.lam, x.lam_next, x.w[:2], x.v,
                                    noise=None if noise is None else noise[:2], seed=SEED, step=x.step,
                                    backend="reference")
    torch.testing.assert_close(step()[:2], expected, rtol=1e-5, atol=1e-5)
    step_benchmark(step, device=device, size=size, label=fused_label(backend, mode),
                   bytes_moved=step_bytes(x.z.shape, eps_dtype, explicit_noise=noise is not None))


def _twin_step(x: StepInputs, noise):
    """The reference twin's z' for the benchmarked "ddpm" row with the given noise."""
    weights = torch.stack([1 + x.w, x.w], 1)
    return guided_step_reference(x.z, x.eps_cond, x.eps_uncond, weights, x.coefficients, noise)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_eager_step(step_benchmark, step_inputs, size, device):
    """The bar: the step's formulas in plain torch ops with torch.randn noise, as users write it."""
    require_device(device)
    x = step_inputs(size, torch.float32, device)
    torch.testing.assert_close(eager_step(x.z, x.eps_cond, x.eps_uncond, x.w, x.coefficients, x.noise),
                               _twin_step(x, x.noise), rtol=1e-5, atol=1e-5, msg="eager_step is not the reference's")

    def step():
        return eager_step(x.z, x.eps_cond, x.eps_uncond, x.w, x.coefficients, torch.randn_like(x.z))

    step_benchmark(step, device=device, size=size, label=EAGER_LABEL,
                   bytes_moved=step_bytes(x.z.shape, explicit_noise=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_reference_twin_step(step_benchmark, step_inputs, size, device):
    """The reference twin with torch.randn noise: the kernels' general order in torch ops (x~ formed and the
    unconditional term added where they are not needed), the price of that generality beside the eager step."""
    require_device(device)
    x = step_inputs(size, torch.float32, device)

    def step():
        return _twin_step(x, torch.randn_like(x.z))

    step_benchmark(step, device=device, size=size, label=TWIN_LABEL,
                   bytes_moved=step_bytes(x.z.shape, explicit_noise=True))


def _eager_step(x: StepInputs):
    def step(z, eps_cond, eps_uncond, w):
        return eager_step(z, eps_cond, eps_uncond, w, x.coefficients, torch.randn_like(z))

    return step


@pytest.mark.parametrize("random", ["inductor", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_compiled_eager_step(step_benchmark, step_inputs, request, size, device, random):
    """The eager step under torch.compile (default inductor backend, static shapes), compiled once per
    size before timing. random="inductor" is the default: randn_like becomes inductor's own generator
    (same distribution, other numbers), which on CPU is several times slower than torch.randn and costs
    more than the step's arithmetic; random="fallback" compiles with fallback_random=True, so the noise
    is torch.randn's and only the arithmetic is fused."""
    require_device(device)
    if request.config.getoption("benchmark_disable"):
        pytest.skip("torch.compile takes 5-10 s per size on a CPU, too slow for the --benchmark-disable smoke run "
                    "(tests/test_compile.py covers compiling cfgfast's ops)")
    if device == "cuda":
        pytest.importorskip("triton", reason="inductor needs triton on CUDA")
    x = step_inputs(size, torch.float32, device)
    compiled = torch.compile(_eager_step(x), dynamic=False, options={"fallback_random": random == "fallback"})
    compiled(x.z, x.eps_cond, x.eps_uncond, x.w)  # the compile, outside the timed calls

    def step():
        return compiled(x.z, x.eps_cond, x.eps_uncond, x.w)

    label = COMPILED_LABEL if random == "inductor" else COMPILED_FALLBACK_LABEL
    step_benchmark(step, device=device, size=size, label=label,
                   bytes_moved=step_bytes(x.z.shape, explicit_noise=True))


def _ddpm_scheduler(diffusers, x: StepInputs):
    """A DDPMScheduler over cfgfast's STEPS-step grid: timestep k has alphas_cumprod = sigmoid(lam_(STEPS-1-k))
    (diffusers counts down to the clean end, the grid counts up), so the step from timestep
    STEPS - 1 - x.step to the one below is our lam -> lam_next."""
    log_alpha2 = torch.nn.functional.logsigmoid(cfgfast.sampling_lambdas(STEPS).flip(0))  # float64, k = 0 clean
    # beta_k = 1 - alphabar_k / alphabar_(k-1), and beta_0 = 1 - alphabar_0: formed in float64, stored float32
    betas = -torch.expm1(torch.diff(log_alpha2, prepend=torch.zeros(1, dtype=torch.float64)))
    return diffusers.DDPMScheduler(num_train_timesteps=STEPS, trained_betas=betas.tolist(),
                                   variance_type="learned_range", clip_sample=False, prediction_type="epsilon")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_diffusers_step(step_benchmark, step_inputs, size, device):
    """Peer: diffusers' DDPMScheduler.step for the benchmarked transition, timed alone.

    Equivalent: the mean and the variance. DDPM's alphabar_t is our alpha^2 = sigmoid(lam), its beta_t
    = 1 - alphabar_t / alphabar_(t-1) equals the paper's sigma^2_(lam|lam') = (1 - e^(lam - lam')) sigma^2,
    its posterior variance the paper's sigma~^2, and learned_range with the model's variance output
    fixed at 2v - 1 interpolates their logs with weight v: the paper's step. The step is checked
    against the reference twin with diffusers' own noise before it is timed (float32 tolerance:
    diffusers forms alphas_cumprod by a float32 cumprod of the betas).
    Not equivalent: the guided eps (paper Eq. 6) is computed in torch beforehand, untimed, so diffusers
    is spared the read of two eps tensors; in return it reads a model output of 2C channels (eps and
    the constant variance channel, as a learned_range model returns them), takes an elementwise log/exp
    of that variance channel, draws its noise with torch.randn (not cfgfast's Philox noise), allocates
    its outputs (prev_sample and pred_original_sample; no out=), and forms its coefficients from float32
    tensors. bytes_moved is the eager step's, so GB/s compare the same work, not the bytes diffusers moves.
    """
    require_device(device)
    try:
        import diffusers
    except ImportError as error:  # not installed, or an install that does not fit this torch
        pytest.skip(f"diffusers cannot be imported ({error}); pip install diffusers to time it")
    x = step_inputs(size, torch.float32, device)
    scheduler = _ddpm_scheduler(diffusers, x)
    timestep = STEPS - 1 - x.step
    w = x.w.reshape(-1, 1, 1, 1)
    eps = (1 + w) * x.eps_cond - w * x.eps_uncond  # paper Eq. 6, outside the timed call
    model_output = torch.cat([eps, torch.full_like(eps, 2 * x.v - 1)], dim=1)

    generator = torch.Generator(device).manual_seed(SEED)
    got = scheduler.step(model_output, timestep, x.z, generator=generator).prev_sample
    noise = torch.randn(x.z.shape, generator=torch.Generator(device).manual_seed(SEED), device=device)
    want = _twin_step(x, noise)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg="the diffusers scheduler is not our step")

    def step():
        return scheduler.step(model_output, timestep, x.z).prev_sample

    step_benchmark(step, device=device, size=size, label=DIFFUSERS_LABEL,
                   bytes_moved=step_bytes(x.z.shape, explicit_noise=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_reference_backend(step_benchmark, step_inputs, size, device):
    """The spec's noise in plain torch (int64 Philox): slower than the eager step, and not the bar."""
    require_device(device)
    x = step_inputs(size, torch.float32, device)
    out = torch.empty_like(x.z)

    def step():
        return cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v, seed=SEED,
                                    step=x.step, backend="reference", out=out)

    step_benchmark(step, device=device, size=size, label=REFERENCE_LABEL, bytes_moved=step_bytes(x.z.shape))


@pytest.mark.parametrize("mode", ["out", "alloc"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("size", SIZES)
def test_noise(step_benchmark, size, backend, mode):
    """Floor: drawing the step's noise alone, in place (out=, like the fused step it bounds) and allocating."""
    device = require_backend(backend)
    shape = SIZES[size]
    out = torch.empty(shape, dtype=torch.float32, device=device) if mode == "out" else None

    def draw():
        return cfgfast.normal_noise(shape, SEED, 0, device=device, backend=backend, out=out)

    expected = cfgfast.normal_noise((2,) + shape[1:], SEED, 0, device=device, backend="reference")
    torch.testing.assert_close(draw()[:2], expected, rtol=1e-6, atol=1e-12)
    step_benchmark(draw, device=device, size=size, label=noise_label(backend, mode),
                   bytes_moved=4 * math.prod(shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_randn(step_benchmark, size, device):
    """torch's own normals of the same size, in place: what cfgfast's noise is compared with."""
    require_device(device)
    out = torch.empty(SIZES[size], dtype=torch.float32, device=device)

    def draw():
        return torch.randn(out.shape, out=out)

    step_benchmark(draw, device=device, size=size, label=RANDN_LABEL, bytes_moved=4 * out.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_copy_floor(step_benchmark, step_inputs, size, device):
    """Floor: moving the bytes. Two copies of z move what the float32 step must (see the module doc)."""
    require_device(device)
    z = step_inputs(size, torch.float32, device).z
    out = torch.empty_like(z)

    def copy_twice():
        out.copy_(z)
        return out.copy_(z)

    step_benchmark(copy_twice, device=device, size=size, label=COPY_LABEL, bytes_moved=2 * 2 * 4 * z.numel())
