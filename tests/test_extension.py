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

from cfgfast.reference import guided_step_reference
from cfgfast.samplers import StepCoefficients

LAMBDAS = cfgfast.sampling_lambdas(6).tolist()
CPU_ISAS = [] if _ext.error() is not None else list(_ext.load().build_info()["cpu_isa_supported"])

# (sampler, row, step_table keywords, the state / learned variance it takes): a row of each kind of step
ROWS = {
    "ddpm": ("ddpm", 1, {}),
    "last": ("ddpm", len(LAMBDAS) - 1, {}),
    "ddim": ("ddim", 2, {}),  # eta = 0: no noise term, none drawn
    "dpmpp_2m-first": ("dpmpp_2m", 0, {}),  # prev = 0: the state is written, not read
    "dpmpp_2m": ("dpmpp_2m", 2, {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", 3, {}),
    "learned-variance": ("ddpm", 2, dict(learned_variance=True)),
    "v-prediction": ("ddpm", 3, dict(prediction_type="v_prediction")),
}


def row_of(kind: str) -> list[float]:
    sampler, t, kwargs = ROWS[kind]
    return cfgfast.step_table(sampler, LAMBDAS, **kwargs)[t].tolist()


def step_inputs(kind: str, shape, pred_dtype=torch.float32, device="cpu", seed=0):
    """z, pred_cond, pred_uncond, weights [B, 2], x_prev (multistep rows), nu (learned variance) for a row kind."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    pc, pu = (torch.randn(shape, generator=g).to(pred_dtype) for _ in range(2))
    weights = torch.stack([1.0 + torch.arange(shape[0]) * 1.5, torch.arange(shape[0]) * 1.5], dim=1).float()
    x_prev = torch.randn(shape, generator=g) if kind.startswith("dpmpp") else None
    nu = torch.rand(shape, generator=g).mul(2).sub(1).to(pred_dtype) if kind == "learned-variance" else None
    move = (lambda t: None if t is None else t.to(device))
    return tuple(move(t) for t in (z, pc, pu, weights, x_prev, nu))


def reference_step(z, pc, pu, weights, x_prev, nu, row, noise, clip):
    """guided_step_reference on copies: (z', x~)."""
    return guided_step_reference(z, pc, pu, weights, StepCoefficients(*row), noise, clip=clip,
                                 x_prev=None if x_prev is None else x_prev.clone(), nu=nu)


@pytest.mark.needs_extension
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["noise-in-kernel", "explicit-noise", "clip", "last", "ddim", "dpmpp_2m-first",
                                  "dpmpp_2m", "learned-variance"])
def test_opcheck_guided_step(pred_dtype, mode):
    kind = {"noise-in-kernel": "ddpm", "explicit-noise": "ddpm", "clip": "dpmpp_2m_sde"}.get(mode, mode)
    z, pc, pu, weights, x_prev, nu = step_inputs(kind, (3, 2, 37), pred_dtype)
    noise = torch.randn_like(z) if mode == "explicit-noise" else None
    args = (torch.empty_like(z), z, pc, pu, weights, x_prev, nu, noise, row_of(kind), 7, 2, 5,
            1.0 if mode == "clip" else None)
    torch.library.opcheck(torch.ops.cfgfast.guided_step_.default, args)


@pytest.mark.needs_extension
@pytest.mark.parametrize("clip", [None, 2.0])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m_sde"])
def test_opcheck_guided_step_table(clip, sampler):
    table = cfgfast.step_table(sampler, LAMBDAS)
    for t in (0, 2, len(LAMBDAS) - 1):
        z, pc, pu, weights, _, _ = step_inputs("ddpm", (3, 2, 37))
        x_prev = torch.randn_like(z) if sampler != "ddpm" else None
        args = (torch.empty_like(z), z, pc, pu, weights, x_prev, None, table, torch.tensor([t]), 7, 5, clip)
        torch.library.opcheck(torch.ops.cfgfast.guided_step_table_.default, args)


@pytest.mark.needs_extension
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("clip", [None, 0.9])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 65), (2, 4097)], ids=str)
def test_cpu_op_matches_the_reference(cpu_isas, pred_dtype, kind, clip, shape):
    """The CPU op, called directly, against cfgfast.reference (float32 in the kernels' order): z' within float32
    rounding, x~ written into the state; the noise drawn in the kernel is SPEC §3's stream 1 at t = step."""
    z, pc, pu, weights, x_prev, nu = step_inputs(kind, shape, pred_dtype, seed=len(shape))
    row = row_of(kind)
    seed, step, offset = 2**40 + 9, 4, 3
    noise = cfgfast.normal_noise(shape, seed, step=step, stream=1, index_offset=offset, backend="reference")
    want, want_x = reference_step(z, pc, pu, weights, x_prev, nu, row, noise, clip)
    out = torch.full_like(z, float("nan"))
    state = None if x_prev is None else x_prev.clone()
    torch.ops.cfgfast.guided_step_(out, z, pc, pu, weights, state, nu, None, row, seed, step, offset, clip)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    if state is not None:
        torch.testing.assert_close(state, want_x, rtol=2e-6, atol=2e-6)
    # explicit noise in place of the draw, and the step in place (out is z)
    explicit = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    want, _ = reference_step(z, pc, pu, weights, x_prev, nu, row, explicit, clip)
    in_place = z.clone()
    state = None if x_prev is None else x_prev.clone()
    torch.ops.cfgfast.guided_step_(in_place, in_place, pc, pu, weights, state, nu, explicit, row, seed, step, offset,
                                   clip)
    torch.testing.assert_close(in_place, want, rtol=2e-6, atol=2e-6)


