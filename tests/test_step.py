"""The guided step on every backend vs the reference vs float64 formulas: the paper's step (reverse_step, SPEC §2)
and the generalised step of every sampler (guided_step, SPEC §6).

The float64 oracle below is written from the spec independently of cfgfast.schedule: sigmoids and
1 - r formed directly (accurate in float64 for the gaps used here), mu from its *first* form.
Tolerance: the float32 evaluation rounds each product and sum once, so its error is a few float32 ulps
of the largest magnitude that enters the sum; we allow 16 ulps (2^-20) of that magnitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cfgfast
from conftest import backend_device

EPS_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP_BUDGET = 2.0**-20  # 16 float32 ulps, relative to the magnitude of the terms summed


def sigmoid64(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def step_float64(z, eps_cond, eps_uncond, w, lam, lam_next, v, noise, clip=None, last=False):
    """(z' in float64, magnitude of the terms summed) from SPEC §2; inputs as float64 numpy arrays."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    w = np.broadcast_to(np.asarray(w, dtype=np.float64).reshape(shape), z.shape)
    eps = (1 + w) * eps_cond - w * eps_uncond
    eps_mag = np.abs(1 + w) * np.abs(eps_cond) + np.abs(w) * np.abs(eps_uncond)
    alpha, sigma = math.sqrt(sigmoid64(lam)), math.sqrt(sigmoid64(-lam))
    x = (z - sigma * eps) / alpha
    x_mag = (np.abs(z) + sigma * eps_mag) / alpha
    if clip is not None:
        x = np.clip(x, -clip, clip)  # 1-Lipschitz: the error of x before clipping bounds it after
    if last:
        return x, x_mag
    alpha_next, sigma_next = math.sqrt(sigmoid64(lam_next)), math.sqrt(sigmoid64(-lam_next))
    r = math.exp(lam - lam_next)
    mean = r * (alpha_next / alpha) * z + (1 - r) * alpha_next * x
    var_small, var_large = (1 - r) * sigma_next**2, (1 - r) * sigma**2
    std = math.sqrt(var_small ** (1 - v) * var_large**v)
    if clip is None:
        # the kernels use mu's second form: alpha'/alpha z - (1 - r) alpha' sigma / alpha eps
        mag = alpha_next / alpha * np.abs(z) + (1 - r) * alpha_next * sigma / alpha * eps_mag
    else:
        mag = r * alpha_next / alpha * np.abs(z) + (1 - r) * alpha_next * x_mag
    return mean + std * noise, mag + std * np.abs(noise)


def as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def on(backend: str, *tensors):
    """The tensors moved to the backend's device (None stays None): the GPU backends take CUDA tensors."""
    device = backend_device(backend)
    moved = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def make_inputs(shape, eps_dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * scale
    eps_cond = torch.randn(shape, generator=g).to(eps_dtype)
    eps_uncond = torch.randn(shape, generator=g).to(eps_dtype)
    return z, eps_cond, eps_uncond


def check_against_float64(out, z, eps_cond, eps_uncond, w, lam, lam_next, v, noise, clip=None, last=False):
    assert out.dtype == torch.float32 and out.shape == z.shape
    w64 = as64(w) if isinstance(w, torch.Tensor) else np.full(z.shape[0], float(w))
    expected, mag = step_float64(as64(z), as64(eps_cond), as64(eps_uncond), w64, lam, lam_next, v,
                                 as64(noise) if noise is not None else 0.0, clip, last)
    err = np.abs(as64(out) - expected)
    bound = ULP_BUDGET * mag + 1e-30
    worst = np.argmax(err / bound)
    assert np.all(np.isfinite(as64(out))), "non-finite output (an element was not written?)"
    assert np.all(err <= bound), (
        f"max error {err.flat[worst]:.3g} exceeds bound {bound.flat[worst]:.3g} at flat index {worst} "
        f"(got {as64(out).flat[worst]}, expected {expected.flat[worst]})"
    )


GRID = cfgfast.sampling_lambdas(64).tolist()
# consecutive pairs of the sampling grid, both ends included, and wide jumps across the range
LAMBDA_PAIRS = [(GRID[0], GRID[1]), (GRID[1], GRID[2]), (GRID[31], GRID[32]), (GRID[-2], GRID[-1]),
                (-20.0, 20.0), (-5.0, 3.5), (0.0, 1e-3), (19.0, 20.0)]


@pytest.mark.parametrize("lam,lam_next", LAMBDA_PAIRS)
@pytest.mark.parametrize("eps_dtype", EPS_DTYPES, ids=str)
def test_step_matches_float64_formula(backend, lam, lam_next, eps_dtype):
    rng = np.random.default_rng(abs(hash((lam, lam_next))) % 2**32)
    v = float(rng.uniform())
    shape = (5, 201)  # 50 groups per sample: whole SIMD blocks, scalar groups and a partial group
    z, ec, eu, w = on(backend, *make_inputs(shape, eps_dtype, seed=1), torch.tensor([0.0, 0.3, 1.0, 4.0, 10.0]))
    seed, step = int(rng.integers(2**40)), int(rng.integers(1000))
    out = on(backend, torch.full(shape, float("nan")))  # poisoned: every element must be written
    cfgfast.reverse_step(z, ec, eu, lam, lam_next, w, v, seed=seed, step=step, index_offset=3, backend=backend,
                         out=out)
    noise = cfgfast.normal_noise(shape, seed, step=step, stream=1, index_offset=3, backend="reference")
    check_against_float64(out, z, ec, eu, w, lam, lam_next, v, noise)


# (2 * 8192 + 5,): past the CPU kernel's blocks of 8192 elements a sample; (3, 128, 128) with the batch of 3:
# 147k elements, where the CPU kernel splits the work over threads (one per 65536 elements)
@pytest.mark.parametrize("per_sample", [(1,), (7,), (4097,), (3, 5, 7), (2 * 8192 + 5,), (3, 128, 128)], ids=str)
@pytest.mark.parametrize("eps_dtype", EPS_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "clip", "last", "last-clip", "noise"])
def test_step_modes_and_odd_sizes(backend, per_sample, eps_dtype, mode):
    if backend_device(backend) == "cpu" and backend == "triton" and math.prod(per_sample) > 8192:
        pytest.skip("the CPU kernel's block and thread boundaries: too large for the Triton interpreter")
    shape = (3,) + per_sample
    z, ec, eu = on(backend, *make_inputs(shape, eps_dtype, seed=2, scale=2.0))
    lam, lam_next, v, w = -2.5, -1.75, 0.3, 2.0
    clip = 1.0 if "clip" in mode else None
    last = mode.startswith("last")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9)) if mode == "noise" else None
    noise, out = on(backend, noise, torch.full(shape, float("nan")))
    cfgfast.reverse_step(z, ec, eu, lam, lam_next, w, v, noise=noise, seed=11, step=5, clip=clip, last=last,
                         backend=backend, out=out)
    if noise is None and not last:
        noise = cfgfast.normal_noise(shape, 11, step=5, stream=1, backend="reference")
    check_against_float64(out, z, ec, eu, w, lam, lam_next, v, noise, clip, last)
    if clip is not None and last:
        assert out.abs().max() <= clip


