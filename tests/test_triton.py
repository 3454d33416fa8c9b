"""The Triton backend's own tests (cfgfast/triton_step.py): its Philox and Box–Muller against the plain-PyTorch
reference (cfgfast/reference.py), the noise kernel, a compact check of the guided step against
guided_step_reference in each of its modes, and the ops' registration, checks, refusals and launch limits. Every
backend's step over the samplers, dtypes and shapes is tests/test_step.py's battery.

Runs on a CUDA GPU, or without one under the Triton interpreter on CPU tensors:
    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py
Shapes stay small: the interpreter runs each program in NumPy.

Tolerances (measured under the interpreter; see each constant):
- Philox words: exactly equal.
- Normals vs the float64 Box–Muller of SPEC §3: NOISE_RTOL relative. float32 ln, sin, cos (each within about
  1 ulp), a correctly rounded sqrt and one product; the angle is reduced exactly to |a| <= pi/4 first, so
  the error stays relative even near the zeros of sin and cos. Measured under the interpreter over 1M normals
  (four seeds up to 2^64 - 1, both streams, steps and sample indices up to 2^32 - 1): max |err| / |n| = 2.7e-7
  (2.3 float32 eps), max |err| = 4.6e-7. NOISE_RTOL = 5e-7, the cpu backend's (tests/test_noise.py).
- The step vs guided_step_reference on the reference noise: |err| <= STEP_BUDGET * (magnitude of the terms
  summed, in float64). Both sides are float32 evaluations of the same formula in the same order, a few ulps of
  that magnitude each (a GPU also contracts a*b + c to fma and takes exp as ex2.approx, the reference does
  neither), and the normals differ by up to NOISE_RTOL. STEP_BUDGET = 2^-20 (16 ulps), tests/test_step.py's.
"""

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from cfgfast import triton_step
from cfgfast._checks import seed_as_int64
from cfgfast.reference import guided_step_reference, normal_noise_reference, philox4x32_10, words_to_normals
from cfgfast.samplers import StepCoefficients

NOISE_RTOL = 5e-7
NOISE_ATOL = 1e-12  # only for n = 0 exactly (a quarter turn), where float64 cos(pi/2) is 6e-17
STEP_BUDGET = 2.0**-20

INTERPRETED = triton_step.INTERPRETED
if triton_step.triton is None:
    DEVICES = []
    SKIP_REASON = triton_step.refusals(torch.device("cpu"))[0]
elif INTERPRETED:
    DEVICES = ["cpu"]  # the interpreter runs the kernels on CPU tensors
    SKIP_REASON = ""
elif torch.cuda.is_available():
    DEVICES = ["cuda"]
    SKIP_REASON = ""
else:
    DEVICES = []
    SKIP_REASON = "no CUDA GPU and TRITON_INTERPRET is not 1 (set it to run the Triton kernels on the CPU)"

pytestmark = pytest.mark.skipif(not DEVICES, reason=SKIP_REASON or "no device")
NEEDS_GPU = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                               reason="torch.compile of a Triton op needs a GPU (the interpreter cannot be traced)")


@pytest.fixture(params=DEVICES or ["none"])
def device(request):
    return torch.device(request.param)


