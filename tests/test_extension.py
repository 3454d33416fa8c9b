"""The compiled extension: registration (opcheck), build facts, and life without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cfgfast
from cfgfast import _ext

@pytest.mark.needs_extension
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["noise-in-kernel", "explicit-noise", "clip", "last"])
def test_opcheck_reverse_step(eps_dtype, mode):
    z = torch.randn(3, 2, 37)
    coef = cfgfast.step_coefficients(-1.0, -0.5, 0.3).as_list()
    noise = torch.randn_like(z) if mode == "explicit-noise" else None
    args = (torch.empty_like(z), z, torch.randn_like(z).to(eps_dtype), torch.randn_like(z).to(eps_dtype),
            torch.rand(3), noise, coef, 7, 2, 5, 1.0 if mode == "clip" else None, mode == "last")
    torch.library.opcheck(torch.ops.cfgfast.reverse_step_.default, args)


@pytest.mark.needs_extension
def test_build_info_reports_the_cpu_kernel():
    info = cfgfast.build_info()
    assert info["cpu_kernel"] is True
    assert info["version"] == cfgfast.__version__
    assert info["torch_built_against"] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in info["cpu_isa_supported"]
    assert set(info["cpu_isa_supported"]) <= set(info["cpu_isa_compiled"])
    assert cfgfast.available_backends()[:2] == ["reference", "cpu"]


@pytest.mark.needs_extension
def test_cpu_isa_override_from_environment(tmp_path):
    code = "import cfgfast; print(cfgfast.build_info()['cpu_isa'])"
    env = {**os.environ, "CFGFAST_CPU_ISA": "scalar"}
    # cwd away from the source tree, so the child imports the cfgfast this test runs on, not ./cfgfast
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "scalar"


@pytest.mark.needs_extension
def test_unknown_isa_is_refused():
    from cfgfast import _C

    with pytest.raises(ValueError, match="unknown cpu isa"):
        _C.set_cpu_isa("avx9000")


def test_import_and_reference_work_without_the_extension(tmp_path):
    """With cfgfast._C unimportable, import works, auto falls back to the reference backend, and asking
    for the cpu backend names the rebuild command."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cfgfast._C"] = None  # makes `import cfgfast._C` raise ImportError
        import torch, cfgfast
        info = cfgfast.build_info()
        assert info["cpu_kernel"] is False and "extension_error" in info, info
        # the compiled backends are gone; triton (no _C needed) stays where a GPU is
        assert cfgfast.available_backends() in (["reference"], ["reference", "triton"]), cfgfast.available_backends()
        z = torch.randn(2, 5)
        out = cfgfast.reverse_step(z, z, z, 0.0, 1.0, 1.0)
        assert torch.isfinite(out).all()
        try:
            cfgfast.reverse_step(z, z, z, 0.0, 1.0, 1.0, backend="cpu")
        except RuntimeError as exc:
            assert "pip install --no-build-isolation ." in str(exc), exc
            print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.needs_extension
@pytest.mark.parametrize("clip", [None, 2.0])
def test_opcheck_reverse_step_table(clip):
    z = torch.randn(3, 2, 37)
    table = cfgfast.coefficient_table(cfgfast.sampling_lambdas(5), 0.3)
    for t in (0, 4):
        args = (torch.empty_like(z), z, torch.randn_like(z), torch.randn_like(z), torch.rand(3), table,
                torch.tensor([t]), 7, 5, clip)
        torch.library.opcheck(torch.ops.cfgfast.reverse_step_table_.default, args)