@pytest.mark.parametrize("lam", [-20.0, -3.0, 0.0, 20.0])
def test_last_step_returns_x_prediction(backend, lam):
    shape = (4, 9)
    z, ec, eu, w = on(backend, *make_inputs(shape, torch.float32, seed=3), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    out = cfgfast.reverse_step(z, ec, eu, lam, lam, w, last=True, backend=backend)
    check_against_float64(out, z, ec, eu, w, lam, lam, 0.3, None, last=True)


def test_v_interpolates_the_variance():
    """v = 0 gives the posterior variance (1 - r) sigma'^2, v = 1 the forward one (1 - r) sigma^2."""
    shape = (2, 4096)
    z = torch.zeros(shape)
    zero = torch.zeros(shape)
    lam, lam_next = -1.0, 0.5
    r = math.exp(lam - lam_next)
    for v, var in ((0.0, (1 - r) * sigmoid64(-lam_next)), (1.0, (1 - r) * sigmoid64(-lam))):
        out = cfgfast.reverse_step(z, zero, zero, lam, lam_next, 0.0, v, seed=1)
        noise = cfgfast.normal_noise(shape, 1, step=0, stream=1)
        torch.testing.assert_close(out, math.sqrt(var) * noise, rtol=1e-6, atol=1e-7)


def test_noncontiguous_views_use_logical_order(backend, device):
    base = torch.randn(6, 3, 10, 8, device=device)
    z = base[::2, :, 1:9, :].transpose(2, 3)  # strided, non-contiguous, [3, 3, 8, 8]
    ec = torch.randn(3, 8, 8, 3, device=device).permute(0, 3, 1, 2).to(torch.bfloat16)  # channels-last-like
    eu = torch.randn(3, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    w = torch.tensor([0.5, 1.5, 3.0], device=device).flip(0)  # a view with a negative stride
    assert not z.is_contiguous() and not ec.is_contiguous()
    out = cfgfast.reverse_step(z, ec, eu, -4.0, -3.0, w, 0.2, seed=5, step=2, backend=backend)
    dense = cfgfast.reverse_step(z.contiguous(), ec.contiguous(), eu.contiguous(), -4.0, -3.0, w.contiguous(), 0.2,
                                 seed=5, step=2, backend=backend)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    noise = cfgfast.normal_noise(z.shape, 5, step=2, stream=1, backend="reference")
    check_against_float64(out, z, ec, eu, w, -4.0, -3.0, 0.2, noise)


def test_in_place_update(backend):
    z, ec, eu = on(backend, *make_inputs((4, 33), torch.float32, seed=4))
    expected = cfgfast.reverse_step(z, ec, eu, 1.0, 2.0, 1.0, seed=3, backend=backend)
    state = z.clone()
    result = cfgfast.reverse_step(state, ec, eu, 1.0, 2.0, 1.0, seed=3, backend=backend, out=state)
    assert result.data_ptr() == state.data_ptr()
    torch.testing.assert_close(state, expected, rtol=0, atol=0)


def test_in_kernel_noise_equals_explicit_spec_noise(backend):
    shape = (3, 2, 50)
    z, ec, eu = on(backend, *make_inputs(shape, torch.float32, seed=6))
    a = cfgfast.reverse_step(z, ec, eu, -1.0, -0.5, 2.0, seed=2**33 + 1, step=17, index_offset=40, backend=backend)
    noise = cfgfast.normal_noise(shape, 2**33 + 1, step=17, stream=1, index_offset=40, backend="reference")
    b = cfgfast.reverse_step(*on(backend, z, ec, eu), -1.0, -0.5, 2.0, noise=on(backend, noise), backend="reference")
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_batch_split_gives_the_same_samples(backend):
    """Noise follows the global sample index: a batch split with index_offset equals the whole."""
    shape = (6, 3, 5)
    z, ec, eu, w = on(backend, *make_inputs(shape, torch.float32, seed=7), torch.linspace(0, 5, 6))
    whole = cfgfast.reverse_step(z, ec, eu, 0.5, 1.0, w, seed=8, step=3, backend=backend)
    parts = [cfgfast.reverse_step(z[i:j], ec[i:j], eu[i:j], 0.5, 1.0, w[i:j], seed=8, step=3, index_offset=i,
                                  backend=backend) for i, j in ((0, 1), (1, 4), (4, 6))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def test_cpu_matches_reference_on_a_sampling_trajectory():
    """Chain the cpu step over a coarse grid with a fixed 'model' and compare to the reference chain."""
    if "cpu" not in cfgfast.available_backends():
        pytest.skip(f"cpu backend unavailable: {cfgfast._ext.error()}")
    lams = cfgfast.sampling_lambdas(16).tolist()
    shape = (4, 3, 8, 8)
    z_cpu = z_ref = cfgfast.normal_noise(shape, 0, step=0, stream=0)
    for t in range(len(lams) - 1):
        last = t == len(lams) - 2
        eps_c, eps_u = torch.tanh(z_ref) * 0.5, torch.tanh(z_ref) * 0.25  # the same eps for both chains
        z_cpu = cfgfast.reverse_step(z_cpu, eps_c, eps_u, lams[t], lams[t + 1], 1.5, seed=0, step=t, last=last,
                                     backend="cpu")
        z_ref = cfgfast.reverse_step(z_ref, eps_c, eps_u, lams[t], lams[t + 1], 1.5, seed=0, step=t, last=last,
                                     backend="reference")
        torch.testing.assert_close(z_cpu, z_ref, rtol=1e-5, atol=1e-5 * z_ref.abs().max().item())


def test_auto_backend_picks_cpu_kernel_on_cpu_tensors():
    from cfgfast.backends import choose

    expected = "cpu" if "cpu" in cfgfast.available_backends() else "reference"
    assert choose("auto", torch.device("cpu")).name == expected


def test_auto_order_on_cuda_tensors(monkeypatch):
    """On a CUDA device "auto" takes cuda, else triton, else the reference (the backends' refusals stood in for,
    so the order is checked without a GPU)."""
    from cfgfast import backends

    device = torch.device("cuda", 0)
    for refusing, expected in [((), "cuda"), (("cuda",), "triton"), (("cuda", "triton"), "reference")]:
        monkeypatch.setattr(backends, "_AUTO_CHOICE", {})
        for name in ("cuda", "triton", "reference"):
            monkeypatch.setattr(backends._BACKENDS[name], "refusals",
                                lambda d, name=name: ["stood in"] if name in refusing else [])
        assert backends.choose("auto", device).name == expected


def test_table_step_replays_the_per_step_loop(backend):
    """guided_step_table with a step counter, advanced after each call, gives the per-step loop's samples (the
    multistep state included): what one captured CUDA graph replays."""
    lams = cfgfast.sampling_lambdas(12).tolist()
    shape = (3, 2, 37)
    w = on(backend, torch.tensor([0.0, 1.0, 3.0]))
    for sampler in ("ddpm", "dpmpp_2m_sde"):
        table = cfgfast.step_table(sampler, lams)
        device_table, counter = on(backend, table, torch.zeros(1, dtype=torch.int64))
        z_table = z_loop = on(backend, cfgfast.normal_noise(shape, 4, step=0, stream=0))
        prev_table, prev_loop = on(backend, torch.zeros(shape), torch.zeros(shape))
        for t in range(len(lams)):
            o_c, o_u = torch.tanh(z_loop) * 0.5, torch.sin(z_loop) * 0.5
            z_loop = cfgfast.guided_step(z_loop, o_c, o_u, table[t], w, x_prev=prev_loop, seed=4, step=t,
                                         index_offset=2, backend=backend)
            z_table = cfgfast.guided_step_table(z_table, o_c, o_u, device_table, counter, w, x_prev=prev_table, seed=4,
                                                index_offset=2, backend=backend)
            counter += 1
            torch.testing.assert_close(z_table, z_loop, rtol=0, atol=0)
            torch.testing.assert_close(prev_table, prev_loop, rtol=0, atol=0)


def test_table_step_bad_input():
    z = torch.randn(2, 5)
    table = cfgfast.step_table("ddpm", cfgfast.sampling_lambdas(4))
    with pytest.raises(ValueError, match="coef_table must be a float64 tensor"):
        cfgfast.guided_step_table(z, z, z, table.float(), torch.zeros(1, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="step must be an int64 tensor"):
        cfgfast.guided_step_table(z, z, z, table, torch.zeros(2, dtype=torch.int64), 1.0)
    for backend in ("reference", "cpu"):
        if backend in cfgfast.available_backends():
            with pytest.raises(ValueError, match="step"):
                cfgfast.guided_step_table(z, z, z, table, torch.tensor([4]), 1.0, backend=backend)
    with pytest.raises(ValueError, match="lambdas must be increasing"):
        cfgfast.step_table("ddpm", [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"v must be in \[0, 1\]"):
        cfgfast.step_table("ddpm", [0.0, 1.0], v=2.0)


# ---- the generalised step of every sampler: each backend against the affine formula of
# csrc/include/cfgfast/step.h evaluated in float64 from the float64 coefficient row

def affine_float64(z, o_c, o_u, w, row, x_prev, nu, noise, clip, w_z=None):
    """(z', x~, magnitude of the terms summed) in float64; arrays as float64 numpy, row the 10 coefficients; w_z:
    the weights' third column (g + w_z z), per sample."""
    pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu = row
    shape = (-1,) + (1,) * (z.ndim - 1)
    w = np.broadcast_to(np.asarray(w, dtype=np.float64).reshape(shape), z.shape)
    g = (1 + w) * o_c - w * o_u
    g_mag = np.abs(1 + w) * np.abs(o_c) + np.abs(w) * np.abs(o_u)
    if w_z is not None:
        w_z = np.asarray(w_z, dtype=np.float64).reshape(shape)
        g = g + w_z * z
        g_mag = g_mag + np.abs(w_z) * np.abs(z)
    x = pred_z * z + pred_g * g
    x_mag = abs(pred_z) * np.abs(z) + abs(pred_g) * g_mag
    if clip is not None:
        x = np.clip(x, -clip, clip)
        mean = mean_z * z + mean_x * x
        mag = abs(mean_z) * np.abs(z) + abs(mean_x) * x_mag
    else:
        mean = direct_z * z + direct_g * g
        mag = abs(direct_z) * np.abs(z) + abs(direct_g) * g_mag
    mean = mean + uncond * o_u
    mag = mag + abs(uncond) * np.abs(o_u)
    if prev != 0:
        mean = mean + prev * x_prev
        mag = mag + abs(prev) * np.abs(x_prev)
    if noise_std != 0:
        scale = noise_std * (np.exp(noise_nu * nu) if nu is not None else 1.0)
        mean = mean + scale * noise
        mag = mag + np.abs(scale * noise) * (1 + (abs(noise_nu * nu) if nu is not None else 0))
    return mean, x, mag + 1e-30


def _rows():
    """(id, row) for every sampler and prediction type at a first, a middle and a last step."""
    lams = cfgfast.sampling_lambdas(9, spacing="uniform", lambda_min=-12.0, lambda_max=12.0).tolist()
    cases = []
    for sampler in cfgfast.SAMPLERS:
        for prediction_type in cfgfast.PREDICTION_TYPES:
            kwargs = dict(prediction_type=prediction_type, eta=0.7 if sampler == "ddim" else 0.0)
            table = cfgfast.step_table(sampler, lams, **kwargs)
            for t in (0, 4, 8):
                cases.append(pytest.param(table[t].tolist(), id=f"{sampler}-{prediction_type}-t{t}"))
    learned = cfgfast.step_table("ddpm", lams, learned_variance=True)
    cases.append(pytest.param(learned[4].tolist(), id="ddpm-learned-variance-t4"))
    return cases


@pytest.mark.parametrize("row", _rows())
@pytest.mark.parametrize("clip", [None, 1.5], ids=["noclip", "clip"])
def test_guided_step_matches_float64_formula(backend, row, clip):
    learned = row[9] != 0
    shape = (4, 203)
    z, o_c, o_u = on(backend, *make_inputs(shape, torch.float32, seed=12))
    g = torch.Generator().manual_seed(13)
    x_prev = on(backend, torch.randn(shape, generator=g))
    nu = on(backend, torch.rand(shape, generator=g) * 2 - 1) if learned else None
    w = on(backend, torch.tensor([0.0, 0.5, 2.0, 7.0]))
    state = x_prev.clone()
    out = on(backend, torch.full(shape, float("nan")))
    cfgfast.guided_step(z, o_c, o_u, torch.tensor(row), w, x_prev=state, nu=nu, seed=21, step=6, index_offset=1,
                        clip=clip, backend=backend, out=out)
    noise = cfgfast.normal_noise(shape, 21, step=6, stream=1, index_offset=1, backend="reference")
    expected, x, mag = affine_float64(as64(z), as64(o_c), as64(o_u), as64(w), row, as64(x_prev),
                                      None if nu is None else as64(nu), as64(noise), clip)
    err = np.abs(as64(out) - expected)
    assert np.all(err <= ULP_BUDGET * mag), f"max relative error {np.max(err / mag):.3g}"
    # the state holds this step's x~ (to the rounding of x~ itself)
    x_err = np.abs(as64(state) - x)
    x_mag = np.abs(x) + abs(row[0]) * np.abs(as64(z)) + abs(row[1]) * 10 * (np.abs(as64(o_c)) + np.abs(as64(o_u)))
    assert np.all(x_err <= ULP_BUDGET * x_mag + 1e-30)


@pytest.mark.parametrize("row", [r for r in _rows() if r.id.endswith("t4") and "-x0-" not in r.id])
@pytest.mark.parametrize("clip", [None, 1.5], ids=["noclip", "clip"])
def test_third_weight_column_adds_a_multiple_of_z(backend, row, clip):
    """The op's weights [B, 3]: g = (w_cond o_c - w_uncond o_u) + w_z z (APG's per-sample x~_c term), every
    backend against the float64 formula; w_z = 0 gives the two-column step."""
    shape = (4, 203)
    z, o_c, o_u = on(backend, *make_inputs(shape, torch.float32, seed=14))
    g = torch.Generator().manual_seed(15)
    x_prev = on(backend, torch.randn(shape, generator=g))
    nu = on(backend, torch.rand(shape, generator=g) * 2 - 1) if row[9] != 0 else None
    w = torch.tensor([0.0, 0.5, 2.0, 7.0])
    w_z = torch.tensor([0.25, -1.5, 0.0, 3.0])
    weights = on(backend, torch.stack([1 + w, w, w_z], dim=1))
    stepper = cfgfast.backends.choose(backend, z.device)
    state, out = x_prev.clone(), torch.full_like(z, float("nan"))
    stepper.guided_step(out, z, o_c, o_u, weights, state, nu, None, row, 21, 6, 1, clip)
    noise = cfgfast.normal_noise(shape, 21, step=6, stream=1, index_offset=1, backend="reference")
    expected, x, mag = affine_float64(as64(z), as64(o_c), as64(o_u), as64(w), row, as64(x_prev),
                                      None if nu is None else as64(nu), as64(noise), clip, w_z=as64(w_z))
    err = np.abs(as64(out) - expected)
    assert np.all(err <= ULP_BUDGET * mag), f"max relative error {np.max(err / mag):.3g}"
    # sample 2 (w_z = 0) as the two-column step gives it
    two = torch.full_like(z, float("nan"))
    stepper.guided_step(two, z, o_c, o_u, weights[:, :2].contiguous(), x_prev.clone(), nu, None, row, 21, 6, 1, clip)
    assert torch.equal(two[2], out[2])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_steps_draw_no_noise(backend, sampler):
    """A row without noise reads neither the seed nor an explicit noise tensor; a zero prev coefficient does not read
    the state (an uninitialised buffer at a multistep sampler's first step)."""
    lams = cfgfast.sampling_lambdas(6, spacing="uniform").tolist()
    row = cfgfast.step_table(sampler, lams)[0]
    assert row[6] == 0 and row[8] == 0
    z, o_c, o_u = on(backend, *make_inputs((3, 41), torch.float32, seed=14))
    runs = []
    for seed in (0, 2**40 + 3):
        state = on(backend, torch.full((3, 41), float("nan")))
        runs.append(cfgfast.guided_step(z, o_c, o_u, row, 2.0, x_prev=state, seed=seed, step=1, backend=backend))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert bool(torch.isfinite(runs[0]).all())
    with_noise = cfgfast.guided_step(z, o_c, o_u, row, 2.0, noise=on(backend, torch.full((3, 41), float("nan"))),
                                     backend=backend)
    torch.testing.assert_close(with_noise, runs[0], rtol=0, atol=0)


def test_reverse_step_is_the_ddpm_row(backend):
    """The paper's step is the "ddpm" sampler's row on an epsilon model."""
    z, ec, eu = on(backend, *make_inputs((2, 19), torch.float32, seed=15))
    lams = [-3.0, -1.0]
    a = cfgfast.reverse_step(z, ec, eu, lams[0], lams[1], 1.5, 0.4, seed=7, step=2, backend=backend)
    b = cfgfast.guided_step(z, ec, eu, cfgfast.step_table("ddpm", lams, v=0.4)[0], 1.5, seed=7, step=2,
                            backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_w_changed_in_place_between_calls_is_read_again():
    """The step keeps the weights of the last w it saw: a w changed in place is read again (and checked)."""
    z, o_c, o_u = make_inputs((2, 9), torch.float32, seed=16)
    row = cfgfast.step_table("ddim", [-1.0, 0.0])[0]
    w = torch.tensor([1.0, 2.0])
    first = cfgfast.guided_step(z, o_c, o_u, row, w, backend="reference")
    w.mul_(3.0)
    torch.testing.assert_close(cfgfast.guided_step(z, o_c, o_u, row, w, backend="reference"),
                               cfgfast.guided_step(z, o_c, o_u, row, torch.tensor([3.0, 6.0]), backend="reference"))
    assert not torch.equal(first, cfgfast.guided_step(z, o_c, o_u, row, w, backend="reference"))
    w[1] = float("nan")
    with pytest.raises(ValueError, match="w must be finite"):
        cfgfast.guided_step(z, o_c, o_u, row, w, backend="reference")
    # a number, then another
    a = cfgfast.guided_step(z, o_c, o_u, row, 2.0, backend="reference")
    b = cfgfast.guided_step(z, o_c, o_u, row, 5.0, backend="reference")
    torch.testing.assert_close(b, cfgfast.guided_step(z, o_c, o_u, row, torch.full((2,), 5.0), backend="reference"))
    assert not torch.equal(a, b)


def _cpu_backends():
    """The backends that run on CPU tensors here (triton: under TRITON_INTERPRET=1)."""
    from cfgfast.backends import _BACKENDS

    return {name: b for name, b in _BACKENDS.items() if not b.refusals(torch.device("cpu"))}


def _bad_memory_cases():
    """Inputs only the memory checks refuse: (name, out, z, x_prev)."""
    shrunk = torch.randn(16)
    z_shrunk = shrunk.view(2, 8)
    shrunk.untyped_storage().resize_(32)  # the view needs 64 bytes
    buffer = torch.randn(40)
    with torch.inference_mode():
        frozen = torch.empty(2, 8)
    z = torch.randn(2, 8)
    return [
        ("z's storage shrunk", torch.empty(2, 8), z_shrunk, None),
        ("out over part of z", buffer[2:18].view(2, 8), buffer[:16].view(2, 8), None),
        ("x_prev is z", torch.empty(2, 8), z, z),
        ("x_prev over out", buffer[24:40].view(2, 8), z, buffer[20:36].view(2, 8)),
        ("out made under inference_mode", frozen, z, None),
    ]


@pytest.mark.parametrize("case", range(5))
def test_every_backend_refuses_alike(case):
    """One contract for the step's tensors (csrc/op_checks.h, and its twin in cfgfast/_checks.py for the reference
    and Triton backends): every backend refuses the same input with the same error and words, memory included."""
    what, out, z, x_prev = _bad_memory_cases()[case]
    row = cfgfast.step_table("ddpm", [-1.0, 0.0, 1.0])[0].tolist()
    errors = {}
    for name, backend in _cpu_backends().items():
        with pytest.raises((TypeError, ValueError)) as error:
            backend.guided_step(out, z, torch.randn(2, 8), torch.randn(2, 8), torch.ones(2, 2), x_prev, None, None,
                                row, 0, 0, 0, None)
        errors[name] = (type(error.value), str(error.value))
    assert len(set(errors.values())) == 1, (what, errors)
    assert next(iter(errors.values()))[1].startswith("cfgfast: "), (what, errors)


def test_every_backend_takes_a_strided_input_over_out():
    """A non-contiguous input is copied before out is written: every backend takes one whose memory spans out's,
    gives the step of its copy and writes nothing but out."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(3, 2, 8, generator=generator)
    o_c, o_u = torch.randn(2, 8, generator=generator), torch.randn(2, 8, generator=generator)
    weights = torch.tensor([[2.5, 1.5], [1.0, 0.0]])
    row = cfgfast.step_table("ddpm", [-1.0, 0.0, 1.0])[0].tolist()
    want = torch.empty(2, 8)
    cfgfast.backends.choose("reference", torch.device("cpu")).guided_step(
        want, base[::2, 0].clone(), o_c, o_u, weights, None, None, None, row, 5, 0, 0, None)
    for name, backend in _cpu_backends().items():
        buffer = base.clone()
        out, z = buffer[1], buffer[::2, 0]  # z: rows 0 and 2 of the buffer, on both sides of out
        backend.guided_step(out, z, o_c, o_u, weights, None, None, None, row, 5, 0, 0, None)
        torch.testing.assert_close(out, want, msg=name)
        assert torch.equal(buffer[::2], base[::2]), name