EPS_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEEDS = [0, 2**32 + 5, 2**64 - 1]
KNOWN_ANSWERS = [  # SPEC §3, Random123's vectors: counter | key -> words
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
HELPER_BLOCK = 1024  # the helper kernels below: one word / one group per lane

# ---------------------------------------------------------------- the kernels' Philox and Box–Muller alone

if triton_step.triton is not None:
    import triton
    import triton.language as tl

    from cfgfast.triton_step import _philox, _seed_words, _words_to_normals

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _philox_words_kernel(x0_ptr, x1_ptr, x2_ptr, x3_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, seed_lo, seed_hi, numel,
                             BLOCK: tl.constexpr):
        """Raw Philox words for counters held in int64 (written back as int64 in [0, 2^32))."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        c0 = tl.load(c0_ptr + i, mask=mask, other=0).to(tl.uint32)
        c1 = tl.load(c1_ptr + i, mask=mask, other=0).to(tl.uint32)
        c2 = tl.load(c2_ptr + i, mask=mask, other=0).to(tl.uint32)
        c3 = tl.load(c3_ptr + i, mask=mask, other=0).to(tl.uint32)
        x0, x1, x2, x3 = _philox(seed_lo, seed_hi, c0, c1, c2, c3)
        tl.store(x0_ptr + i, x0.to(tl.int64), mask=mask)
        tl.store(x1_ptr + i, x1.to(tl.int64), mask=mask)
        tl.store(x2_ptr + i, x2.to(tl.int64), mask=mask)
        tl.store(x3_ptr + i, x3.to(tl.int64), mask=mask)

    @triton.jit
    def _words_to_normals_kernel(out_ptr, x0_ptr, x1_ptr, x2_ptr, x3_ptr, groups, BLOCK: tl.constexpr):
        """The Box–Muller mapping alone, [groups, 4] normals from four int64 word tensors."""
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 4 g overflows int32 from 2^29 groups
        mask = g < groups
        x0 = tl.load(x0_ptr + g, mask=mask, other=0).to(tl.uint32)
        x1 = tl.load(x1_ptr + g, mask=mask, other=0).to(tl.uint32)
        x2 = tl.load(x2_ptr + g, mask=mask, other=0).to(tl.uint32)
        x3 = tl.load(x3_ptr + g, mask=mask, other=0).to(tl.uint32)
        j = g[:, None] * 4 + tl.arange(0, 4)[None, :]
        tl.store(out_ptr + j, _words_to_normals(x0, x1, x2, x3), mask=j < 4 * groups)


def philox_words_triton(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 words of the kernels for counter tensors (values in [0, 2^32), one shape) under key (seed mod
    2^32, seed >> 32); four int64 tensors of 32-bit values."""
    counters = torch.broadcast_tensors(*(torch.as_tensor(c) for c in (c0, c1, c2, c3)))
    counters = [c.to(torch.int64).contiguous() for c in counters]
    words = [torch.empty_like(counters[0]) for _ in range(4)]
    numel = counters[0].numel()
    if numel:
        grid = (triton.cdiv(numel, HELPER_BLOCK),)
        _philox_words_kernel[grid](*words, *counters, *_seed_words(seed_as_int64(seed)), numel, BLOCK=HELPER_BLOCK)
    return tuple(words)


def words_to_normals_triton(x0, x1, x2, x3) -> torch.Tensor:
    """The kernels' Box–Muller on given words (int64 tensors of one shape [...]); float32 [..., 4]."""
    words = [torch.as_tensor(x).to(torch.int64).contiguous() for x in (x0, x1, x2, x3)]
    out = torch.empty(words[0].shape + (4,), dtype=torch.float32, device=words[0].device)
    groups = words[0].numel()
    if groups:
        grid = (triton.cdiv(groups, HELPER_BLOCK),)
        _words_to_normals_kernel[grid](out, *words, groups, BLOCK=HELPER_BLOCK)
    return out


def key_of(seed: int) -> tuple[int, int]:
    return seed % 2**32, (seed >> 32) % 2**32


def exact_normals(shape, seed, step, stream, index_offset) -> torch.Tensor:
    """The float64 normals of SPEC §3 (the reference's Box–Muller before its rounding to float32)."""
    batch, per_sample = shape[0], math.prod(shape[1:])
    groups = (per_sample + 3) // 4
    group = torch.arange(groups, dtype=torch.int64).expand(batch, groups)
    sample = (index_offset + torch.arange(batch, dtype=torch.int64))[:, None].expand(batch, groups)
    words = philox4x32_10((group, sample, step, stream), key_of(seed))
    return words_to_normals(*words).reshape(batch, 4 * groups)[:, :per_sample].reshape(shape)


def assert_normals_close(got: torch.Tensor, exact: torch.Tensor):
    err = (got.cpu().double() - exact).abs()
    tol = NOISE_RTOL * exact.abs() + NOISE_ATOL
    bad = ~(err <= tol)  # NaN (an unwritten element) counts as bad
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} normals off; max |err|/|n| = "
                           f"{(err / exact.abs().clamp_min(1e-30)).max().item():.3g}")


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(device, counter, key, expected):
    seed = key[0] + (key[1] << 32)
    lanes = [torch.full((3,), c, dtype=torch.int64, device=device) for c in counter]
    words = philox_words_triton(*lanes, seed)
    assert [w.tolist() for w in words] == [[e] * 3 for e in expected]


@pytest.mark.parametrize("seed", SEEDS + [1, 2**31, 2**63, 2**63 + 7, 2**64 - 2**40, 0x1234_5678_9ABC_DEF0])
def test_seed_words_are_the_key(seed):
    """The Triton kernels take the seed as its two 32-bit words, each as the int32 of the same bits: every launcher
    types an int in [-2^31, 2^31) int32 (Inductor of torch 2.11 failed on an int argument >= 2^31)."""
    words = triton_step._seed_words(seed_as_int64(seed))
    assert tuple(word % 2**32 for word in words) == key_of(seed) and all(-2**31 <= word < 2**31 for word in words)
    assert [triton_step._word(value) for value in (0, 2**31 - 1, 2**31, 2**32 - 1)] == [0, 2**31 - 1, -2**31, -1]


