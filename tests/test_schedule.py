"""The schedule of SPEC §1 and the step coefficients of SPEC §2, against independent float64 / mpmath values."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

import cfgfast
from cfgfast.samplers import StepCoefficients, sampler_step

RANGES = [(-20.0, 20.0), (-3.5, 12.25), (-30.0, 30.0), (0.5, 1.5), (-7, 3)]


def sech_map_mp(u, lambda_min, lambda_max, dps=40):
    """lam = -2 log tan(a u + b) of SPEC §1 at 40 digits, for scalar u."""
    with mpmath.workdps(dps):
        b = mpmath.atan(mpmath.exp(-mpmath.mpf(lambda_max) / 2))
        a = mpmath.atan(mpmath.exp(-mpmath.mpf(lambda_min) / 2)) - b
        return float(-2 * mpmath.log(mpmath.tan(a * mpmath.mpf(u) + b)))


def sech_map_tol(lam):
    """Float64 error bound of -2 log tan(theta): |dlam/dtheta| = 4 cosh(lam / 2), theta good to ~eps pi/2."""
    return 4 * np.finfo(np.float64).eps * (1 + 2 * np.pi * np.cosh(np.asarray(lam) / 2))


def sech_map_np(u, lambda_min, lambda_max):
    b = np.arctan(np.exp(-lambda_max / 2))
    a = np.arctan(np.exp(-lambda_min / 2)) - b
    return -2 * np.log(np.tan(a * np.asarray(u, dtype=np.float64) + b))


def sech_cdf_np(lam, lambda_min, lambda_max):
    """P(Lambda <= lam) for Lambda = sech_map(U): the map decreases in u, so this is 1 - u(lam)."""
    b = np.arctan(np.exp(-lambda_max / 2))
    a = np.arctan(np.exp(-lambda_min / 2)) - b
    return 1.0 - (np.arctan(np.exp(-np.asarray(lam) / 2)) - b) / a


# ---------------------------------------------------------------- sampling_lambdas


@pytest.mark.parametrize("lambda_min, lambda_max", RANGES)
@pytest.mark.parametrize("steps", [2, 3, 7, 256, 1001])
def test_sampling_lambdas_formula(steps, lambda_min, lambda_max):
    lam = cfgfast.sampling_lambdas(steps, lambda_min, lambda_max)
    assert lam.dtype == torch.float64 and lam.shape == (steps,)
    u = 1.0 - np.arange(steps) / (steps - 1)
    # Same formula, numpy float64: equal to a few float64 ulps of the magnitudes involved.
    expected = sech_map_np(u, lambda_min, lambda_max)
    expected[0], expected[-1] = lambda_min, lambda_max
    np.testing.assert_allclose(lam.numpy(), expected, rtol=1e-14, atol=1e-13)
    # Accuracy: 40-digit values, to the conditioning of the float64 formula (tan near pi/2 at lambda_min).
    exact = np.array([sech_map_mp(1.0 - t / (steps - 1), lambda_min, lambda_max) for t in range(steps)])
    assert np.all(np.abs(lam.numpy() - exact) <= sech_map_tol(exact))


@pytest.mark.parametrize("lambda_min, lambda_max", RANGES + [(-20.0, -19.999), (19.5, 20.0 + 2**-40)])
@pytest.mark.parametrize("steps", [2, 3, 100, 100_000])
def test_sampling_lambdas_exact_ends_and_increasing(steps, lambda_min, lambda_max):
    lam = cfgfast.sampling_lambdas(steps, lambda_min, lambda_max)
    # The last step is recognised by lam == lambda_max: exact equality, no tolerance.
    assert lam[0].item() == lambda_min and lam[-1].item() == lambda_max
    assert bool((lam[1:] > lam[:-1]).all()), "sampling grid must be strictly increasing"
    assert lam.dtype == torch.float64 and bool(torch.isfinite(lam).all())


def test_sampling_lambdas_default_range_and_uneven_spacing():
    lam = cfgfast.sampling_lambdas(5)
    assert lam.tolist()[0] == -20.0 and lam.tolist()[-1] == 20.0
    # Evenly spaced in u, not in lambda: the middle point is lam(u=1/2) (= 0 for a symmetric range).
    assert lam[2].item() == pytest.approx(sech_map_mp(0.5, -20.0, 20.0), abs=1e-13)
    gaps = torch.diff(lam)
    assert gaps.max() / gaps.min() > 1.5


# ---------------------------------------------------------------- training_lambdas


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lambda_min, lambda_max", RANGES)
def test_training_lambdas_formula_and_ends(dtype, lambda_min, lambda_max):
    u = torch.tensor([0.0, 1e-9, 0.1, 0.25, 0.5, 0.7, 0.999999, 1.0], dtype=dtype)
    lam = cfgfast.training_lambdas(u, lambda_min, lambda_max)
    assert lam.dtype == dtype and lam.shape == u.shape
    exact = np.array([sech_map_mp(float(x), lambda_min, lambda_max) for x in u.double()])
    # float64: to the formula's conditioning; float32: plus one rounding of the float64 value.
    rtol = 0 if dtype == torch.float64 else 2**-24
    assert np.all(np.abs(lam.double().numpy() - exact) <= rtol * np.abs(exact) + sech_map_tol(exact))
    # u = 0 -> lambda_max, u = 1 -> lambda_min
    assert lam[0].item() == pytest.approx(lambda_max, rel=1e-7 if dtype == torch.float32 else 1e-13, abs=1e-13)
    assert lam[-1].item() == pytest.approx(lambda_min, rel=1e-7 if dtype == torch.float32 else 1e-13, abs=1e-13)
    assert bool((lam >= lambda_min).all() and (lam <= lambda_max).all())
    assert bool((lam[1:] <= lam[:-1]).all())  # decreasing in u


def test_training_lambdas_shape_kept():
    u = torch.rand(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lam = cfgfast.training_lambdas(u)
    assert lam.shape == (3, 5, 7)
    np.testing.assert_allclose(lam.numpy(), sech_map_np(u.numpy(), -20.0, 20.0), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lambda_min, lambda_max", [(-20.0, 20.0), (-3.5, 12.25)])
def test_training_lambdas_distribution(dtype, lambda_min, lambda_max):
    """KS check of lam(U), U ~ U(0, 1), against the truncated-sech CDF 1 - u(lam) (the map decreases in u)."""
    n = 200_000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1234)).to(dtype)
    lam = np.sort(cfgfast.training_lambdas(u, lambda_min, lambda_max).double().numpy())
    cdf = sech_cdf_np(lam, lambda_min, lambda_max)
    i = np.arange(1, n + 1)
    ks = max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n))
    # 1.95 / sqrt(n) is the 0.1% critical value; the fixed seed makes the test deterministic.
    assert ks < 1.95 / math.sqrt(n), f"KS distance {ks:.2e}"
    # The truncation is visible at the ends: P(lam < 0) = 1 - u(0)
    assert np.mean(lam < 0) == pytest.approx(sech_cdf_np(0.0, lambda_min, lambda_max), abs=5 / math.sqrt(n))


@pytest.mark.parametrize("lambda_min, lambda_max", [(-20.0, 20.0), (-3.5, 12.25)])
def test_training_lambdas_uniform(lambda_min, lambda_max):
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    lam = cfgfast.training_lambdas(u, lambda_min, lambda_max, uniform=True)
    assert lam.dtype == torch.float64
    # Affine in u onto the whole range, in the direction of the sech map (u = 0 -> lambda_max).
    gaps = torch.diff(lam)
    np.testing.assert_allclose(gaps.numpy(), -(lambda_max - lambda_min) / 4, rtol=1e-14)
    assert [lam[0].item(), lam[-1].item()] == pytest.approx([lambda_max, lambda_min], abs=1e-14)
    # Uniform in lambda: KS against the uniform CDF.
    n = 100_000
    big = cfgfast.training_lambdas(torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)),
                                   lambda_min, lambda_max, uniform=True).numpy()
    cdf = (np.sort(big) - lambda_min) / (lambda_max - lambda_min)
    i = np.arange(1, n + 1)
    assert max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)) < 1.95 / math.sqrt(n)


# ---------------------------------------------------------------- alpha_sigma

LAMS = [-200.0, -50.0, -20.0, -19.999, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0, 20.001, 50.0, 200.0]


def sigmoid_mp(x, dps=40):
    with mpmath.workdps(dps):
        return float(1 / (1 + mpmath.exp(-mpmath.mpf(x))))


@pytest.mark.parametrize("lam", LAMS + [-1, 3])
def test_alpha_sigma_float(lam):
    alpha, sigma = cfgfast.alpha_sigma(lam)
    assert isinstance(alpha, float) and isinstance(sigma, float)
    assert 0 < alpha <= 1 and 0 < sigma <= 1, "no underflow to 0, no NaN"
    # alpha^2 = sigmoid(lam) and sigma^2 = sigmoid(-lam), each to relative float64 accuracy (even e^-200).
    assert alpha**2 == pytest.approx(sigmoid_mp(lam), rel=1e-14)
    assert sigma**2 == pytest.approx(sigmoid_mp(-lam), rel=1e-14)
    assert alpha**2 + sigma**2 == pytest.approx(1.0, abs=4e-16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_sigma_tensor(dtype):
    lam = torch.tensor(LAMS, dtype=dtype).reshape(1, -1)
    alpha, sigma = cfgfast.alpha_sigma(lam)
    assert alpha.dtype == torch.float64 and sigma.dtype == torch.float64 and alpha.shape == lam.shape
    assert bool(torch.isfinite(alpha).all() and torch.isfinite(sigma).all())
    assert bool((alpha > 0).all() and (sigma > 0).all())
    lam64 = lam.double().flatten().tolist()
    np.testing.assert_allclose((alpha**2).flatten().numpy(), [sigmoid_mp(x) for x in lam64], rtol=1e-14)
    np.testing.assert_allclose((sigma**2).flatten().numpy(), [sigmoid_mp(-x) for x in lam64], rtol=1e-14)
    np.testing.assert_allclose((alpha**2 + sigma**2).numpy(), 1.0, rtol=0, atol=4e-16)
    # The tensor and the float forms agree.
    for x, a, s in zip(lam64, alpha.flatten().tolist(), sigma.flatten().tolist()):
        assert (a, s) == pytest.approx(cfgfast.alpha_sigma(x), rel=1e-15)


# ---------------------------------------------------------------- the samplers' coefficient rows (SPEC §6)


def sampler_row_mp(sampler, prediction_type, lam_prev, lam, lam_next, v, eta, dps=50, cfgpp=False):
    """The coefficients of one step straight from SPEC §6's definitions, at 50 digits (no log-space tricks)."""
    with mpmath.workdps(dps):
        lam, lam_next, v, eta = (mpmath.mpf(x) for x in (lam, lam_next, v, eta))
        sig = lambda x: 1 / (1 + mpmath.exp(-x))  # noqa: E731
        alpha, sigma = mpmath.sqrt(sig(lam)), mpmath.sqrt(sig(-lam))
        alpha_next, sigma_next = mpmath.sqrt(sig(lam_next)), mpmath.sqrt(sig(-lam_next))
        r = mpmath.exp(lam - lam_next)
        pred_z, pred_g = {"epsilon": (1 / alpha, -sigma / alpha), "v_prediction": (alpha, -sigma),
                          "sample": (mpmath.mpf(0), mpmath.mpf(1))}[prediction_type]
        prev = noise_std = uncond = mpmath.mpf(0)
        if sampler == "ddpm":
            mean_z, mean_x = r * alpha_next / alpha, (1 - r) * alpha_next
            noise_std = mpmath.sqrt(((1 - r) * sigma_next**2) ** (1 - v) * ((1 - r) * sigma**2) ** v)
        elif sampler == "ddim":  # z' = alpha' x + sqrt(sigma'^2 - s^2) (z - alpha x) / sigma + s n
            noise_std = eta * mpmath.sqrt(1 - r) * sigma_next
            k = mpmath.sqrt(sigma_next**2 - noise_std**2)
            mean_z, mean_x = k / sigma, alpha_next - k * alpha / sigma
            if cfgpp:  # the direction from the unconditional output: (z - alpha (pred_z z + pred_g o_u)) / sigma
                mean_z, mean_x = k / sigma * (1 - alpha * pred_z), alpha_next
                uncond = -k * alpha * pred_g / sigma
        else:
            h = (lam_next - lam) / 2
            sde = sampler == "dpmpp_2m_sde"
            mean_z = sigma_next / sigma * (mpmath.exp(-h) if sde else 1)
            gain = alpha_next * (1 - mpmath.exp(-2 * h if sde else -h))
            if sde:
                noise_std = sigma_next * mpmath.sqrt(1 - mpmath.exp(-2 * h))
            if lam_prev is None:
                mean_x = gain
            else:
                rho = ((lam - mpmath.mpf(lam_prev)) / 2) / h
                mean_x, prev = gain * (1 + 1 / (2 * rho)), -gain / (2 * rho)
        values = dict(pred_z=pred_z, pred_g=pred_g, mean_z=mean_z, mean_x=mean_x, direct_z=mean_z + mean_x * pred_z,
                      direct_g=mean_x * pred_g, prev=prev, uncond=uncond, noise_std=noise_std, noise_nu=0)
        return {k: float(x) for k, x in values.items()}