@pytest.mark.needs_extension
@pytest.mark.skipif(len(CPU_ISAS) < 2, reason="this CPU or build runs one instruction set only")
@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("clip", [None, 0.9])
def test_cpu_isas_agree_bit_for_bit(kind, clip):
    """The scalar and AVX2 kernels compute the same float32 operations in the same order: bit for bit, but for the
    normals they draw (the AVX2 Box-Muller's fused multiply-adds: within float32 rounding there)."""
    module = _ext.load()
    shape = (3, 2, 1001)  # tails: 2002 elements a sample, not a multiple of 64
    results = {}
    for isa in module.build_info()["cpu_isa_supported"]:
        previous = module.set_cpu_isa(isa)
        try:
            for drawn in (False, True):
                z, pc, pu, weights, x_prev, nu = step_inputs(kind, shape, torch.bfloat16, seed=1)
                noise = None if drawn else torch.randn(shape, generator=torch.Generator().manual_seed(2))
                out = torch.empty_like(z)
                torch.ops.cfgfast.guided_step_(out, z, pc, pu, weights, x_prev, nu, noise, row_of(kind), 3, 1, 0, clip)
                results.setdefault(drawn, []).append((out, x_prev))
        finally:
            module.set_cpu_isa(previous)
    row = StepCoefficients(*row_of(kind))
    for drawn, runs in results.items():
        (out0, x0), *others = runs
        for out, x in others:
            if x is not None:
                assert torch.equal(x, x0)
            if drawn and row.noise_std != 0 and row.noise_nu == 0:
                torch.testing.assert_close(out, out0, rtol=2e-6, atol=2e-6)
            else:
                assert torch.equal(out, out0)


