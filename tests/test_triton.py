"""The Triton backend (cfgfast/triton_step.py) against the plain-PyTorch reference (cfgfast/reference.py).

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
- The step vs reverse_step_reference on the reference noise: |err| <= STEP_BUDGET * (magnitude of the terms
  summed, in float64). Both sides are float32 evaluations of the same formula, a few ulps of that magnitude
  each (a GPU also contracts a*b + c to fma, the reference does not), and the normals differ by up to
  NOISE_RTOL. Measured max ratio 2.3e-7 = 2^-22 (4 ulps) over every eps dtype and mode and the lambda pairs
  below; STEP_BUDGET = 2^-20 (16 ulps), the budget tests/test_step.py gives the cpu backend.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import cfgfast
from cfgfast import triton_step
from cfgfast._checks import seed_as_int64
from cfgfast.reference import normal_noise_reference, philox4x32_10, reverse_step_reference, words_to_normals

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


# ---------------------------------------------------------------- Philox words and Box–Muller


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(device, counter, key, expected):
    seed = key[0] + (key[1] << 32)
    lanes = [torch.full((3,), c, dtype=torch.int64, device=device) for c in counter]
    words = triton_step.philox_words_triton(*lanes, seed)
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
    got = triton_step.philox_words_triton(*(c.to(device) for c in counters), seed)
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
    got = triton_step.words_to_normals_triton(*(x.to(device) for x in (x0, x1, x2, x3)))
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


# ---------------------------------------------------------------- the fused step


def make_inputs(shape, eps_dtype, device, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * scale
    eps_cond = torch.randn(shape, generator=g).to(eps_dtype)
    eps_uncond = torch.randn(shape, generator=g).to(eps_dtype)
    w = torch.linspace(0.0, 4.0, shape[0])
    return z.to(device), eps_cond.to(device), eps_uncond.to(device), w.to(device)


def step_magnitude(z, eps_cond, eps_uncond, w, coef, noise, clip, last):
    """Float64 sum of the magnitudes of the terms of SPEC §2 that the float32 step adds up."""
    z, ec, eu = (t.cpu().double() for t in (z, eps_cond, eps_uncond))
    w = w.cpu().double().reshape((-1,) + (1,) * (z.dim() - 1))
    eps = (1 + w).abs() * ec.abs() + w.abs() * eu.abs()
    x = (z.abs() + coef.sigma * eps) / coef.alpha
    if last:
        return x
    n = noise.cpu().double().abs() * coef.noise_std
    if clip is None:
        return coef.mean_z * z.abs() + coef.mean_eps * eps + n
    return coef.mean_z_clip * z.abs() + coef.mean_x_clip * x + n


def run_step(z, eps_cond, eps_uncond, w, coef, *, noise=None, seed=11, step=5, index_offset=0, clip=None, last=False,
             out=None):
    if out is None:
        out = torch.full(z.shape, float("nan"), device=z.device)  # poisoned
    triton_step.reverse_step_triton(out, z, eps_cond, eps_uncond, w, noise, coef.as_list(), seed, step,
                                    index_offset, clip, last)
    return out


def check_step(out, z, eps_cond, eps_uncond, w, coef, noise, clip=None, last=False):
    """out against reverse_step_reference, |err| <= STEP_BUDGET * magnitude; returns the max ratio."""
    assert out.dtype == torch.float32 and out.shape == z.shape
    args = [t.cpu() for t in (z, eps_cond, eps_uncond, w)]
    noise = None if noise is None else noise.cpu()
    expected = reverse_step_reference(*args, coef, noise, clip, last)
    err = (out.cpu().double() - expected.double()).abs()
    bound = STEP_BUDGET * step_magnitude(*args, coef, noise, clip, last) + 1e-30
    assert torch.isfinite(out).all(), "non-finite output (an element was not written?)"
    ratio = (err / bound).max().item()
    assert ratio <= 1, f"max error {ratio:.3g} x the budget"
    return ratio * STEP_BUDGET


LAM, LAM_NEXT, V = -2.5, -1.75, 0.3
COEF = cfgfast.step_coefficients(LAM, LAM_NEXT, V)


@pytest.mark.parametrize("per_sample", [(1,), (7,), (37,), (4097,)], ids=str)
@pytest.mark.parametrize("eps_dtype", EPS_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "clip", "last", "last-clip", "noise"])
def test_step_matches_reference(device, per_sample, eps_dtype, mode):
    shape = (3,) + per_sample
    z, ec, eu, w = make_inputs(shape, eps_dtype, device)
    clip = 1.0 if "clip" in mode else None
    last = mode.startswith("last")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device) if mode == "noise" else None
    out = run_step(z, ec, eu, w, COEF, noise=noise, seed=11, step=5, index_offset=2, clip=clip, last=last)
    if noise is None and not last:
        noise = normal_noise_reference(shape, 11, 5, 1, 2)
    check_step(out, z, ec, eu, w, COEF, noise, clip, last)
    if clip is not None and last:
        assert out.abs().max() <= clip


LAMBDA_PAIRS = [(-20.0, -19.5), (-5.0, 3.5), (0.0, 1e-3), (19.0, 20.0)]


@pytest.mark.parametrize("lam,lam_next", LAMBDA_PAIRS)
@pytest.mark.parametrize("seed", SEEDS)
def test_step_seeds_and_schedule_ends(device, seed, lam, lam_next):
    shape = (4, 201)  # 51 groups per sample, the last one partial
    z, ec, eu, w = make_inputs(shape, torch.float32, device, seed=1, scale=1.0)
    coef = cfgfast.step_coefficients(lam, lam_next, 0.2)
    out = run_step(z, ec, eu, w, coef, seed=seed, step=2**32 - 1, index_offset=7)
    check_step(out, z, ec, eu, w, coef, normal_noise_reference(shape, seed, 2**32 - 1, 1, 7))


@pytest.mark.parametrize("lam", [-20.0, 0.0, 20.0])
def test_last_step_uses_only_alpha_and_sigma(device, lam):
    """On the last step the mean and noise coefficients are nan (schedule.step_coefficients): unused."""
    z, ec, eu, w = make_inputs((2, 9), torch.float32, device, seed=3)
    coef = cfgfast.step_coefficients(lam, lam, 0.3)
    assert math.isnan(coef.noise_std)
    check_step(run_step(z, ec, eu, w, coef, last=True), z, ec, eu, w, coef, None, last=True)


@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loads_first_setting(device, eps_dtype, monkeypatch):
    """triton_step.LOADS_FIRST (the loads kept above the noise by a branch on per_sample >= 0): the same step."""
    shape = (3, 37)
    z, ec, eu, w = make_inputs(shape, eps_dtype, device, seed=4)
    plain = run_step(z, ec, eu, w, COEF, seed=11, step=5, index_offset=2)
    monkeypatch.setattr(triton_step, "LOADS_FIRST", True)
    first = run_step(z, ec, eu, w, COEF, seed=11, step=5, index_offset=2)
    check_step(first, z, ec, eu, w, COEF, normal_noise_reference(shape, 11, 5, 1, 2))
    torch.testing.assert_close(first, plain, rtol=2.0**-22, atol=0)


@pytest.mark.skipif(INTERPRETED, reason="the L2 prefetch is inline PTX, which the interpreter cannot run")
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["noise", "explicit"])
def test_prefetch_setting(device, eps_dtype, mode, monkeypatch):
    """triton_step.PREFETCH_PER_SM (each program prefetches a later program's inputs into L2): the same bits. 1 an SM
    on 3 samples of 128 programs each, so that most programs have one to prefetch for and the last ones have none."""
    shape = (3, 128 * 4 * triton_step.BLOCK_GROUPS)
    z, ec, eu, w = make_inputs(shape, eps_dtype, device, seed=4)
    noise = torch.randn_like(z) if mode == "explicit" else None
    plain = run_step(z, ec, eu, w, COEF, noise=noise, seed=11, step=5, index_offset=2)
    monkeypatch.setattr(triton_step, "PREFETCH_PER_SM", 1)
    assert 0 < triton_step._prefetch_ahead(z) < 3 * 128  # a prefetch is due
    fetched = run_step(z, ec, eu, w, COEF, noise=noise, seed=11, step=5, index_offset=2)
    assert torch.equal(fetched, plain)


@pytest.mark.skipif(not INTERPRETED, reason="records the prefetched addresses through the interpreter")
@pytest.mark.parametrize("batch,blocks,ahead,noise,last,eps_dtype", [
    (3, 5, 4, False, False, torch.float32), (3, 5, 7, True, False, torch.bfloat16),
    (2, 1, 1, True, False, torch.float32), (2, 3, 10, False, False, torch.float32),
    (1, 6, 6, False, False, torch.float16), (2, 2, 9, False, False, torch.float32),
    (2, 3, 2, True, True, torch.float32)])
def test_prefetch_addresses(batch, blocks, ahead, noise, last, eps_dtype, monkeypatch):
    """The Triton step's prefetch (PREFETCH, prefetch_ahead programs on), its inline PTX replaced by a recorder under
    the interpreter: every address asked for lies inside its input, each group of the programs from `ahead` on is
    asked for exactly once in each input the step reads (z, both eps, the explicit noise but on the last step),
    nothing else, and a program prefetches all its groups or none (where program pid + ahead exists). A wrong
    address would change no result and a prefetch does not fault, so only this sees it."""
    np = pytest.importorskip("numpy")
    recorded = []

    def record(pointers, mask):
        recorded.append((np.asarray(pointers.handle.data).astype(np.int64), np.asarray(mask.handle.data).astype(bool)))

    monkeypatch.setattr(triton_step, "_prefetch_l2", record)
    block = 4
    per_sample = 4 * block * blocks
    z = torch.randn(batch, per_sample)
    ec, eu = torch.randn_like(z).to(eps_dtype), torch.randn_like(z).to(eps_dtype)
    explicit, w, out = torch.randn_like(z), torch.ones(batch), torch.empty_like(z)
    programs = batch * blocks
    triton_step._reverse_step_kernel[(programs,)](
        out, z, ec, eu, w, explicit if noise else z, 1.0, 0.5, 0.9, 0.1, 0.9, 0.1, 0.3, 0.0,
        1, 0, 2, 0, per_sample, blocks, ahead, HAS_NOISE=noise, CLIP=False, LAST=last, BLOCK=block, PREFETCH=True)
    inputs = [z, ec, eu] + ([explicit] if noise and not last else [])
    assert len(recorded) == programs * len(inputs)
    counts = [np.zeros(t.numel(), dtype=np.int64) for t in inputs]
    for i, (addresses, due) in enumerate(recorded):
        pid, k = divmod(i, len(inputs))
        t = inputs[k]
        assert due.all() == (pid + ahead < programs) and (due.all() or not due.any()), (pid, due)
        offsets = addresses[due] - t.data_ptr()
        assert (offsets % t.element_size() == 0).all()
        index = offsets // t.element_size()
        assert ((index >= 0) & (index < t.numel())).all(), (pid, k, index)
        np.add.at(counts[k], index, 1)
    expected = np.zeros(z.numel(), dtype=np.int64)
    expected[4 * block * ahead::4] = 1  # the first element of each group of the programs from `ahead` on
    for k, count in enumerate(counts):
        assert (count == expected).all(), (k, count, expected)


def test_prefetch_only_where_it_can_run(monkeypatch):
    """The prefetch is off by default, under the interpreter (CPU tensors), and where a sample is not a whole
    number of programs (a later program's inputs are then not a fixed distance on)."""
    whole = 4 * triton_step.BLOCK_GROUPS
    assert triton_step.PREFETCH_PER_SM == 0
    assert triton_step._prefetch_ahead(torch.empty(2, whole)) == 0
    monkeypatch.setattr(triton_step, "PREFETCH_PER_SM", 4)
    assert triton_step._prefetch_ahead(torch.empty(2, whole)) == 0  # CPU tensors: the interpreter
    if torch.cuda.is_available() and not INTERPRETED:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert triton_step._prefetch_ahead(torch.empty(2, whole, device="cuda")) == 4 * sms
        assert triton_step._prefetch_ahead(torch.empty(2, whole + 4, device="cuda")) == 0


def test_in_kernel_noise_equals_noise_kernel(device):
    """The fused step draws exactly the noise that normal_noise_triton writes."""
    shape = (3, 2, 50)
    z, ec, eu, w = make_inputs(shape, torch.float32, device, seed=6)
    fused = run_step(z, ec, eu, w, COEF, seed=2**33 + 1, step=17, index_offset=40)
    noise = torch.empty(shape, device=device)
    triton_step.normal_noise_triton(noise, 2**33 + 1, 17, 1, 40)
    explicit = run_step(z, ec, eu, w, COEF, noise=noise)
    torch.testing.assert_close(fused, explicit, rtol=2.0**-22, atol=0)


def test_views_are_made_contiguous(device):
    """Non-contiguous inputs count elements in C order over each sample (SPEC §3), like their dense copies."""
    base = torch.randn(6, 3, 10, 8, device=device)
    z = base[::2, :, 1:9, :].transpose(2, 3)  # [3, 3, 8, 8], strided
    ec = torch.randn(3, 8, 8, 3, device=device).permute(0, 3, 1, 2).to(torch.bfloat16)
    eu = torch.randn(3, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    w = torch.tensor([0.5, 1.5, 3.0], device=device).flip(0)
    assert not (z.is_contiguous() or ec.is_contiguous() or eu.is_contiguous())
    out = run_step(z, ec, eu, w, COEF, seed=5, step=2)
    dense = run_step(z.contiguous(), ec.contiguous(), eu.contiguous(), w.contiguous(), COEF, seed=5, step=2)
    assert torch.equal(out, dense)
    check_step(out, z, ec, eu, w, COEF, normal_noise_reference(z.shape, 5, 2, 1, 0))


@pytest.mark.parametrize("mode", ["plain", "clip", "last"])
def test_out_may_alias_z(device, mode):
    z, ec, eu, w = make_inputs((4, 33), torch.float16, device, seed=4)
    clip, last = (1.0 if mode == "clip" else None), mode == "last"
    expected = run_step(z, ec, eu, w, COEF, clip=clip, last=last)
    state = z.clone()
    run_step(state, ec, eu, w, COEF, clip=clip, last=last, out=state)
    assert torch.equal(state, expected)


def test_batch_split_equals_whole_batch(device):
    """Noise follows the global sample index: parts with index_offset give the rows of the whole batch."""
    shape = (6, 3, 5)
    z, ec, eu, w = make_inputs(shape, torch.float32, device, seed=7)
    whole = run_step(z, ec, eu, w, COEF, seed=8, step=3, index_offset=100)
    parts = [run_step(z[i:j], ec[i:j], eu[i:j], w[i:j], COEF, seed=8, step=3, index_offset=100 + i)
             for i, j in ((0, 1), (1, 4), (4, 6))]
    assert torch.equal(torch.cat(parts), whole)


def test_nan_input_propagates_through_clip(device):
    z, ec, eu, w = make_inputs((1, 8), torch.float32, device)
    z[0, 3] = float("nan")
    out = run_step(z, ec, eu, w, COEF, clip=1.0, last=True)
    assert torch.isnan(out[0, 3]) and torch.isfinite(out[0, torch.arange(8, device=device) != 3]).all()


def test_empty_tensors(device):
    for shape in ((0, 5), (3, 0)):
        z, ec, eu, w = make_inputs(shape, torch.float32, device)
        assert run_step(z, ec, eu, w, COEF).shape == shape
        triton_step.normal_noise_triton(torch.empty(shape, device=device), 1, 0, 1, 0)


def test_op_checks_refuse_bad_input(device):
    z, ec, eu, w = make_inputs((2, 8), torch.float32, device)
    out = torch.empty_like(z)
    bad_calls = {  # the op's own words (cfgfast/_checks.py op_step_args), each naming what is wrong
        "eps_uncond must have the dtype of eps_cond": lambda: run_step(z, ec, eu.half(), w, COEF, out=out),
        r"w must be float32 \[B\]": lambda: run_step(z, ec, eu, w[:1], COEF, out=out),
        "out must be float32": lambda: run_step(z, ec, eu, w, COEF, out=out.double()),
        "out must be contiguous": lambda: run_step(z, ec, eu, w, COEF, out=torch.empty(8, 2, device=device).t()),
        r"index_offset \+ batch must be in": lambda: run_step(z, ec, eu, w, COEF, index_offset=2**32 - 1, out=out),
        "step must be in": lambda: run_step(z, ec, eu, w, COEF, step=2**32, out=out),
        "clip must be positive and finite in float32": lambda: run_step(z, ec, eu, w, COEF, clip=-1.0, out=out),
    }
    for message, call in bad_calls.items():
        with pytest.raises(RuntimeError, match="cfgfast: " + message):
            call()
    # out over part of an input: the C++ ops refuse it too (an in-place step into the input itself is allowed)
    buffer = torch.randn(20, device=device)
    with pytest.raises(ValueError, match="out must not partly overlap z"):
        run_step(buffer[:16].view(2, 8), ec, eu, w, COEF, out=buffer[2:18].view(2, 8))
    with pytest.raises(ValueError, match="out must not partly overlap eps_cond"):
        run_step(z, buffer[:16].view(2, 8), eu, w, COEF, out=buffer[4:].view(2, 8))


# ---------------------------------------------------------------- the backend's contract


def test_refusals(device):
    assert triton_step.refusals(device) == []
    assert triton_step.refusals(torch.device("meta"))
    if not INTERPRETED:
        assert triton_step.refusals(torch.device("cpu"))


@pytest.mark.parametrize("value, interpreted", [("true", True), ("on", True), ("0", False)])
def test_interpreter_setting_read_as_triton_reads_it(value, interpreted, tmp_path):
    """TRITON_INTERPRET=true interprets the kernels: cfgfast took only "1", refused CPU tensors and did not
    call the interpreted kernels directly where older torch cannot wrap them."""
    code = ("import torch, cfgfast\nfrom cfgfast import triton_step\nprint(triton_step.INTERPRETED)\n"
            "print(cfgfast.normal_noise((1, 3), 1, backend='triton').tolist() if triton_step.INTERPRETED else '')")
    if not interpreted:  # a direct call of the op on CPU tensors is refused by name (Triton: "0 active drivers")
        code += ("\ntry:\n    torch.ops.cfgfast.triton_normal_noise_(torch.empty(1, 3), 1, 0, 1, 0)\n"
                 "except RuntimeError as error:\n    print(error)")
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
    for name in ("triton_reverse_step_", "triton_normal_noise_"):
        schema = str(getattr(torch.ops.cfgfast, name).default._schema)
        assert re.search(r"\(Tensor\(a\d*!\) out,", schema), schema  # out, and only out, is written


def test_kernel_arguments_leave_inductors_launcher_names_free():
    """torch.compile's launcher of a user Triton kernel takes its own `stream` argument: a kernel argument of that
    name stopped compilation on a GPU (SyntaxError: duplicate argument 'stream'), which the interpreter never sees."""
    for kernel in (triton_step._reverse_step_kernel, triton_step._normal_noise_kernel):
        assert not {"stream", "grid", "function"} & set(kernel.arg_names), kernel.arg_names


@pytest.mark.skipif(INTERPRETED, reason="torch.compile of a Triton op needs a GPU (the interpreter cannot be traced)")
def test_torch_compile_sees_the_noise_kernel(device):
    def draw(z):
        out = torch.empty_like(z)
        torch.ops.cfgfast.triton_normal_noise_(out, 3, 4, 1, 2)
        return out + z

    z = torch.zeros(3, 5, 7, device=device)
    compiled = torch.compile(draw, fullgraph=True)
    torch.testing.assert_close(compiled(z), draw(z), rtol=0, atol=0)


@pytest.mark.skipif(INTERPRETED, reason="torch.compile of a Triton op needs a GPU (the interpreter cannot be traced)")
def test_torch_compile_sees_the_kernels(device):
    shape = (4, 3, 17)
    z, ec, eu, w = make_inputs(shape, torch.bfloat16, device)
    coef = COEF.as_list()

    def step(z, ec, eu, w):
        out = torch.empty_like(z)
        torch.ops.cfgfast.triton_reverse_step_(out, z, ec, eu, w, None, coef, 3, 4, 0, None, False)
        return out * 1.0

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(z, ec, eu, w), step(z, ec, eu, w), rtol=0, atol=0)


def test_opcheck(device):
    # Under the interpreter the fake-tensor and AOT checks would run the interpreted kernel on fake tensors.
    utils = ("test_schema", "test_autograd_registration") if INTERPRETED else None
    kwargs = {} if utils is None else {"test_utils": utils}
    z, ec, eu, w = make_inputs((3, 2, 9), torch.bfloat16, device)
    torch.library.opcheck(torch.ops.cfgfast.triton_reverse_step_.default,
                          (torch.empty_like(z), z, ec, eu, w, None, COEF.as_list(), 2**63 - 1, 4, 0, 1.5, False),
                          **kwargs)
    torch.library.opcheck(torch.ops.cfgfast.triton_normal_noise_.default,
                          (torch.empty(2, 9, device=device), -1, 2, 1, 0), **kwargs)


def test_ops_do_nothing_on_meta_tensors():
    """(Meta tensors all sit at address 0: the overlap check refused them as overlapping w.)"""
    def meta(*shape):
        return torch.empty(*shape, device="meta")

    torch.ops.cfgfast.triton_reverse_step_(meta(3, 5), meta(3, 5), meta(3, 5), meta(3, 5), meta(3), None, [1.0] * 7, 1,
                                           0, 0, None, False)
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
    inputs = [torch.randn(3, 4099, device="cuda:0") for _ in range(3)]
    steps = [cfgfast.reverse_step(*(t.to(device) for t in inputs), -1.0, 0.0, 2.0, seed=5, step=2, backend="triton")
             for device in ("cuda:1", "cuda:0")]
    assert steps[0].device == torch.device("cuda:1") and torch.equal(steps[0].cpu(), steps[1].cpu())
    noises = [cfgfast.normal_noise((3, 4099), 5, device=device, backend="triton") for device in ("cuda:1", "cuda:0")]
    assert torch.equal(noises[0].cpu(), noises[1].cpu())


@pytest.mark.parametrize("mode", ["plain", "clip", "last", "noise"])
def test_public_api_with_the_triton_backend(device, mode):
    """cfgfast.reverse_step, normal_noise and reverse_step_table with backend="triton" pass the kernels the same
    arguments as the reference backend gets (eps_cond vs eps_uncond, step vs stream, seed, index_offset, w per
    sample, clip, last, noise): the kernels' own accuracy is checked above, this is the wiring."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 2, 37)
    z, eps_cond, eps_uncond = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    w = torch.tensor([0.5, 2.0, 4.0], device=device)
    noise = torch.randn(shape, generator=g).to(device) if mode == "noise" else None
    kwargs = dict(seed=2**63 + 7, step=5, index_offset=11, clip=1.0 if mode == "clip" else None,
                  last=mode == "last", noise=noise)
    got, want = (cfgfast.reverse_step(z, eps_cond, eps_uncond, -3.0, -1.5, w, 0.3, backend=b, **kwargs)
                 for b in ("triton", "reference"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = (cfgfast.normal_noise((3, 37), 2**40 + 1, step=4, stream=2, index_offset=9, device=device, backend=b)
                 for b in ("triton", "reference"))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    lams = cfgfast.sampling_lambdas(6)
    table = cfgfast.coefficient_table(lams, 0.3).to(device)
    for t in (2, 5):  # a middle step and the last (x~)
        counter = torch.tensor([t], device=device)
        got, want = (cfgfast.reverse_step_table(z, eps_cond, eps_uncond, table, counter, w, seed=9, index_offset=4,
                                                backend=b) for b in ("triton", "reference"))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