STEP_GRID = [
    (lam, lam + gap, v)
    for lam in (-20.0, -19.99, -5.0, -0.3, 0.0, 2.5, 10.0, 19.9, 20.0 - 1e-6)
    for gap in (1e-6, 1e-3, 0.17, 3.0)
    for v in (0.0, 0.3, 1.0)
] + [(-20.0, 20.0, 0.3), (-20.0, -20.0 + 1e-9, 0.2), (19.999999, 20.0, 0.3), (-50.0, -49.5, 0.3), (45.0, 50.0, 0.5)]


@pytest.mark.parametrize("sampler", cfgfast.SAMPLERS)
@pytest.mark.parametrize("lam, lam_next, v", STEP_GRID)
def test_sampler_rows_high_precision(sampler, lam, lam_next, v):
    # 1e-12 relative: the log-space float64 forms reach ~1e-14; forming 1 - r as 1 - exp(lam - lam_next)
    # would be off by ~eps / gap = 1e-10 at gap 1e-6, and 1 - sigmoid(.) loses everything at |lam| = 20+.
    eta = v if sampler == "ddim" else 0.0
    for prediction_type in cfgfast.PREDICTION_TYPES:
        for lam_prev in (None, lam - 0.5 * (lam_next - lam)):
            grid = [lam, lam_next] if lam_prev is None else [lam_prev, lam, lam_next]
            coef = sampler_step(sampler, grid, len(grid) - 2, prediction_type=prediction_type, eta=eta, v=v)
            assert isinstance(coef, StepCoefficients)
            exact = sampler_row_mp(sampler, prediction_type, lam_prev, lam, lam_next, v, eta)
            for name, value in exact.items():
                got = getattr(coef, name)
                scale = abs(value) if name != "direct_z" else abs(exact["mean_z"]) + abs(exact["mean_x"] * exact["pred_z"])
                assert abs(got - value) <= 1e-12 * scale, \
                    f"{name} of {sampler}/{prediction_type} at ({lam_prev}, {lam}, {lam_next}, {v}): {got} vs {value}"
            assert coef.as_list() == [getattr(coef, k) for k in exact]  # the kernels' order
    if sampler == "ddim":  # CFG++'s rows
        for prediction_type in cfgfast.PREDICTION_TYPES:
            coef = sampler_step("ddim", [lam, lam_next], 0, prediction_type=prediction_type, eta=eta, guidance="cfgpp")
            exact = sampler_row_mp("ddim", prediction_type, None, lam, lam_next, v, eta, cfgpp=True)
            for name, value in exact.items():
                got = getattr(coef, name)
                scale = abs(value) if name != "direct_z" else abs(exact["mean_z"]) + abs(exact["mean_x"] * exact["pred_z"])
                # (epsilon: mean_z is k/sigma (1 - alpha / alpha) = 0, 1e-51 at 50 digits)
                assert abs(got - value) <= 1e-12 * scale + 1e-40, f"cfgpp {name} of {prediction_type}: {got} vs {value}"