@pytest.mark.needs_extension
def test_cpu_op_reads_only_what_the_row_uses(cpu_isas):
    """A row without noise draws none and reads no noise or nu (the seed and NaN there change nothing); a row with
    prev = 0 reads no state (an uninitialised one, NaN here, does not leak) but writes x~ into it."""
    shape = (2, 3, 37)
    z, pc, pu, weights, _, _ = step_inputs("ddim", shape)
    nan = torch.full(shape, float("nan"))
    row = row_of("ddim")
    assert row[8] == 0.0  # noise_std
    runs = []
    for seed, noise, nu in ((0, None, None), (12345, None, None), (7, nan, nan)):
        out = torch.empty_like(z)
        torch.ops.cfgfast.guided_step_(out, z, pc, pu, weights, None, nu, noise, row, seed, 3, 0, None)
        runs.append(out)
    assert torch.isfinite(runs[0]).all()
    assert all(torch.equal(runs[0], other) for other in runs[1:])
    first = row_of("dpmpp_2m-first")
    assert first[6] == 0.0  # prev
    want, want_x = reference_step(z, pc, pu, weights, None, None, first, None, None)
    out, state = torch.empty_like(z), nan.clone()
    torch.ops.cfgfast.guided_step_(out, z, pc, pu, weights, state, None, None, first, 1, 0, 0, None)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(state, want_x, rtol=2e-6, atol=2e-6)


@pytest.mark.needs_extension
def test_cpu_table_op_reads_row_t():
    """The table op on the CPU: row t = step[0] (read on the host) with noise at t, as the plain op with that row;
    a t outside the table is an error naming step, and nothing is written."""
    table = cfgfast.step_table("dpmpp_2m_sde", LAMBDAS)
    z, pc, pu, weights, x_prev, _ = step_inputs("dpmpp_2m", (2, 45))
    for t in range(len(LAMBDAS)):
        out_table, out_plain = torch.empty_like(z), torch.empty_like(z)
        state_table, state_plain = x_prev.clone(), x_prev.clone()
        torch.ops.cfgfast.guided_step_table_(out_table, z, pc, pu, weights, state_table, None, table, torch.tensor([t]),
                                             9, 2, 1.5)
        torch.ops.cfgfast.guided_step_(out_plain, z, pc, pu, weights, state_plain, None, None, table[t].tolist(), 9, t,
                                       2, 1.5)
        assert torch.equal(out_table, out_plain) and torch.equal(state_table, state_plain)
    for t in (-1, len(LAMBDAS)):
        out, state = torch.full_like(z, 7.0), x_prev.clone()
        with pytest.raises(ValueError, match=rf"cfgfast: step {t} is outside the table of {len(LAMBDAS)} steps"):
            torch.ops.cfgfast.guided_step_table_(out, z, pc, pu, weights, state, None, table, torch.tensor([t]), 9, 2,
                                                 None)
        assert (out == 7.0).all() and torch.equal(state, x_prev)