@pytest.mark.parametrize("seed", SEEDS + [2**31, 2**63, 0x1234_5678_9ABC_DEF0])
def test_philox_words_equal_reference(device, seed):
    g = torch.Generator().manual_seed(seed % 2**63)
    n = 1000  # not a multiple of the helper's block: a masked tail
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    counters = [torch.cat([edges, torch.randint(0, 2**32, (n,), generator=g)]) for _ in range(4)]
    got = philox_words_triton(*(c.to(device) for c in counters), seed)
    expected = philox4x32_10(tuple(counters), key_of(seed))
    for word, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == torch.int64
        assert torch.equal(a.cpu(), b), f"word x{word} differs"


# u = 1: the radius's rsqrt(0) = inf (and 0 * inf) is computed and then discarded by a select; the interpreter's
# NumPy says so
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")
def test_words_to_normals_at_edge_words(device):
    """The word -> normal map where it turns: u = 1 and 2^-24, every quarter-turn boundary and its neighbours."""
    turns = [k << 22 for k in range(5)] + [(k << 22) + (1 << 21) for k in range(4)]
    q = sorted({max(0, min(2**24 - 1, t + d)) for t in turns for d in (-1, 0, 1)})
    angle_words = torch.tensor([v << 8 for v in q] + [(v << 8) | 0xFF for v in q], dtype=torch.int64)
    radius_words = torch.tensor([0, 0xFF, 0x100, 0x1FF, 2**31, 0xFFFFFEFF, 0xFFFFFF00, 0xFFFFFFFF], dtype=torch.int64)
    x0, x1 = torch.meshgrid(radius_words, angle_words, indexing="ij")
    x0, x1 = x0.reshape(-1), x1.reshape(-1)
    x2, x3 = x0.flip(0), x1.flip(0)
    got = words_to_normals_triton(*(x.to(device) for x in (x0, x1, x2, x3)))
    assert_normals_close(got, words_to_normals(x0, x1, x2, x3))


# ---------------------------------------------------------------- the noise kernel