def test_cuda_backend_states_its_reasons():
    from cfgfast.backends import choose

    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: it runs on CUDA tensors"):
        choose("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            choose("cuda", torch.device("cuda"))
        assert "cuda" not in cfgfast.available_backends()


@pytest.mark.needs_extension
def test_build_info_says_whether_cuda_was_compiled():
    """cuda_kernel is True whenever the CUDA sources were compiled in, GPU or not; with them, the archs."""
    info = cfgfast.build_info()
    if info["cuda_kernel"]:
        assert info["cuda_arch"], info
    else:
        assert info["cuda_arch"] == []
    if os.environ.get("CFGFAST_EXPECT_CUDA_KERNEL") == "1":  # set by CI, whose machine has the toolkit
        assert info["cuda_kernel"], info


GPU_OP_CASES = [pytest.param(b, id=b) for b in ("cuda",) if torch.cuda.is_available() and b in cfgfast.available_backends()]


@pytest.mark.parametrize("backend", GPU_OP_CASES)
@pytest.mark.parametrize("shape", [(3, 7), (5, 4097), (3, 1_000_003), (2, 3, 512, 512)], ids=str)
@pytest.mark.parametrize("mode", ["noise", "clip", "explicit", "last"])
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_tuning_knobs_give_the_same_bits(backend, shape, mode, eps_dtype):
    """The CUDA step kernel's tuning knobs (1 or 2 groups of four per thread and round; grids of the default 128 or
    of 1 or 3 blocks per SM; the L2 prefetch 1 or 2 rounds ahead) change nothing: the vectorised and the scalar
    path, one round of the grid-stride loop and several, a partial last round."""
    module = _ext.load()
    z = torch.randn(shape, device="cuda")
    eps_c, eps_u = torch.randn_like(z).to(eps_dtype), torch.randn_like(z).to(eps_dtype)
    w = torch.rand(shape[0], device="cuda") * 3
    kwargs = {"noise": dict(), "clip": dict(clip=1.0), "explicit": dict(noise=torch.randn_like(z)),
              "last": dict(last=True)}[mode]
    results = []
    for groups, blocks, rounds in ((1, 0, 0), (2, 0, 0), (1, 1, 0), (2, 1, 0), (1, 3, 0), (2, 3, 0), (1, 0, 1),
                                   (1, 0, 2), (1, 1, 2), (1, 3, 1), (2, 0, 1), (2, 1, 2), (2, 3, 1)):
        previous = (module.set_cuda_groups_per_thread(groups), module.set_cuda_blocks_per_sm(blocks),
                    module.set_cuda_prefetch_rounds(rounds))
        try:
            results.append(cfgfast.reverse_step(z, eps_c, eps_u, -1.0, -0.5, w, seed=3, step=5, backend=backend,
                                                **kwargs))
        finally:
            module.set_cuda_groups_per_thread(previous[0]), module.set_cuda_blocks_per_sm(previous[1])
            module.set_cuda_prefetch_rounds(previous[2])
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.skipif(not hasattr(_ext.load(), "set_cuda_blocks_per_sm"), reason="built without the CUDA kernels")
def test_cuda_tuning_knobs_are_checked():
    """The knobs need no GPU to be set: their ranges, their defaults (0) and their return of the previous value."""
    module = _ext.load()
    assert module.set_cuda_groups_per_thread(0) == 0  # the default: chosen by eps dtype
    assert module.set_cuda_blocks_per_sm(0) == 0  # the defaults: 128 an SM (step), 32 (noise)
    assert module.set_cuda_prefetch_rounds(0) == 0  # the default: no prefetch
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=r"prefetch rounds must be in \[1, 8\]"):
            module.set_cuda_prefetch_rounds(bad)
    try:
        assert module.set_cuda_prefetch_rounds(8) == 0
        assert module.set_cuda_prefetch_rounds(2) == 8
    finally:
        module.set_cuda_prefetch_rounds(0)
    assert module.set_cuda_prefetch_rounds(0) == 0
    with pytest.raises(ValueError, match="groups per thread must be 1 or 2"):
        module.set_cuda_groups_per_thread(3)
    for bad in (-1, 1025):
        with pytest.raises(ValueError, match=r"blocks per SM must be in \[1, 1024\]"):
            module.set_cuda_blocks_per_sm(bad)
    try:
        assert module.set_cuda_blocks_per_sm(7) == 0
        assert module.set_cuda_groups_per_thread(2) == 0
        assert module.set_cuda_blocks_per_sm(1024) == 7
    finally:
        module.set_cuda_blocks_per_sm(0), module.set_cuda_groups_per_thread(0)
    assert module.set_cuda_blocks_per_sm(0) == 0 and module.set_cuda_groups_per_thread(0) == 0


@pytest.mark.parametrize("backend", GPU_OP_CASES)
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda_ops(backend, eps_dtype):
    z = torch.randn(3, 2, 37, device="cuda")
    coef = cfgfast.step_coefficients(-1.0, -0.5, 0.3).as_list()
    for noise, clip, last in ((None, None, False), (torch.randn_like(z), 1.0, False), (None, None, True)):
        args = (torch.empty_like(z), z, torch.randn_like(z).to(eps_dtype), torch.randn_like(z).to(eps_dtype),
                torch.rand(3, device="cuda"), noise, coef, 7, 2, 5, clip, last)
        torch.library.opcheck(torch.ops.cfgfast.reverse_step_.default, args)
    table = cfgfast.coefficient_table(cfgfast.sampling_lambdas(5), 0.3).cuda()
    args = (torch.empty_like(z), z, torch.randn_like(z), torch.randn_like(z), torch.rand(3, device="cuda"), table,
            torch.tensor([2], device="cuda"), 7, 5, None)
    torch.library.opcheck(torch.ops.cfgfast.reverse_step_table_.default, args)
    torch.library.opcheck(torch.ops.cfgfast.normal_noise_.default, (torch.empty(3, 37, device="cuda"), 1, 2, 1, 0))