@pytest.mark.parametrize("prediction_type", cfgfast.PREDICTION_TYPES)
def test_last_row_returns_x(prediction_type):
    """The last step of every sampler: z' = x~ = pred_z z + pred_g g, no noise, no state."""
    for sampler in cfgfast.SAMPLERS:
        row = cfgfast.step_table(sampler, [-1.0, 2.0], prediction_type=prediction_type)[-1].tolist()
        pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu = row
        assert (mean_z, mean_x, direct_z, direct_g) == (0.0, 1.0, pred_z, pred_g)
        assert prev == uncond == noise_std == noise_nu == 0.0


def test_learned_variance_row_interpolates_the_logs():
    """With learned variance the noise std is exp(0.5 ((1 - v) log small + v log large)) at v = (nu + 1) / 2."""
    lam, lam_next = -1.0, 0.5
    row = cfgfast.step_table("ddpm", [lam, lam_next], learned_variance=True)[0].tolist()
    for nu in (-1.0, -0.2, 0.0, 0.7, 1.0):
        v = (nu + 1) / 2
        fixed = cfgfast.step_table("ddpm", [lam, lam_next], v=v)[0].tolist()
        assert row[8] * math.exp(row[9] * nu) == pytest.approx(fixed[8], rel=1e-14)
        assert row[:8] == pytest.approx(fixed[:8], rel=1e-15)


