"""Host time of one public step call on tiny tensors (z [2, 4]): the Python and the dispatch between the call and the
kernel, which a sampling loop of a small model pays at every step.

    pytest benchmarks/test_host_speed.py --benchmark-only

Variants per backend: cfgfast.reverse_step and cfgfast.guided_step into out= (the same w, lam and coefficient row at
every call, as in a loop), and for the compiled backends the floor: the bare op torch.ops.cfgfast.guided_step_ with
its arguments made once (the dispatcher, the C++ checks and the kernel).
"""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.step import guidance_weights

from .utils import (
    HOST_SHAPE,
    HOST_SIZE,
    SEED,
    host_label,
    make_step_inputs,
    require_backend,
    step_bytes,
)

CASES = [("cpu", "reverse_step"), ("cpu", "guided_step"), ("cpu", "op"),
         ("reference", "reverse_step"), ("reference", "guided_step"),
         ("cuda", "reverse_step"), ("cuda", "guided_step"), ("cuda", "op"),
         ("triton", "reverse_step"), ("triton", "guided_step")]


@pytest.mark.parametrize(("backend", "call"), CASES)
def test_host_overhead(step_benchmark, backend, call):
    device = "cpu" if backend == "reference" else require_backend(backend)
    x = make_step_inputs(HOST_SHAPE, device=device)
    out = torch.empty_like(x.z)
    row = cfgfast.step_table("ddpm", [x.lam, x.lam_next], v=x.v)[0].to(device)
    if call == "reverse_step":
        def step():
            return cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v, seed=SEED,
                                        step=x.step, backend=backend, out=out)
    elif call == "guided_step":
        def step():
            return cfgfast.guided_step(x.z, x.eps_cond, x.eps_uncond, row, x.w, seed=SEED, step=x.step,
                                       backend=backend, out=out)
    else:
        op, weights, coef = torch.ops.cfgfast.guided_step_, guidance_weights(x.w), row.tolist()

        def step():
            op(out, x.z, x.eps_cond, x.eps_uncond, weights, None, None, None, coef, SEED, x.step, 0, None)
            return out

    # what is timed is the step: its result against the reference backend's
    expected = cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v, seed=SEED, step=x.step,
                                    backend="reference")
    torch.testing.assert_close(step(), expected, rtol=1e-5, atol=1e-5)
    step_benchmark(step, device=device, size=HOST_SIZE, label=host_label(backend, call),
                   bytes_moved=step_bytes(HOST_SHAPE), shape=HOST_SHAPE)