@pytest.mark.parametrize("per_sample", [(1,), (7,), (37,), (4097,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_normal_noise_matches_reference(device, per_sample, seed):
    shape = (3,) + per_sample
    out = torch.full(shape, float("nan"), device=device)  # poisoned: every element must be written
    triton_step.normal_noise_triton(out, seed, 17, 1, 40)
    assert_normals_close(out, exact_normals(shape, seed, 17, 1, 40))
    reference = normal_noise_reference(shape, seed, 17, 1, 40)
    torch.testing.assert_close(out.cpu(), reference, rtol=2 * NOISE_RTOL, atol=NOISE_ATOL)


def test_normal_noise_many(device):
    """48k normals over both streams and steps and sample indices up to 2^32 - 1; they look standard normal."""
    shape = (4, 6_000)
    out = torch.empty(shape, device=device)
    for stream, step, offset in ((0, 0, 0), (1, 2**32 - 1, 2**32 - 6)):
        triton_step.normal_noise_triton(out, 987654321987, step, stream, offset)
        assert_normals_close(out, exact_normals(shape, 987654321987, step, stream, offset))
    flat = out.double().flatten()
    assert abs(flat.mean().item()) < 0.03 and abs(flat.std().item() - 1) < 0.03  # about 5 sigma at 24k


def test_noise_depends_on_every_counter_word(device):
    base = torch.empty(2, 8, device=device)
    triton_step.normal_noise_triton(base, 5, 3, 1, 0)
    for seed, step, stream, offset in ((6, 3, 1, 0), (5 + 2**32, 3, 1, 0), (5, 4, 1, 0), (5, 3, 0, 0), (5, 3, 1, 1)):
        other = torch.empty_like(base)
        triton_step.normal_noise_triton(other, seed, step, stream, offset)
        assert not torch.equal(other[0], base[0])
    shifted = torch.empty(1, 8, device=device)
    triton_step.normal_noise_triton(shifted, 5, 3, 1, 1)  # global sample 1 alone is row 1 of the pair
    assert torch.equal(shifted[0], base[1])




# ---------------------------------------------------------------- the guided step

# A row with every term (prev, uncond, noise, learned variance) nonzero, as no single sampler has it.
COEF = StepCoefficients(pred_z=1.25, pred_g=-0.75, mean_z=0.8, mean_x=0.35, direct_z=1.2375, direct_g=-0.2625,
                        prev=-0.15, uncond=0.05, noise_std=0.4, noise_nu=0.3)
DETERMINISTIC = StepCoefficients(**{**COEF.__dict__, "noise_std": 0.0})
FIRST_MULTISTEP = StepCoefficients(**{**COEF.__dict__, "prev": 0.0})
SHAPE = (3, 2, 19)  # 38 elements a sample: not a whole number of groups of four


def make_inputs(shape, dtype, device, seed=0):
    """z, pred_cond, pred_uncond, weights [B, 2], x_prev, nu in [-1, 1] (pred_cond's dtype)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * 2
    pred_cond, pred_uncond = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w = torch.linspace(0.0, 4.0, shape[0])
    weights = torch.stack([1 + w, w], dim=1)
    x_prev = torch.randn(shape, generator=g)
    nu = (torch.rand(shape, generator=g) * 2 - 1).to(dtype)
    return [t.to(device) for t in (z, pred_cond, pred_uncond, weights, x_prev, nu)]


def run_step(z, pred_cond, pred_uncond, weights, coef, *, x_prev=None, nu=None, noise=None, seed=11, step=5,
             index_offset=2, clip=None, out=None):
    if out is None:
        out = torch.full(z.shape, float("nan"), device=z.device)  # poisoned: every element must be written
    triton_step.guided_step_triton(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef.as_list(), seed,
                                   step, index_offset, clip)
    return out


def step_magnitude(z, pred_cond, pred_uncond, weights, coef, noise, clip, x_prev, nu):
    """Float64 sum of the magnitudes of the terms that the float32 step adds up."""
    z, oc, ou = (t.cpu().double().abs() for t in (z, pred_cond, pred_uncond))
    per_sample = (-1,) + (1,) * (z.dim() - 1)
    weights = weights.cpu().double().abs()
    g = weights[:, 0].reshape(per_sample) * oc + weights[:, 1].reshape(per_sample) * ou
    x = abs(coef.pred_z) * z + abs(coef.pred_g) * g
    if clip is None:
        total = abs(coef.direct_z) * z + abs(coef.direct_g) * g
    else:
        total = abs(coef.mean_z) * z + abs(coef.mean_x) * x
    total = total + abs(coef.uncond) * ou
    if coef.prev != 0 and x_prev is not None:
        total = total + abs(coef.prev) * x_prev.cpu().double().abs()
    if coef.noise_std != 0:
        scale = abs(coef.noise_std) * (1 if nu is None else torch.exp(coef.noise_nu * nu.cpu().double()))
        total = total + scale * noise.cpu().double().abs()
    return total, x


def check_step(out, z, pred_cond, pred_uncond, weights, coef, noise, clip=None, x_prev=None, nu=None, x=None):
    """out (and x~, where given) against guided_step_reference: |err| <= STEP_BUDGET * magnitude."""
    assert out.dtype == torch.float32 and out.shape == z.shape
    args = [t.cpu() for t in (z, pred_cond, pred_uncond, weights)]
    x_prev, nu, noise = (None if t is None else t.cpu() for t in (x_prev, nu, noise))
    expected, expected_x = guided_step_reference(*args, coef, noise, clip, x_prev, nu)
    magnitude, x_magnitude = step_magnitude(*args, coef, noise, clip, x_prev, nu)
    for got, want, size, name in ((out, expected, magnitude, "z'"), (x, expected_x, x_magnitude, "x~")):
        if got is None:
            continue
        assert torch.isfinite(got).all(), f"non-finite {name} (an element not written, or x_prev read?)"
        ratio = ((got.cpu().double() - want.double()).abs() / (STEP_BUDGET * size + 1e-30)).max().item()
        assert ratio <= 1, f"{name}: max error {ratio:.3g} x the budget"


CASES = ["plain", "clip", "prev", "first-multistep", "nu", "explicit", "deterministic"]


@pytest.mark.parametrize("dtype", EPS_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_step_matches_reference(device, dtype, case):
    """Each term of the row against the reference: clip, the multistep state (prev != 0 read; prev == 0 on a NaN
    buffer not read, both overwritten with x~), learned variance, explicit noise, and no noise (independent of the
    seed: nothing drawn)."""
    z, pc, pu, weights, x_prev, nu = make_inputs(SHAPE, dtype, device)
    coef = {"first-multistep": FIRST_MULTISTEP, "deterministic": DETERMINISTIC}.get(case, COEF)
    clip = 1.0 if case == "clip" else None
    state = None
    if case in ("prev", "first-multistep", "deterministic"):
        state = torch.full_like(x_prev, float("nan")) if case == "first-multistep" else x_prev.clone()
    given_nu = nu if case in ("nu", "deterministic") else None
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).to(device) if case == "explicit" else None
    out = run_step(z, pc, pu, weights, coef, x_prev=state, nu=given_nu, noise=noise, clip=clip)
    if noise is None and case != "deterministic":
        noise = normal_noise_reference(SHAPE, 11, 5, 1, 2)
    read = x_prev if case in ("prev", "deterministic") else None  # (the reference reads no state where prev == 0)
    check_step(out, z, pc, pu, weights, coef, noise, clip, read, given_nu, x=state)
    if case == "deterministic":
        again = run_step(z, pc, pu, weights, coef, x_prev=x_prev.clone(), nu=nu, seed=12, step=6, index_offset=0)
        assert torch.equal(again, out)
    if clip is not None:
        x = torch.full_like(z, float("nan"))
        run_step(z, pc, pu, weights, FIRST_MULTISTEP, x_prev=x, clip=clip)  # the state holds the clipped x~
        assert x.abs().max() <= clip


def test_table_reads_its_row_and_step_on_the_device(device):
    """Row t = step[0] of the table, the noise's step word t; prev == 0 on a NaN state not read; a row without
    noise adds none; t outside the table gives NaN everywhere."""
    z, pc, pu, weights, x_prev, nu = make_inputs(SHAPE, torch.bfloat16, device, seed=1)
    rows = [COEF, FIRST_MULTISTEP, StepCoefficients(**{**DETERMINISTIC.__dict__, "prev": 0.0})]
    table = torch.tensor([c.as_list() for c in rows], dtype=torch.float64, device=device)
    for t, coef in enumerate(rows):
        state = x_prev.clone() if t == 0 else torch.full_like(x_prev, float("nan"))
        out = torch.full(SHAPE, float("nan"), device=device)
        triton_step.guided_step_table_triton(out, z, pc, pu, weights, state, nu, table,
                                             torch.tensor([t], device=device), 2**40 + 3, 7, None)
        noise = normal_noise_reference(SHAPE, 2**40 + 3, t, 1, 7) if coef.noise_std else None
        check_step(out, z, pc, pu, weights, coef, noise, None, x_prev if t == 0 else None, nu, x=state)
    for t in (-1, len(rows)):
        out, state = torch.zeros(SHAPE, device=device), x_prev.clone()
        triton_step.guided_step_table_triton(out, z, pc, pu, weights, state, None, table,
                                             torch.tensor([t], device=device), 1, 0, 1.0)
        assert torch.isnan(out).all()


def test_coefficients_are_rounded_to_float32_before_they_are_tested():
    """A row's prev or noise_std that rounds to float32 zero reads no state and draws no noise, as in the kernels
    of csrc (which test the float32 value)."""
    assert [triton_step._nonzero_f32(v) for v in (0.0, -0.0, 1e-60, 2.0**-150, 2.0**-149, -1e-44, math.nan)] == [
        False, False, False, False, True, True, True]


@pytest.mark.skipif(not INTERPRETED, reason="counts the interpreted kernels' Philox calls")
def test_rows_without_noise_draw_none(monkeypatch):
    """noise_std == 0 costs no Philox: the kernel of a host row holds none (DRAW, chosen on the host), and the table
    kernel skips it by a branch on the row (tests/test_codegen.py counts the compiled kernels' Philox)."""
    calls = []
    draw = triton_step._sample_normals

    def counted(*args):
        calls.append(args)
        return draw(*args)

    monkeypatch.setattr(triton_step, "_sample_normals", counted)
    z, pc, pu, weights, x_prev, nu = make_inputs(SHAPE, torch.float32, "cpu")
    table = torch.tensor([DETERMINISTIC.as_list(), COEF.as_list()], dtype=torch.float64)
    for t, drawn in ((0, False), (1, True)):
        run_step(z, pc, pu, weights, StepCoefficients(*table[t].tolist()), x_prev=x_prev.clone(), nu=nu)
        triton_step.guided_step_table_triton(torch.empty_like(z), z, pc, pu, weights, x_prev.clone(), nu, table,
                                             torch.tensor([t]), 1, 0, None)
        assert bool(calls) == drawn, (t, len(calls))


def test_in_kernel_noise_equals_noise_kernel(device):
    """The fused step draws exactly the noise that normal_noise_triton writes."""
    z, pc, pu, weights, _, _ = make_inputs(SHAPE, torch.float32, device, seed=6)
    fused = run_step(z, pc, pu, weights, COEF, seed=2**33 + 1, step=17, index_offset=40)
    noise = torch.empty(SHAPE, device=device)
    triton_step.normal_noise_triton(noise, 2**33 + 1, 17, 1, 40)
    explicit = run_step(z, pc, pu, weights, COEF, noise=noise)
    torch.testing.assert_close(fused, explicit, rtol=2.0**-22, atol=0)


def test_views_are_made_contiguous(device):
    """Non-contiguous inputs count elements in C order over each sample (SPEC §3), like their dense copies; nu may
    be a strided slice of the model output."""
    base = torch.randn(6, 3, 10, 8, device=device)
    z = base[::2, :, 1:9, :].transpose(2, 3)  # [3, 3, 8, 8], strided
    pc = torch.randn(3, 8, 8, 3, device=device).permute(0, 3, 1, 2).to(torch.bfloat16)
    pu = torch.randn(3, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    nu = (torch.rand(3, 6, 8, 8, device=device) * 2 - 1).to(torch.bfloat16)[:, 3:]  # learned variance's half
    weights = torch.tensor([[1.5, 2.5, 4.0], [0.5, 1.5, 3.0]], device=device).t()
    assert not any(t.is_contiguous() for t in (z, pc, pu, nu, weights))
    out = run_step(z, pc, pu, weights, COEF, nu=nu, seed=5, step=2)
    dense = run_step(*(t.contiguous() for t in (z, pc, pu, weights)), COEF, nu=nu.contiguous(), seed=5, step=2)
    assert torch.equal(out, dense)
    check_step(out, z, pc, pu, weights, COEF, normal_noise_reference(z.shape, 5, 2, 1, 2), nu=nu)


def test_out_may_alias_z(device):
    z, pc, pu, weights, x_prev, nu = make_inputs((4, 33), torch.float16, device, seed=4)
    expected = run_step(z, pc, pu, weights, COEF, x_prev=x_prev.clone(), nu=nu, clip=1.0)
    state = z.clone()
    run_step(state, pc, pu, weights, COEF, x_prev=x_prev.clone(), nu=nu, clip=1.0, out=state)
    assert torch.equal(state, expected)


def test_nan_input_propagates_through_clip(device):
    z, pc, pu, weights, _, _ = make_inputs((1, 8), torch.float32, device)
    z[0, 3] = float("nan")
    x = torch.empty_like(z)
    out = run_step(z, pc, pu, weights, DETERMINISTIC, x_prev=x, clip=1.0)
    for t in (out, x):
        assert torch.isnan(t[0, 3]) and torch.isfinite(t[0, torch.arange(8, device=device) != 3]).all()


def test_empty_tensors(device):
    for shape in ((0, 5), (3, 0)):
        z, pc, pu, weights, x_prev, nu = make_inputs(shape, torch.float32, device)
        assert run_step(z, pc, pu, weights, COEF, x_prev=x_prev, nu=nu).shape == shape
        triton_step.normal_noise_triton(torch.empty(shape, device=device), 1, 0, 1, 0)


def test_op_checks_refuse_bad_input(device):
    z, pc, pu, weights, x_prev, nu = make_inputs((2, 8), torch.float32, device)
    out = torch.empty_like(z)
    bad_calls = {  # the op's own words and errors (cfgfast/_checks.py, as csrc/op_checks.h), each naming what is wrong
        "pred_uncond must have the dtype of pred_cond": (TypeError, lambda: run_step(z, pc, pu.half(), weights, COEF,
                                                                                     out=out)),
        r"weights must have shape \[2, 2\]": (ValueError, lambda: run_step(z, pc, pu, weights[:, :1], COEF, out=out)),
        "out must be a contiguous float32": (ValueError, lambda: run_step(z, pc, pu, weights, COEF, out=out.double())),
        "x_prev must be a contiguous float32": (ValueError, lambda: run_step(z, pc, pu, weights, COEF,
                                                                             x_prev=x_prev.t().t()[:, ::1].double(),
                                                                             out=out)),
        "nu must have the dtype of pred_cond": (TypeError, lambda: run_step(z, pc, pu, weights, COEF, nu=nu.half(),
                                                                            out=out)),
        r"index_offset \+ batch must be in": (ValueError, lambda: run_step(z, pc, pu, weights, COEF,
                                                                            index_offset=2**32 - 1, out=out)),
        "step must be in": (ValueError, lambda: run_step(z, pc, pu, weights, COEF, step=2**32, out=out)),
        "clip must be positive and finite in float32": (ValueError, lambda: run_step(z, pc, pu, weights, COEF,
                                                                                     clip=-1.0, out=out)),
        "coef must hold 10 numbers": (ValueError, lambda: triton_step.guided_step_triton(
            out, z, pc, pu, weights, None, None, None, [1.0] * 7, 0, 0, 0, None)),
        "coef_table must be a float64 tensor of shape": (ValueError, lambda: triton_step.guided_step_table_triton(
            out, z, pc, pu, weights, None, None, torch.zeros(3, 7, dtype=torch.float64, device=device),
            torch.tensor([0], device=device), 0, 0, None)),
        "step must be an int64 tensor": (ValueError, lambda: triton_step.guided_step_table_triton(
            out, z, pc, pu, weights, None, None, torch.zeros(3, 10, dtype=torch.float64, device=device),
            torch.tensor([0], dtype=torch.int32, device=device), 0, 0, None)),
    }
    for message, (error, call) in bad_calls.items():
        with pytest.raises(error, match="cfgfast: " + message):
            call()
    # out over part of an input: the C++ ops refuse it too (an in-place step into z itself is allowed); x_prev,
    # written, shares no byte with any other tensor
    buffer = torch.randn(40, device=device)
    with pytest.raises(ValueError, match="out must not partly overlap z"):
        run_step(buffer[:16].view(2, 8), pc, pu, weights, COEF, out=buffer[2:18].view(2, 8))
    with pytest.raises(ValueError, match="out must not partly overlap pred_cond"):
        run_step(z, buffer[:16].view(2, 8), pu, weights, COEF, out=buffer[4:20].view(2, 8))
    with pytest.raises(ValueError, match="x_prev must not overlap z"):
        run_step(z, pc, pu, weights, COEF, x_prev=z, out=out)
    with pytest.raises(ValueError, match="x_prev must not overlap out"):
        run_step(z, pc, pu, weights, COEF, x_prev=buffer[20:36].view(2, 8), out=buffer[24:40].view(2, 8))


# ---------------------------------------------------------------- the backend's contract


def test_refusals(device):
    assert triton_step.refusals(device) == []
    assert triton_step.refusals(torch.device("meta"))
    if not INTERPRETED:
        assert triton_step.refusals(torch.device("cpu"))


@pytest.mark.parametrize("value, interpreted", [("true", True), ("0", False)])
def test_interpreter_setting_read_as_triton_reads_it(value, interpreted, tmp_path):
    """TRITON_INTERPRET=true interprets the kernels as Triton does (not only "1"): CPU tensors are accepted and the
    interpreted kernels are called directly where torch cannot wrap them; otherwise a CPU tensor is refused by
    name."""
    code = textwrap.dedent("""
        import torch
        from cfgfast import triton_step
        print(triton_step.INTERPRETED)
        out = torch.empty(1, 3)
        if triton_step.INTERPRETED:
            triton_step.normal_noise_triton(out, 1, 0, 1, 0)
            print(out.tolist())
        else:
            print()
            try:
                torch.ops.cfgfast.triton_normal_noise_(out, 1, 0, 1, 0)
            except RuntimeError as error:
                print(error)
        """)
    env = dict(os.environ, TRITON_INTERPRET=value, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(interpreted)
    if not interpreted:
        assert "the triton kernels take CUDA tensors (CPU tensors under TRITON_INTERPRET=1), got out on cpu" in lines[2]
    else:
        torch.testing.assert_close(torch.tensor(eval(lines[1])), normal_noise_reference((1, 3), 1, 0, 1, 0),
                                   rtol=NOISE_RTOL, atol=NOISE_ATOL)


def test_ops_are_registered():
    for name, written in (("triton_guided_step_", ("out", "x_prev")), ("triton_guided_step_table_", ("out", "x_prev")),
                          ("triton_normal_noise_", ("out",))):
        schema = str(getattr(torch.ops.cfgfast, name).default._schema)
        assert re.findall(r"Tensor\(a\d*!\)\?? (\w+)", schema) == list(written), schema


def test_kernel_arguments_leave_inductors_launcher_names_free():
    """torch.compile's launcher of a user Triton kernel takes its own `stream` argument: a kernel argument of that
    name stopped compilation on a GPU (SyntaxError: duplicate argument 'stream'), which the interpreter never sees."""
    for kernel in (triton_step._guided_step_kernel, triton_step._normal_noise_kernel):
        assert not {"stream", "grid", "function"} & set(kernel.arg_names), kernel.arg_names


@NEEDS_GPU
def test_torch_compile_sees_the_kernels(device):
    z, pc, pu, weights, x_prev, nu = make_inputs((4, 3, 17), torch.bfloat16, device)
    table = torch.tensor([COEF.as_list(), DETERMINISTIC.as_list()], dtype=torch.float64, device=device)
    t = torch.tensor([0], device=device)

    def step(z, pc, pu, weights, x_prev, nu):
        out, table_out, noise = torch.empty_like(z), torch.empty_like(z), torch.empty_like(z)
        torch.ops.cfgfast.triton_guided_step_(out, z, pc, pu, weights, x_prev, nu, None, COEF.as_list(), 3, 4, 0,
                                              None)
        torch.ops.cfgfast.triton_guided_step_table_(table_out, z, pc, pu, weights, None, nu, table, t, 3, 0, 1.0)
        torch.ops.cfgfast.triton_normal_noise_(noise, 3, 4, 1, 2)
        return out * 1.0, table_out * 1.0, noise + z

    compiled = torch.compile(step, fullgraph=True)
    eager_state, compiled_state = x_prev.clone(), x_prev.clone()
    for got, want in zip(compiled(z, pc, pu, weights, compiled_state, nu), step(z, pc, pu, weights, eager_state, nu)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(compiled_state, eager_state, rtol=0, atol=0)


def test_opcheck(device):
    # Under the interpreter the fake-tensor and AOT checks would run the interpreted kernel on fake tensors.
    utils = ("test_schema", "test_autograd_registration") if INTERPRETED else None
    kwargs = {} if utils is None else {"test_utils": utils}
    z, pc, pu, weights, x_prev, nu = make_inputs((3, 2, 9), torch.bfloat16, device)
    table = torch.tensor([COEF.as_list()], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.cfgfast.triton_guided_step_.default,
                          (torch.empty_like(z), z, pc, pu, weights, x_prev, nu, None, COEF.as_list(), 2**63 - 1, 4, 0,
                           1.5), **kwargs)
    torch.library.opcheck(torch.ops.cfgfast.triton_guided_step_table_.default,
                          (torch.empty_like(z), z, pc, pu, weights, x_prev, nu, table,
                           torch.tensor([0], device=device), -1, 0, None), **kwargs)
    torch.library.opcheck(torch.ops.cfgfast.triton_normal_noise_.default,
                          (torch.empty(2, 9, device=device), -1, 2, 1, 0), **kwargs)


def test_ops_do_nothing_on_meta_tensors():
    """(Meta tensors all sit at address 0: the overlap checks would refuse them as overlapping.)"""
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    torch.ops.cfgfast.triton_guided_step_(meta(3, 5), meta(3, 5), meta(3, 5), meta(3, 5), meta(3, 2), meta(3, 5),
                                          meta(3, 5), meta(3, 5), [1.0] * 10, 1, 0, 0, None)
    torch.ops.cfgfast.triton_guided_step_table_(meta(3, 5), meta(3, 5), meta(3, 5), meta(3, 5), meta(3, 2),
                                                meta(3, 5), None, meta(4, 10, dtype=torch.float64),
                                                meta(1, dtype=torch.int64), 1, 0, None)
    torch.ops.cfgfast.triton_normal_noise_(meta(3, 5), 1, 0, 1, 0)


@pytest.mark.parametrize("shape,message", [((1, 2**30), "fewer than 2\\^30 elements per sample"),
                                           ((2**31, 1), "fewer than 2\\^31 programs")])
def test_launch_limits(shape, message):
    # sizes the kernels cannot index or launch: a ValueError before the launch (meta tensors: no memory)
    with pytest.raises(ValueError, match=message):
        triton_step._check_launch(torch.empty(shape, device="meta"))
    just_below = (shape[0], shape[1] - 1) if shape[0] == 1 else (shape[0] - 1, 1)
    triton_step._check_launch(torch.empty(just_below, device="meta"))


@pytest.mark.skipif(torch.cuda.device_count() < 2 or INTERPRETED, reason="needs two CUDA GPUs")
def test_tensors_on_a_gpu_that_is_not_the_current_one():
    # Triton launches on the current device: the op makes the tensors' device current for the launch, and the
    # results on cuda:1 are those on cuda:0 bit for bit
    torch.cuda.set_device(0)
    inputs = make_inputs((3, 4099), torch.float32, "cuda:0")
    steps = [run_step(*(t.to(device) for t in inputs[:4]), COEF, x_prev=inputs[4].to(device), nu=inputs[5].to(device))
             for device in ("cuda:1", "cuda:0")]
    assert steps[0].device == torch.device("cuda:1") and torch.equal(steps[0].cpu(), steps[1].cpu())
    noises = [torch.empty(3, 4099, device=device) for device in ("cuda:1", "cuda:0")]
    for noise in noises:
        triton_step.normal_noise_triton(noise, 5, 0, 1, 0)
    assert torch.equal(noises[0].cpu(), noises[1].cpu())

