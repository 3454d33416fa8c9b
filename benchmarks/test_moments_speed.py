"""Speed of the per-sample moments (cfgfast.moments.sample_moments) beside the fused step they precede, in one run.

    OMP_NUM_THREADS=1 pytest benchmarks/test_moments_speed.py --benchmark-only        # the timings, side by side
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/test_moments_speed.py --benchmark-disable  # CI smoke run, one small size

Variants at SMALL_SIZE (256x3x64x64): the moments as cfgfast.guidance takes them, the inputs' own (identity
combos): guidance rescale's of o_c, o_u (float32 and bfloat16 predictions) and APG's of z, o_c, o_u; and the
general form, 4 inputs z, o_c, o_u and a momentum buffer into 2 vectors Delta and x~_c, on each fast backend; the
torch reference of the rescale's moments; and the plain fused step (cfgfast.guided_step, "ddpm" row) on the same
inputs. The summary prints each median: the moments / the step is the ratio to read. The GB/s column counts the
bytes of the inputs read (the step's: z, o_c, o_u read and z' written).
"""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.moments import sample_moments, sample_moments_reference

from .utils import (
    DEVICES,
    FAST_BACKENDS,
    SEED,
    SMALL_SIZE,
    STEPS,
    require_backend,
    require_device,
    sampler_label,
    sampler_row,
    step_bytes,
)

W_COND, W_UNCOND = 4.5, 3.5  # g = w_c o_c - w_u o_u
IDENTITY_2 = [[1.0, 0.0], [0.0, 1.0]]  # rescale's (o_c, o_u)
IDENTITY_3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # APG's (z, o_c, o_u)
GENERAL = [[0.0, W_COND - 1.0, -(W_COND - 1.0), 0.9], [1.3, -0.7, 0.0, 0.0]]  # (z, o_c, o_u, buffer) -> Delta, x~_c
MOMENTS_BACKENDS = tuple(b for b in FAST_BACKENDS if b in ("cpu", "triton"))


def moments_label(backend: str, case: str) -> str:
    return {
        "rescale": f"moments {backend}, 2 inputs (rescale)",
        "rescale_bf16": f"moments {backend}, 2 bf16 inputs (rescale)",
        "apg": f"moments {backend}, 3 inputs (APG)",
        "general": f"moments {backend}, 4 inputs 2 vectors",
    }[case]


REFERENCE_MOMENTS_LABEL = "moments torch reference, 2 inputs (rescale)"


def _case_inputs(x, case: str) -> tuple[list[torch.Tensor], list[list[float]]]:
    if case == "general":
        return [x.z, x.eps_cond, x.eps_uncond, x.noise], GENERAL
    if case == "apg":
        return [x.z, x.eps_cond, x.eps_uncond], IDENTITY_3
    return [x.eps_cond, x.eps_uncond], IDENTITY_2


def _bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs)


@pytest.mark.parametrize("backend", MOMENTS_BACKENDS)
@pytest.mark.parametrize("case", ["rescale", "rescale_bf16", "apg", "general"])
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_moments(step_benchmark, step_inputs, size, case, backend):
    device = require_backend(backend)
    x = step_inputs(size, torch.bfloat16 if case == "rescale_bf16" else torch.float32, device)
    inputs, combos = _case_inputs(x, case)

    def moments():
        return sample_moments(inputs, combos, backend=backend)

    # what is timed are the moments: its first two samples against the reference
    torch.testing.assert_close(moments()[:2], sample_moments_reference([t[:2] for t in inputs], combos),
                               rtol=1e-12, atol=1e-9)
    step_benchmark(moments, device=device, size=size, label=moments_label(backend, case), bytes_moved=_bytes(inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_moments_reference(step_benchmark, step_inputs, size, device):
    require_device(device)
    x = step_inputs(size, torch.float32, device)
    inputs, combos = _case_inputs(x, "rescale")
    step_benchmark(lambda: sample_moments(inputs, combos, backend="reference"), device=device, size=size,
                   label=REFERENCE_MOMENTS_LABEL, bytes_moved=_bytes(inputs))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("size", [SMALL_SIZE])
def test_step_beside_the_moments(step_benchmark, step_inputs, size, backend):
    """The plain fused step of the same inputs ("ddpm" row, into out=), as test_sampler_step_speed times it."""
    device = require_backend(backend)
    x = step_inputs(size, torch.float32, device)
    row, out = sampler_row("ddpm"), torch.empty_like(x.z)

    def step():
        return cfgfast.guided_step(x.z, x.eps_cond, x.eps_uncond, row, x.w, seed=SEED, step=STEPS // 2,
                                   backend=backend, out=out)

    step_benchmark(step, device=device, size=size, label=sampler_label(backend, "ddpm"),
                   bytes_moved=step_bytes(x.z.shape))
