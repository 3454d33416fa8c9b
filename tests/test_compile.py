"""torch.compile(fullgraph=True) traces through reverse_step, guided_step and normal_noise (fake kernels, no graph
breaks) and gives what eager mode gives: on the CPU here, and with the cuda and triton backends where a
GPU is present."""

from __future__ import annotations

import pytest
import torch

import cfgfast

CASES = [pytest.param("cpu", "cpu", marks=pytest.mark.needs_extension)] + [
    pytest.param("cuda", backend, id=f"cuda-{backend}")
    for backend in ("cuda", "triton")
    if torch.cuda.is_available() and backend in cfgfast.available_backends()
]


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_step_equals_eager(device, backend):
    z = torch.randn(4, 3, 8, 8, device=device)
    eps_cond, w = torch.randn_like(z), torch.rand(4, device=device)
    eps_uncond = torch.randn_like(z).to(torch.bfloat16)

    def f(z, eps_cond, eps_uncond, w):
        # words >= 2^31 (the seed's high word, step, stream, index_offset): the Triton kernels take them as the
        # int32 of the same bits (Inductor of torch 2.11 failed on a user kernel's int argument >= 2^31), and a seed
        # >= 2^63 reaches the ops as a negative int64
        z = cfgfast.reverse_step(z, eps_cond, eps_uncond.float(), -1.0, -0.5, w, 0.3, seed=3, step=2**32 - 1,
                                 index_offset=2**31, backend=backend)
        return z + cfgfast.normal_noise(z.shape, 2**63 + 7, step=2**31 + 9, stream=2**31, device=device,
                                        backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(z, eps_cond, eps_uncond, w), f(z, eps_cond, eps_uncond, w), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_step_writes_out(device, backend):
    """out= under torch.compile: in place into z, and into a preallocated noise buffer (the overlap check of out
    read fake tensors' addresses, which they do not have)."""
    z = torch.randn(2, 3, 8, device=device)
    eps = torch.randn_like(z)
    buffer = torch.empty_like(z)

    def f(z, eps, buffer):
        cfgfast.normal_noise(z.shape, 5, step=1, device=device, backend=backend, out=buffer)
        return cfgfast.reverse_step(z, eps, eps, -1.0, -0.5, 2.0, noise=buffer, backend=backend, out=z)

    want_z, want_buffer = z.clone(), buffer.clone()
    want = f(want_z, eps, want_buffer)
    got_z, got_buffer = z.clone(), buffer.clone()
    got = torch.compile(f, fullgraph=True)(got_z, eps, got_buffer)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_z, want_z, rtol=0, atol=0)  # written in place
    torch.testing.assert_close(got_buffer, want_buffer, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_step_over_many_lambdas(device, backend):
    """A step compiled once and called at every step of a grid: torch.compile makes a float argument symbolic from
    its second value, which fullgraph=True must accept (math.isfinite cannot read a symbolic float): each value is a
    guard of its own. The table step takes the step as a tensor: one graph for the whole grid, no recompiles."""
    z = torch.randn(3, 16, device=device)
    eps_cond, eps_uncond = torch.randn_like(z), torch.randn_like(z)
    grid = cfgfast.sampling_lambdas(5).tolist()

    def step(z, lam, lam_next, t, w, clip):
        # seed 1: Inductor passes an int argument of 1 to a Triton kernel as a constant (test_codegen)
        return cfgfast.reverse_step(z, eps_cond, eps_uncond, lam, lam_next, w, 0.3, seed=1, step=t, clip=clip,
                                    backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    for t in range(len(grid) - 1):
        args = (z, grid[t], grid[t + 1], t, 1.0 + t, 2.0 + t)
        torch.testing.assert_close(compiled(*args), step(*args), rtol=0, atol=0)

    table = cfgfast.step_table("ddpm", grid).to(device)

    def table_step(z, t):
        return cfgfast.guided_step_table(z, eps_cond, eps_uncond, table, t, 2.0, seed=2**64 - 2**40, backend=backend)

    compiled = torch.compile(table_step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(len(grid)):
            counter = torch.tensor([t], device=device)
            torch.testing.assert_close(compiled(z, counter), table_step(z, counter), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_multistep_sampler_equals_eager(device, backend):
    """A dpmpp_2m_sde loop of guided_step calls, compiled: the state x_prev is written in place at every step."""
    lams = cfgfast.sampling_lambdas(4, spacing="uniform").tolist()
    rows = [row.tolist() for row in cfgfast.step_table("dpmpp_2m_sde", lams, prediction_type="v_prediction")]
    o_c = torch.randn(3, 2, 8, device=device)
    o_u = torch.randn_like(o_c).to(torch.bfloat16)

    def loop(z, x_prev):
        for t, row in enumerate(rows):
            z = cfgfast.guided_step(z, torch.tanh(z) + o_c, o_u.float(), cfgfast.StepCoefficients(*row), 1.5,
                                    x_prev=x_prev, seed=7, step=t, clip=2.0, backend=backend)
        return z

    z = torch.randn(3, 2, 8, device=device)
    want_prev, got_prev = torch.zeros_like(z), torch.zeros_like(z)
    want = loop(z, want_prev)
    got = torch.compile(loop, fullgraph=True)(z, got_prev)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_prev, want_prev, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_compiled_guidance_methods_equal_eager(device, backend):
    """guided_step with SPEC §7's methods, compiled (their per-sample arithmetic in torch on the device): APG with
    momentum and rescale (its running value written in place), and dynamic thresholding."""
    lams = cfgfast.default_lambdas(4, "ddim").tolist()
    rows = [row.tolist() for row in cfgfast.step_table("ddim", lams)]
    o_c = torch.randn(3, 2, 8, device=device)
    o_u = torch.randn_like(o_c)
    w = torch.tensor([2.0, 0.0, 4.0], device=device)

    def loop(z, running):
        for t, row in enumerate(rows):
            z = cfgfast.guided_step(z, torch.tanh(z) + o_c, o_u, row, w, guidance=cfgfast.APG(0.2, 1.0, -0.5),
                                    guidance_rescale=0.5, momentum_buffer=running, step=t, backend=backend)
            z = cfgfast.guided_step(z, o_c, torch.tanh(z) + o_u, row, 3.0, threshold=(0.9, 1.5), step=t,
                                    backend=backend)
        return z

    z = torch.randn(3, 2, 8, device=device)
    want_running, got_running = torch.zeros_like(z), torch.zeros_like(z)
    want = loop(z, want_running)
    got = torch.compile(loop, fullgraph=True)(z, got_running)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_running, want_running, rtol=1e-6, atol=1e-6)
    assert want_running.abs().sum() > 0


def test_a_table_step_read_on_the_host_is_a_graph_break():
    """The reference backend reads the table's step on the host: fullgraph=True refuses it (the compiled backends
    read it on the device)."""
    z = torch.randn(3, 16)
    table = cfgfast.step_table("ddpm", cfgfast.sampling_lambdas(5).tolist())
    compiled = torch.compile(lambda z, t: cfgfast.guided_step_table(z, z, z, table, t, 2.0, backend="reference"),
                             fullgraph=True)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="data-dependent"):
        compiled(z, torch.tensor([1]))


def test_triton_ops_trace_under_fake_tensors_without_a_gpu(tmp_path):
    """The Triton ops' bodies are their own fake kernels: with fake CUDA tensors (as torch.compile and export trace
    them) they run without a GPU, launching nothing and switching no device. A fresh process, not interpreted
    (the interpreter's kernels need real data)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch, cfgfast.triton_step
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            out = torch.empty(2, 3, 8, 8, device="cuda")
            torch.ops.cfgfast.triton_normal_noise_(out, 0, 0, 1, 0)
            z, weights = torch.empty(2, 3, 8, 8, device="cuda"), torch.empty(2, 2, device="cuda")
            torch.ops.cfgfast.triton_guided_step_(out, z, z, z, weights, torch.empty_like(z), None, None, [1.0] * 10,
                                                  0, 0, 0, None)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