@pytest.mark.parametrize("backend", GPU_OP_CASES)
def test_cuda_graph_replays_every_step(backend):
    """One captured graph (model, table step, counter += 1) replayed T times equals the per-step loop;
    a replay past the table gives NaN, not a wild read."""
    lams = cfgfast.sampling_lambdas(10)
    table = cfgfast.coefficient_table(lams, 0.3).cuda()
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    w = torch.tensor([0.0, 2.0, 4.0], device="cuda")
    z0 = cfgfast.normal_noise((3, 1000), 5, step=0, stream=0, device="cuda")

    def model(z):
        return torch.tanh(z) * 0.5, torch.sin(z) * 0.5

    expected = z0.clone()
    for t in range(len(lams)):
        last = t == len(lams) - 1
        eps_c, eps_u = model(expected)
        expected = cfgfast.reverse_step(expected, eps_c, eps_u, lams[t].item(), lams[min(t + 1, 9)].item(), w, 0.3,
                                        seed=5, step=t, last=last, backend=backend)
    state, out = z0.clone(), torch.empty_like(z0)
    cfgfast.reverse_step_table(state, *model(state), table, counter, w, seed=5, out=out)  # warm-up, then reset
    counter.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eps_c, eps_u = model(state)
        cfgfast.reverse_step_table(state, eps_c, eps_u, table, counter, w, seed=5, out=out)
        state.copy_(out)
        counter.add_(1)
    for _ in range(len(lams)):
        graph.replay()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    graph.replay()  # counter == T: outside the table
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", GPU_OP_CASES)
def test_cuda_graph_captures_the_table_step_cold(backend, tmp_path):
    """In a fresh process, a graph captured around the kernel's very first launch (its module loaded, its occupancy
    asked of the runtime, all during the capture) replays the step the eager call gives."""
    code = textwrap.dedent(
        f"""
        import torch, cfgfast
        lams = cfgfast.sampling_lambdas(4)
        table = cfgfast.coefficient_table(lams, 0.3).cuda()
        z = torch.randn(2, 1000, device="cuda")
        eps_c, eps_u = torch.tanh(z), torch.sin(z)
        w, counter, out = torch.tensor([1.0, 3.0], device="cuda"), torch.ones(1, dtype=torch.int64, device="cuda"), torch.empty_like(z)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cfgfast.reverse_step_table(z, eps_c, eps_u, table, counter, w, seed=3, out=out, backend="{backend}")
        graph.replay()
        expected = cfgfast.reverse_step(z, eps_c, eps_u, lams[1].item(), lams[2].item(), w, 0.3, seed=3, step=1,
                                        backend="{backend}")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_mark_out_written(device):
    """out's version counter moves, as after any in-place op: autograd refuses a backward through a tensor the step
    overwrote (it computed a wrong gradient before), and a w that the step overwrote is checked again."""
    if device == "cuda" and "cuda" not in cfgfast.available_backends():
        pytest.skip("the cuda kernel is not built")
    backend = device
    a = torch.randn(2, 8, device=device, requires_grad=True)
    h = a.exp()
    loss = h.sum()
    z, e = torch.randn(2, 8, device=device), torch.zeros(2, 8, device=device)
    for write in (lambda out: cfgfast.reverse_step(z, e, e, -1.0, 1.0, 1.0, backend=backend, out=out),
                  lambda out: cfgfast.normal_noise(out.shape, 0, device=device, backend=backend, out=out),
                  lambda out: cfgfast.reverse_step_table(z, e, e, cfgfast.coefficient_table([-1.0, 1.0], 0.3).to(device),
                                                         torch.tensor([0], device=device), 1.0, backend=backend, out=out)):
        before = h._version
        write(h)
        assert h._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    w, e3 = torch.ones(3, device=device), torch.zeros(3, device=device)
    cfgfast.reverse_step(torch.randn(3, device=device), e3, e3, -1.0, 1.0, w, backend=backend)  # w checked, cached
    inf = torch.full((3,), float("inf"), device=device)
    cfgfast.reverse_step(inf, inf, e3, -1.0, 1.0, 1.0, backend=backend, out=w)  # now NaN or inf
    with pytest.raises(ValueError, match="w must be finite"):
        cfgfast.reverse_step(torch.randn(3, device=device), e3, e3, -1.0, 1.0, w, backend=backend)


@pytest.mark.needs_extension
def test_direct_op_calls_are_checked_as_the_public_api_is():
    """What the Python wrappers check first, the ops check too: a direct torch.ops call neither crashes, nor writes
    nothing, nor gives another answer than the reference."""
    import numpy as np

    op = torch.ops.cfgfast
    coef = [1.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0]
    # a view whose storage was shrunk after it was made (a segfault before: torch's own ops have that hole)
    shrunk = torch.empty(1, 1 << 22)
    shrunk.untyped_storage().resize_(4)
    with pytest.raises(ValueError, match="cfgfast: out needs 16777216 bytes of its storage, which holds 4"):
        op.normal_noise_(shrunk, 0, 0, 0, 0)
    small = torch.randn(1, 1 << 22)
    with pytest.raises(ValueError, match="cfgfast: z needs 16777216 bytes of its storage"):
        op.reverse_step_(torch.empty_like(small), shrunk, small, small, torch.ones(1), None, coef, 0, 0, 0, None, False)
    # one meta tensor among CPU ones: the fake kernel ran, and out was left unwritten
    out = torch.full((2, 4), 7.0)
    with pytest.raises(RuntimeError, match="all tensors must be on cpu, got eps_cond on meta"):
        op.reverse_step_(out, torch.randn(2, 4), torch.randn(2, 4, device="meta"), torch.randn(2, 4), torch.ones(2),
                         None, coef, 0, 0, 0, None, False)
    # out and z over the same memory through two storages (NumPy): a partial overlap ATen does not see
    memory = np.random.default_rng(0).random(601).astype(np.float32)
    out, z = torch.from_numpy(memory)[1:].view(2, 300), torch.from_numpy(memory)[:-1].view(2, 300)
    e = torch.zeros(2, 300)
    with pytest.raises(ValueError, match="cfgfast: out must not overlap z unless it is z itself"):
        op.reverse_step_(out, z, e, e, torch.ones(2), None, coef, 0, 0, 0, None, False)
    op.reverse_step_(z, z, e, e, torch.ones(2), None, coef, 0, 0, 0, None, False)  # z itself: the in-place step
    # a non-contiguous input is copied before out is written: its memory may span out's
    buffer = torch.zeros(3, 2, 8)
    out, z, e = buffer[1], buffer[::2, 0], torch.zeros(2, 8)
    want = cfgfast.reverse_step(z.clone(), e, e, -1.0, 1.0, 1.0, backend="reference")
    op.reverse_step_(out, z, e, e, torch.ones(2), None, cfgfast.step_coefficients(-1.0, 1.0, 0.3).as_list(), 0, 0, 0,
                     None, False)
    torch.testing.assert_close(out, want)
    # the table step: out over the table's bytes (other threads read the table while out is written)
    z = torch.randn(1, 4)
    table = cfgfast.coefficient_table([-1.0, 1.0], 0.3)
    out = torch.from_numpy(table.numpy()).view(torch.float32).view(-1)[:4].view(1, 4)  # another storage, same memory
    with pytest.raises(ValueError, match="cfgfast: out must not overlap coef_table"):
        op.reverse_step_table_(out, z, z, z, torch.ones(1), table, torch.tensor([0]), 0, 0, None)
    # clip as the public API takes it
    z = torch.randn(1, 4)
    for clip in (float("nan"), -1.0, 0.0, float("inf"), float("-inf"), 1e39):  # 1e39: infinite in float32
        with pytest.raises(ValueError, match="cfgfast: clip must be positive and finite in float32"):
            op.reverse_step_(torch.empty_like(z), z, z, z, torch.ones(1), None, coef, 0, 0, 0, clip, True)
        with pytest.raises(ValueError, match="cfgfast: clip must be positive and finite in float32"):
            op.reverse_step_table_(torch.empty_like(z), z, z, z, torch.ones(1), torch.ones(1, 7, dtype=torch.float64),
                                   torch.tensor([0]), 0, 0, clip)
