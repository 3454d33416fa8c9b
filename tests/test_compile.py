"""torch.compile(fullgraph=True) traces through reverse_step and normal_noise (fake kernels, no graph
breaks) and gives what eager mode gives."""

from __future__ import annotations

import pytest
import torch

import cfgfast


@pytest.mark.needs_extension
def test_compiled_step_equals_eager():
    z = torch.randn(4, 3, 8, 8)
    eps_cond, eps_uncond, w = torch.randn_like(z), torch.randn_like(z).to(torch.bfloat16), torch.rand(4)

    def f(z, eps_cond, eps_uncond, w):
        z = cfgfast.reverse_step(z, eps_cond, eps_uncond.float(), -1.0, -0.5, w, 0.3, seed=3, step=2)
        return z + cfgfast.normal_noise(z.shape, 3, step=9)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(z, eps_cond, eps_uncond, w), f(z, eps_cond, eps_uncond, w), rtol=0, atol=0)