def test_uniform_spacing():
    lams = cfgfast.sampling_lambdas(5, -8.0, 4.0, spacing="uniform")
    assert lams.dtype == torch.float64
    assert lams.tolist() == pytest.approx([-8.0, -5.0, -2.0, 1.0, 4.0], rel=0, abs=1e-15)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("steps, error", [(1, ValueError), (0, ValueError), (-5, ValueError), (2**32, ValueError), (2.0, TypeError),
                                          ("8", TypeError), (None, TypeError), (True, TypeError)])
def test_sampling_lambdas_bad_steps(steps, error):
    with pytest.raises(error, match="steps"):
        cfgfast.sampling_lambdas(steps)


BAD_RANGES = [
    (dict(lambda_min=float("nan")), "lambda_min"),
    (dict(lambda_min=float("-inf")), "lambda_min"),
    (dict(lambda_max=float("inf")), "lambda_max"),
    (dict(lambda_max=float("nan")), "lambda_max"),
    (dict(lambda_min="-20"), "lambda_min"),
    (dict(lambda_min=5.0, lambda_max=5.0), "lambda_min"),
    (dict(lambda_min=6.0, lambda_max=5.0), "lambda_min"),
    (dict(lambda_min=30.0), "lambda_min"),
]


@pytest.mark.parametrize("kwargs, name", BAD_RANGES)
def test_sampling_lambdas_bad_range(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cfgfast.sampling_lambdas(16, **kwargs)


@pytest.mark.parametrize("kwargs, name", BAD_RANGES)
def test_training_lambdas_bad_range(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cfgfast.training_lambdas(torch.rand(4, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize("steps, lambda_min, lambda_max", [(50, -1e-14, 0.0), (1000, 20 - 1e-13, 20.0)])
def test_sampling_lambdas_refuses_more_steps_than_float64_holds_in_the_range(steps, lambda_min, lambda_max):
    """Rounding made such grids decrease and leave the range; sample() then failed with non-finite samples."""
    with pytest.raises(ValueError, match=f"steps={steps} is too many for the range"):
        cfgfast.sampling_lambdas(steps, lambda_min, lambda_max)
    lam = cfgfast.sampling_lambdas(3, lambda_min, lambda_max)  # few steps fit
    assert lam[0] == lambda_min and lam[-1] == lambda_max and bool((lam.diff() > 0).all())


def test_training_lambdas_refuses_meta_u():
    with pytest.raises(ValueError, match="u must have values"):
        cfgfast.training_lambdas(torch.rand(4, device="meta"))


@pytest.mark.parametrize("u", [[0.5, 0.25], 0.5, np.array([0.5]), torch.tensor([0, 1])])
def test_training_lambdas_bad_u_type(u):
    with pytest.raises(TypeError, match="u"):
        cfgfast.training_lambdas(u)


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")])
def test_training_lambdas_u_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="u"):
        cfgfast.training_lambdas(torch.tensor([0.5, bad], dtype=torch.float64))


def test_a_grid_given_as_python_floats_keeps_float64():
    """A list of Python floats is taken at float64, not first rounded to torch's default float32 (which made
    [1.0, 1.00000001] "not increasing" and moved other grids by ~1e-9)."""
    grid = [-5.0, 0.1, 1.0, 1.00000001, 5.0]
    same = dict(rtol=0, atol=0)
    table = lambda lams: cfgfast.step_table("dpmpp_2m_sde", lams)  # noqa: E731
    torch.testing.assert_close(table(grid), table(torch.tensor(grid, dtype=torch.float64)), **same)
    torch.testing.assert_close(table(lam for lam in grid),  # a generator, read once
                               table(torch.tensor(grid, dtype=torch.float64)), **same)
    torch.testing.assert_close(table(range(-2, 3)), table(torch.arange(-2.0, 3.0, dtype=torch.float64)), **same)
