"""Speed of one reverse step (SPEC §2) against the eager PyTorch step and two floors, in one run.

    pytest benchmarks/ --benchmark-only                               # the timings and the ratio table
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable      # CI smoke run, one small size

Variants per size: the fused step (in-kernel noise, into out=; allocating; with noise=; bfloat16 eps at
the small size), the eager step as users write it (the reference twin imported from cfgfast.reference,
noise from torch.randn_like), the reference backend (spec noise in plain torch, small size only),
and the floors: drawing the noise alone (cfgfast and torch.randn) and moving the bytes.

The copy floor is two out.copy_(z): a copy reads one float32 array and writes one, so two copies move
the four float32 arrays the step must (read z, eps_cond, eps_uncond; write z'), with the same
write-allocate behaviour on out.
"""

from __future__ import annotations

import math

import pytest
import torch

import cfgfast
from cfgfast.reference import reverse_step_reference

from .utils import (
    COPY_LABEL,
    DEVICES,
    EAGER_LABEL,
    FAST_BACKENDS,
    RANDN_LABEL,
    REFERENCE_LABEL,
    SEED,
    SIZES,
    SMALL_SIZE,
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

    step_benchmark(step, device=device, size=size, label=fused_label(backend, mode),
                   bytes_moved=step_bytes(x.z.shape, eps_dtype, explicit_noise=noise is not None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_eager_step(step_benchmark, step_inputs, size, device):
    """The bar: the step's formulas in plain torch ops with torch.randn noise, as users write it today."""
    require_device(device)
    x = step_inputs(size, torch.float32, device)

    def step():
        return reverse_step_reference(x.z, x.eps_cond, x.eps_uncond, x.w, x.coefficients, torch.randn_like(x.z))

    step_benchmark(step, device=device, size=size, label=EAGER_LABEL,
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