@pytest.mark.needs_extension
def test_build_info_reports_the_cpu_kernel():
    info = cfgfast.build_info()
    assert info["cpu_kernel"] is True
    assert info["version"] == cfgfast.__version__
    assert info["cpu"] and info["cpu"] == cfgfast._cpu_model()  # the model name figures are quoted with
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
def test_a_source_folder_without_kernels_names_the_build_it_hides(tmp_path):
    """python run in a source checkout imports its cfgfast first: without the kernels built into it, that copy
    warns at import, and its refusals name the installed build it hides and the two ways out. (Under an editable
    install, `pip install -e`, its finder supplies the installed _C to that copy as well: kernels, no warning. Either
    way nothing falls back to the reference backend silently.)"""
    import shutil

    package = os.path.dirname(os.path.abspath(cfgfast.__file__))  # a build with the kernels
    source = tmp_path / "checkout"
    shutil.copytree(package, source / "cfgfast", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (source / "setup.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(package)}
    silent = ("import warnings; warnings.simplefilter('error'); import cfgfast\n"
              "print(cfgfast.available_backends(), cfgfast._ext.error())")
    out = subprocess.run([sys.executable, "-c", silent], cwd=source, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "'cpu'" in out.stdout or "UserWarning: cfgfast: this cfgfast is the source" \
        in out.stderr, (out.stdout, out.stderr)
    # a plain install (no editable finder): the warning
    code = ("import sys, warnings\n"
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "warnings.simplefilter('error')\n"
            "try:\n    import cfgfast\nexcept UserWarning as w:\n    print(w)")
    out = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"this cfgfast is the source folder {source / 'cfgfast'}, which has no compiled kernels, imported instead " \
           f"of the installed build in {package}" in out.stdout, out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
    # a build of the folder's own that fails to load (stale, or for another torch) has its own error to tell
    import importlib.machinery

    (source / "cfgfast" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a library")
    out = subprocess.run([sys.executable, "-c", code + "\nprint(cfgfast._ext.error())"], cwd=source,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "no compiled kernels" not in out.stdout and "ImportError" in out.stdout, out.stdout
    # not a checkout (no setup.py beside it), or nothing compiled further along the path: nothing hidden
    assert _ext.shadowed_build(str(source / "cfgfast"), [str(source), os.path.dirname(package)]) == package
    assert _ext.shadowed_build(str(source / "cfgfast"), [str(source), str(tmp_path)]) is None
    (source / "setup.py").unlink()
    assert _ext.shadowed_build(str(source / "cfgfast"), [str(source), os.path.dirname(package)]) is None


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
@pytest.mark.parametrize("kind", ["ddpm", "last", "ddim", "dpmpp_2m", "learned-variance", "explicit-noise", "clip"])
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_tuning_knobs_give_the_same_bits(backend, shape, kind, pred_dtype):
    """The CUDA step kernel's tuning knobs (1 or 2 groups of four per thread and round; grids of the default 128 or
    of 1 or 3 blocks per SM) change nothing: the vectorised and the scalar path, one round of the grid-stride loop
    and several, a partial last round."""
    module = _ext.load()
    row_kind = {"explicit-noise": "ddpm", "clip": "dpmpp_2m_sde"}.get(kind, kind)
    z, pc, pu, weights, x_prev, nu = step_inputs(row_kind, shape, pred_dtype, device="cuda")
    noise = torch.randn_like(z) if kind == "explicit-noise" else None
    clip = 1.0 if kind == "clip" else None
    results = []
    for groups, blocks in ((1, 0), (2, 0), (1, 1), (2, 1), (1, 3), (2, 3)):
        previous = module.set_cuda_groups_per_thread(groups), module.set_cuda_blocks_per_sm(blocks)
        try:
            out, state = torch.empty_like(z), None if x_prev is None else x_prev.clone()
            torch.ops.cfgfast.guided_step_(out, z, pc, pu, weights, state, nu, noise, row_of(row_kind), 3, 5, 0, clip)
            results.append((out, state))
        finally:
            module.set_cuda_groups_per_thread(previous[0]), module.set_cuda_blocks_per_sm(previous[1])
    for out, state in results[1:]:
        assert torch.equal(results[0][0], out)
        assert state is None or torch.equal(results[0][1], state)


@pytest.mark.skipif(not hasattr(_ext.load(), "set_cuda_blocks_per_sm"), reason="built without the CUDA kernels")
def test_cuda_tuning_knobs_are_checked():
    """The knobs need no GPU to be set: their ranges, their defaults (0) and their return of the previous value."""
    module = _ext.load()
    assert module.set_cuda_groups_per_thread(0) == 0  # the default: chosen by the model outputs' dtype
    assert module.set_cuda_blocks_per_sm(0) == 0  # the defaults: 128 an SM (step), 32 (noise)
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
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda_ops(backend, pred_dtype):
    for kind, noise, clip in (("ddpm", None, None), ("ddpm", True, 1.0), ("last", None, None), ("ddim", None, None),
                              ("dpmpp_2m", None, 1.0), ("learned-variance", None, None)):
        z, pc, pu, weights, x_prev, nu = step_inputs(kind, (3, 2, 37), pred_dtype, device="cuda")
        args = (torch.empty_like(z), z, pc, pu, weights, x_prev, nu, torch.randn_like(z) if noise else None,
                row_of(kind), 7, 2, 5, clip)
        torch.library.opcheck(torch.ops.cfgfast.guided_step_.default, args)
    table = cfgfast.step_table("dpmpp_2m_sde", LAMBDAS).cuda()
    z, pc, pu, weights, x_prev, _ = step_inputs("dpmpp_2m", (3, 2, 37), device="cuda")
    args = (torch.empty_like(z), z, pc, pu, weights, x_prev, None, table, torch.tensor([2], device="cuda"), 7, 5, None)
    torch.library.opcheck(torch.ops.cfgfast.guided_step_table_.default, args)
    torch.library.opcheck(torch.ops.cfgfast.normal_noise_.default, (torch.empty(3, 37, device="cuda"), 1, 2, 1, 0))


@pytest.mark.parametrize("backend", GPU_OP_CASES)
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m_sde"])
def test_cuda_graph_replays_every_step(backend, sampler):
    """One captured graph (model, table step, counter += 1) replayed T times equals the per-step loop, the multistep
    state included; a replay past the table gives NaN, not a wild read."""
    lams = cfgfast.sampling_lambdas(10).tolist()
    table = cfgfast.step_table(sampler, lams)
    device_table = table.cuda()
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")
    w = torch.tensor([0.0, 2.0, 4.0], device="cuda")
    z0 = cfgfast.normal_noise((3, 1000), 5, step=0, stream=0, device="cuda")

    def model(z):
        return torch.tanh(z) * 0.5, torch.sin(z) * 0.5

    expected, expected_prev = z0.clone(), torch.zeros_like(z0)
    for t in range(len(lams)):
        o_c, o_u = model(expected)
        expected = cfgfast.guided_step(expected, o_c, o_u, table[t], w, x_prev=expected_prev, seed=5, step=t,
                                       backend=backend)
    state, out, prev = z0.clone(), torch.empty_like(z0), torch.zeros_like(z0)
    cfgfast.guided_step_table(state, *model(state), device_table, counter, w, x_prev=prev, seed=5, out=out,
                              backend=backend)  # warm-up, then reset
    counter.zero_()
    prev.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_c, o_u = model(state)
        cfgfast.guided_step_table(state, o_c, o_u, device_table, counter, w, x_prev=prev, seed=5, out=out,
                                  backend=backend)
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
        lams = cfgfast.sampling_lambdas(4).tolist()
        table = cfgfast.step_table("ddpm", lams)
        device_table = table.cuda()
        z = torch.randn(2, 1000, device="cuda")
        o_c, o_u = torch.tanh(z), torch.sin(z)
        w, counter, out = torch.tensor([1.0, 3.0], device="cuda"), torch.ones(1, dtype=torch.int64, device="cuda"), torch.empty_like(z)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cfgfast.guided_step_table(z, o_c, o_u, device_table, counter, w, seed=3, out=out, backend="{backend}")
        graph.replay()
        expected = cfgfast.guided_step(z, o_c, o_u, table[1], w, seed=3, step=1, backend="{backend}")
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
    """out's and x_prev's version counters move, as after any in-place op: autograd refuses a backward through a
    tensor the step overwrote, and a w that the step overwrote is checked again."""
    if device == "cuda" and "cuda" not in cfgfast.available_backends():
        pytest.skip("the cuda kernel is not built")
    backend = device
    a = torch.randn(2, 8, device=device, requires_grad=True)
    h = a.exp()
    loss = h.sum()
    z, e = torch.randn(2, 8, device=device), torch.zeros(2, 8, device=device)
    table = cfgfast.step_table("dpmpp_2m", [-1.0, 0.0, 1.0]).to(device)
    step = torch.tensor([1], device=device)
    for write in (lambda out: cfgfast.guided_step(z, e, e, table[1].cpu(), 1.0, backend=backend, out=out),
                  lambda out: cfgfast.normal_noise(out.shape, 0, device=device, backend=backend, out=out),
                  lambda out: cfgfast.guided_step_table(z, e, e, table, step, 1.0, backend=backend, out=out),
                  lambda state: cfgfast.guided_step(z, e, e, table[1].cpu(), 1.0, x_prev=state, backend=backend),
                  lambda state: cfgfast.guided_step_table(z, e, e, table, step, 1.0, x_prev=state, backend=backend)):
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
    coef = row_of("ddpm")
    ones = torch.ones(1, 2)
    # a view whose storage was shrunk after it was made (torch's own ops have that hole: a segfault)
    shrunk = torch.empty(1, 1 << 22)
    shrunk.untyped_storage().resize_(4)
    with pytest.raises(ValueError, match="cfgfast: out needs 16777216 bytes of its storage, which holds 4"):
        op.normal_noise_(shrunk, 0, 0, 0, 0)
    small = torch.randn(1, 1 << 22)
    with pytest.raises(ValueError, match="cfgfast: z needs 16777216 bytes of its storage"):
        op.guided_step_(torch.empty_like(small), shrunk, small, small, ones, None, None, None, coef, 0, 0, 0, None)
    with pytest.raises(ValueError, match="cfgfast: x_prev needs 16777216 bytes of its storage"):
        op.guided_step_(torch.empty_like(small), small, small, small, ones, shrunk, None, None, coef, 0, 0, 0, None)
    with pytest.raises(ValueError, match="cfgfast: nu needs 16777216 bytes of its storage"):
        op.guided_step_(torch.empty_like(small), small, small, small, ones, None, shrunk, None, coef, 0, 0, 0, None)
    # one meta tensor among CPU ones: the fake kernel ran, and out was left unwritten
    out = torch.full((2, 4), 7.0)
    with pytest.raises(ValueError, match="cfgfast: pred_cond must be on z's device cpu, got meta"):
        op.guided_step_(out, torch.randn(2, 4), torch.randn(2, 4, device="meta"), torch.randn(2, 4), torch.ones(2, 2),
                        None, None, None, coef, 0, 0, 0, None)
    assert (out == 7.0).all()
    # the arguments' own checks, each naming its argument
    z, e = torch.randn(2, 4), torch.zeros(2, 4)
    w2 = torch.ones(2, 2)
    x_prev_words = r"cfgfast: x_prev must be a contiguous float32 tensor of z's shape \[2, 4\] on cpu"
    bad_calls = [
        (TypeError, "cfgfast: weights must be float32", dict(weights=w2.double())),
        (ValueError, r"cfgfast: weights must have shape \[2, 2\] or \[2, 3\], got \[2\]", dict(weights=torch.ones(2))),
        (ValueError, x_prev_words, dict(x_prev=e.double())),
        (ValueError, x_prev_words, dict(x_prev=torch.zeros(2, 5))),
        (ValueError, x_prev_words, dict(x_prev=torch.zeros(4, 2).t())),
        (TypeError, r"cfgfast: nu must have the dtype of pred_cond \(BFloat16\), got Float",
         dict(pred_cond=e.bfloat16(), pred_uncond=e.bfloat16(), nu=e.clone())),
        (ValueError, "cfgfast: nu must have the shape of z", dict(nu=torch.zeros(2, 5))),
        (ValueError, "cfgfast: coef must hold 10 numbers, got 7", dict(coef=coef[:7])),
        (ValueError, "cfgfast: x_prev must not overlap z", dict(x_prev=z)),
        (ValueError, "cfgfast: x_prev must not overlap out", dict(x_prev="out")),
        (ValueError, "cfgfast: x_prev must not overlap pred_cond", dict(x_prev=e)),
    ]
    for error, message, change in bad_calls:
        kw = dict(out=torch.full((2, 4), 7.0), z=z, pred_cond=e, pred_uncond=e, weights=w2, x_prev=None, nu=None,
                  noise=None, coef=coef)
        kw.update(change)
        if isinstance(kw["x_prev"], str):
            kw["x_prev"] = kw["out"]
        with pytest.raises(error, match=message):
            op.guided_step_(kw["out"], kw["z"], kw["pred_cond"], kw["pred_uncond"], kw["weights"], kw["x_prev"],
                            kw["nu"], kw["noise"], kw["coef"], 0, 0, 0, None)
        assert (kw["out"] == 7.0).all()
    # out and z over the same memory through two storages (NumPy): a partial overlap ATen does not see
    memory = np.random.default_rng(0).random(601).astype(np.float32)
    out, z = torch.from_numpy(memory)[1:].view(2, 300), torch.from_numpy(memory)[:-1].view(2, 300)
    e = torch.zeros(2, 300)
    with pytest.raises(ValueError, match=r"cfgfast: out must not partly overlap z \(it may be z itself"):
        op.guided_step_(out, z, e, e, w2, None, None, None, coef, 0, 0, 0, None)
    # the state over the bytes of an input through another storage: refused by address, not only by storage
    state = torch.from_numpy(memory)[1:].view(2, 300)
    with pytest.raises(ValueError, match="cfgfast: x_prev must not overlap z"):
        op.guided_step_(torch.empty(2, 300), z, e, e, w2, state, None, None, coef, 0, 0, 0, None)
    op.guided_step_(z, z, e, e, w2, None, None, None, coef, 0, 0, 0, None)  # z itself: the in-place step
    # a non-contiguous input is copied before out is written: its memory may span out's
    buffer = torch.zeros(3, 2, 8)
    out, z, e = buffer[1], buffer[::2, 0], torch.zeros(2, 8)
    ddpm = cfgfast.step_table("ddpm", [-1.0, 1.0])[0].tolist()
    want, _ = reference_step(z.clone(), e, e, w2, None, None, ddpm, torch.zeros(2, 8), None)
    op.guided_step_(out, z, e, e, w2, None, None, torch.zeros(2, 8), ddpm, 0, 0, 0, None)
    torch.testing.assert_close(out, want)
    # nu, a non-contiguous slice of the model's output (learned variance's second half of the channels)
    model_out = torch.randn(2, 6, 5)
    o_c, nu = model_out[:, :3], model_out[:, 3:]
    z, e = torch.randn(2, 3, 5), torch.zeros(2, 3, 5)
    noise = torch.randn(2, 3, 5)
    row = row_of("learned-variance")
    want, _ = reference_step(z, o_c, e, w2, None, nu, row, noise, None)
    out = torch.empty_like(z)
    op.guided_step_(out, z, o_c, e, w2, None, nu, noise, row, 0, 0, 0, None)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    # the table step: out or x_prev over the table's bytes (other threads read the table while they are written)
    z = torch.randn(1, 4)
    table = cfgfast.step_table("ddpm", [-1.0, 1.0])
    alias = torch.from_numpy(table.numpy()).view(torch.float32).view(-1)[:4].view(1, 4)  # another storage, same memory
    with pytest.raises(ValueError, match="cfgfast: out must not partly overlap coef_table"):
        op.guided_step_table_(alias, z, z, z, ones, None, None, table, torch.tensor([0]), 0, 0, None)
    with pytest.raises(ValueError, match="cfgfast: x_prev must not overlap coef_table"):
        op.guided_step_table_(torch.empty(1, 4), z, z, z, ones, alias, None, table, torch.tensor([0]), 0, 0, None)
    with pytest.raises(ValueError, match=r"cfgfast: coef_table must be a float64 tensor of shape \[T, 10\]"):
        op.guided_step_table_(torch.empty(1, 4), z, z, z, ones, None, None, torch.ones(1, 7, dtype=torch.float64),
                              torch.tensor([0]), 0, 0, None)
    # clip as the public API takes it
    for clip in (float("nan"), -1.0, 0.0, float("inf"), float("-inf"), 1e39):  # 1e39: infinite in float32
        with pytest.raises(ValueError, match="cfgfast: clip must be positive and finite in float32"):
            op.guided_step_(torch.empty_like(z), z, z, z, ones, None, None, None, coef, 0, 0, 0, clip)
        with pytest.raises(ValueError, match="cfgfast: clip must be positive and finite in float32"):
            op.guided_step_table_(torch.empty_like(z), z, z, z, ones, None, None, table, torch.tensor([0]), 0, 0, clip)
