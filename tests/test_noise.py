"""The noise of SPEC §3 on every backend, against an independent float64 NumPy implementation written here.

Tolerances (float32 output against the float64 value n of SPEC §3):
- reference backend: float64 rounded once to float32, so |err| <= ulp32(n) / 2 (+1e-15 for float64 noise).
- cpu backend: float32 Cephes polynomials for ln/sin/cos. Measured over 10.5 M normals (both ISAs,
  seeds/steps/offsets varied): max |err| / |n| = 2.56e-7 (3.4 ulp32 of n), max |err| = 6.9e-7 at |n| = 5.2.
  CPU_RTOL = 5e-7 (about 4 float32 eps: ~1 ulp each from ln, sqrt, sin/cos and the product, with a 2x
  margin over the measurement); the 1e-12 absolute slack only covers n = 0 exactly (a quarter turn), where
  the float64 cos(pi/2) is 6e-17, not 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cfgfast
from cfgfast import _checks, _ext

CPU_RTOL = 5e-7
CPU_ATOL = 1e-12

# ---------------------------------------------------------------- independent SPEC §3 in NumPy

_MASK = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)


def philox_np(counter, key):
    """Philox4x32-10 (Random123) on uint64 arrays holding 32-bit words: 32x32 -> 64-bit products exact."""
    x0, x1, x2, x3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = _M0 * x0, _M1 * x2
        x0, x1, x2, x3 = (p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return x0, x1, x2, x3


def box_muller_np(x0, x1, x2, x3):
    """Words to four float64 normals per group, [..., 4]."""
    scale = 2.0**-24
    radius = [np.sqrt(-2.0 * np.log(((x >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * scale)) for x in (x0, x2)]
    angle = [2.0 * np.pi * scale * (x >> np.uint64(8)).astype(np.float64) for x in (x1, x3)]
    return np.stack([radius[0] * np.cos(angle[0]), radius[0] * np.sin(angle[0]),
                     radius[1] * np.cos(angle[1]), radius[1] * np.sin(angle[1])], axis=-1)


def normals_np(shape, seed, step=0, stream=1, index_offset=0):
    """Float64 normals of SPEC §3 for samples index_offset .. index_offset + shape[0] - 1."""
    batch, per_sample = shape[0], math.prod(shape[1:])
    groups = (per_sample + 3) // 4
    group = np.broadcast_to(np.arange(groups, dtype=np.uint64), (batch, groups))
    sample = np.broadcast_to(np.arange(index_offset, index_offset + batch, dtype=np.uint64)[:, None], (batch, groups))
    words = philox_np((group, sample, step, stream), (seed % 2**32, (seed >> 32) % 2**32))
    return box_muller_np(*words).reshape(batch, 4 * groups)[:, :per_sample].reshape(shape)


def assert_close_to_exact(got: torch.Tensor, exact: np.ndarray, backend: str):
    """got (float32) against the float64 values, at the tolerance of the backend (module docstring)."""
    got = got.cpu()
    assert got.dtype == torch.float32 and tuple(got.shape) == exact.shape
    g = got.double().numpy()
    err = np.abs(g - exact)
    if backend == "reference":
        tol = 0.5 * np.spacing(np.abs(got.numpy())).astype(np.float64) + 1e-15
    else:
        tol = CPU_RTOL * np.abs(exact) + CPU_ATOL
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise AssertionError(f"{backend}: {bad.sum()} of {bad.size} normals off; first at flat {i}: "
                             f"{g.flat[i]!r} vs {exact.flat[i]!r} (tol {tol.flat[i]:.3g})")


# ---------------------------------------------------------------- Philox known answers (SPEC §3)

KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers_reference(counter, key, expected):
    words = cfgfast.reference.philox4x32_10(counter, key)
    assert [int(w) for w in words] == list(expected)
    # and elementwise on tensors: the same counter in every lane of a batch
    lanes = cfgfast.reference.philox4x32_10(tuple(torch.full((3,), c, dtype=torch.int64) for c in counter), key)
    assert [w.tolist() for w in lanes] == [[e] * 3 for e in expected]


@pytest.mark.needs_extension
@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers_extension(counter, key, expected):
    assert list(_ext.load().philox4x32_10(list(counter), list(key))) == list(expected)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers_numpy_oracle(counter, key, expected):
    """The test's own oracle must pass the same vectors."""
    assert [int(w) for w in philox_np(counter, key)] == list(expected)


def test_known_answer_layout(backend, device):
    """Counter (j/4, b, t, stream) = 0 and seed 0 is the first known-answer vector: its normals come first."""
    exact = box_muller_np(*(np.uint64(w) for w in KNOWN_ANSWERS[0][2]))
    got = cfgfast.normal_noise((1, 4), seed=0, step=0, stream=0, index_offset=0, backend=backend, device=device)
    assert_close_to_exact(got, exact.reshape(1, 4), backend)


# Seed 0, step 3, stream 1, sample 14573718, group 0: x0 = 0xffffff7b, so u(x0) = 1 and the radius is zero (found by
# searching the sample indices with philox_np; one group in 2^23 has such a radius word).
ZERO_RADIUS = dict(seed=0, step=3, stream=1, index_offset=14573718)


def test_zero_radius(backend, device):
    """u = 1 exactly: ln u = 0 and a zero radius, so the group's first two normals are zeros (not NaN: the CUDA
    kernels take the square root without the slow path that rsqrt(0) = inf would otherwise need)."""
    words = philox_np((0, ZERO_RADIUS["index_offset"], ZERO_RADIUS["step"], ZERO_RADIUS["stream"]), (0, 0))
    assert int(words[0]) >> 8 == 0xFFFFFF, "the counter no longer gives u = 1"
    got = cfgfast.normal_noise((1, 4), **ZERO_RADIUS, backend=backend, device=device)
    assert got[0, :2].tolist() == [0.0, 0.0]
    assert_close_to_exact(got, normals_np((1, 4), **ZERO_RADIUS), backend)


def test_out_on_the_device_as_named(backend, device):
    """out= on the device as users name it: "cuda" for a tensor on cuda:0 (a tensor's device has an index)."""
    shape = (2, 3, 5)
    out = torch.full(shape, float("nan"), device=device)
    got = cfgfast.normal_noise(shape, 5, 2, 1, 3, backend=backend, device=device, out=out)
    assert got is out
    assert_close_to_exact(out, normals_np(shape, 5, 2, 1, 3), backend)


# ---------------------------------------------------------------- values on every backend

SHAPES = [
    (3, 1), (2, 2), (5, 3), (2, 5), (3, 7), (2, 4097),   # 1-D samples of 1, 2, 3, 5, 7, 4097 elements
    (3, 1, 7), (2, 17, 241), (1, 64, 2),                  # 2-D
    (2, 1, 1, 1, 1), (2, 1, 3, 1, 1), (2, 1, 17, 1, 241), (2, 3, 3, 33, 33),  # 4-D; 9801 spans two kernel blocks
]
KEYS = [  # (seed, step, stream, index_offset); index_offset None: the largest allowed, 2^32 - batch
    (0, 0, 0, 0),
    (1, 5, 1, 3),
    (2**32 + 7, 255, 1, 2**31 + 1),
    (2**64 - 1, 2**32 - 1, 2**32 - 1, None),
]


@pytest.mark.parametrize("seed, step, stream, index_offset", KEYS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_normal_noise_matches_float64(backend, device, shape, seed, step, stream, index_offset):
    if index_offset is None:
        index_offset = 2**32 - shape[0]
    got = cfgfast.normal_noise(shape, seed, step, stream, index_offset, backend=backend, device=device)
    assert_close_to_exact(got, normals_np(shape, seed, step, stream, index_offset), backend)


@pytest.mark.needs_extension
def test_cpu_kernel_error_on_a_large_draw(cpu_isas):
    """~10^6 normals: the CPU kernel's float32 ln/sin/cos stay within CPU_RTOL of float64 (measured 2.6e-7)."""
    shape, seed, step = (16, 62501), 2**40 + 12345, 17
    exact = normals_np(shape, seed, step, 1, 1000)
    got = cfgfast.normal_noise(shape, seed, step, 1, 1000, backend="cpu")
    assert_close_to_exact(got, exact, "cpu")
    # Typical error below one float32 rounding (measured mean 4.3e-8 relative): no bias hiding under the max.
    rel = np.abs(got.double().numpy() - exact) / np.maximum(np.abs(exact), 1e-30)
    assert rel.mean() < 1e-7


@pytest.mark.needs_extension
@pytest.mark.parametrize("shape, seed, step, stream, index_offset",
                         [((4, 3, 5), 9, 2, 1, 11), ((3, 4097), 2**63, 7, 0, 2**32 - 3), ((2, 2, 3, 3, 5), 1, 0, 0, 0)])
def test_backends_agree(cpu_isas, shape, seed, step, stream, index_offset):
    """Same (seed, step, stream, index) -> same normals on every backend (the words agree exactly, or the
    difference would be O(1))."""
    ref = cfgfast.normal_noise(shape, seed, step, stream, index_offset, backend="reference")
    cpu = cfgfast.normal_noise(shape, seed, step, stream, index_offset, backend="cpu")
    torch.testing.assert_close(cpu, ref, rtol=2 * CPU_RTOL, atol=CPU_ATOL)


@pytest.mark.needs_extension
def test_cpu_isas_agree():
    """The scalar and AVX2 bodies evaluate the same float32 formulas, to a few ulps (not bit for bit: the AVX2 body
    fuses a * b + c into one rounding, the scalar one rounds twice)."""
    isas = _ext.load().build_info()["cpu_isa_supported"]
    if len(isas) < 2:
        pytest.skip("only one CPU instruction set on this machine")
    results = []
    previous = _ext.load().cpu_isa()
    try:
        for isa in isas:
            _ext.load().set_cpu_isa(isa)
            results.append(cfgfast.normal_noise((3, 4097), 5, 3, 1, 8, backend="cpu"))
    finally:
        _ext.load().set_cpu_isa(previous)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=2 * CPU_RTOL, atol=0)


def test_auto_backend():
    expected = "cpu" if "cpu" in cfgfast.available_backends() else "reference"
    auto = cfgfast.normal_noise((2, 7), 3, 1, 1, 5)
    assert torch.equal(auto, cfgfast.normal_noise((2, 7), 3, 1, 1, 5, backend=expected))
    assert auto.device.type == "cpu"


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 7)])
def test_empty(backend, device, shape):
    out = cfgfast.normal_noise(shape, 1, backend=backend, device=device)
    assert out.shape == shape and out.dtype == torch.float32


# ---------------------------------------------------------------- statistics

# On the default backend only (cpu where built): every backend's values are tied elementwise to the float64
# oracle above, so these test SPEC §3 itself (counter layout, Box-Muller) without repeating slow draws.
N_STATS = 2**20


def _draw(backend="auto", shape=(16, N_STATS // 16), seed=2024, step=3, stream=1, index_offset=0):
    return cfgfast.normal_noise(shape, seed, step, stream, index_offset, backend=backend).double().flatten()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def test_moments_and_tails():
    n = _draw()
    size = n.numel()
    # 5 standard errors: mean 1/sqrt(N), std 1/sqrt(2N); tails binomial. Fixed seed: deterministic.
    assert abs(n.mean().item()) < 5 / math.sqrt(size)
    assert abs(n.std().item() - 1) < 5 / math.sqrt(2 * size)
    for k in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(k / math.sqrt(2))
        assert abs((n.abs() > k).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / size), f"P(|n|>{k})"
    assert abs((n > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(size)
    # Box-Muller with u >= 2^-24 bounds |n| by sqrt(48 ln 2) = 5.768
    assert n.abs().max().item() <= math.sqrt(48 * math.log(2)) * (1 + 1e-6)
    # the four outputs of a group (cos/sin pairs share a radius) are uncorrelated, in value and in square
    quads = n.reshape(-1, 4)
    limit = 5 / math.sqrt(quads.shape[0])
    for i, j in [(0, 1), (2, 3), (0, 2), (1, 3)]:
        assert abs(_corr(quads[:, i], quads[:, j])) < limit, (i, j)
        assert abs(_corr(quads[:, i] ** 2, quads[:, j] ** 2)) < limit, (i, j)
    for lag in (1, 4, 5):
        assert abs(_corr(n[:-lag], n[lag:])) < 5 / math.sqrt(size), f"lag {lag}"


@pytest.mark.parametrize("change", [
    dict(seed=2025), dict(seed=2024 + 2**32), dict(step=4), dict(stream=0), dict(index_offset=16),
])
def test_streams_uncorrelated(change):
    base = _draw()
    other = _draw(**change)
    assert abs(_corr(base, other)) < 5 / math.sqrt(N_STATS), change


def test_samples_uncorrelated():
    n = cfgfast.normal_noise((2, N_STATS // 2), 99, 0, 0, 0).double()
    assert abs(_corr(n[0], n[1])) < 5 / math.sqrt(N_STATS // 2)


# ---------------------------------------------------------------- batch position

SPLIT_CASES = [((5, 7), 0), ((4, 3, 5), 12), ((6, 2, 1, 3, 3), 2**32 - 6), ((3, 4097), 1000)]


@pytest.mark.parametrize("shape, index_offset", SPLIT_CASES)
def test_batch_position_invariance(backend, device, shape, index_offset):
    whole = cfgfast.normal_noise(shape, 77, 9, 1, index_offset, backend=backend, device=device)
    for i in range(shape[0]):
        alone = cfgfast.normal_noise((1,) + shape[1:], 77, 9, 1, index_offset + i, backend=backend, device=device)
        assert torch.equal(whole[i], alone[0]), f"sample {i}"
    for cut in (1, shape[0] // 2, shape[0] - 1):
        head = cfgfast.normal_noise((cut,) + shape[1:], 77, 9, 1, index_offset, backend=backend, device=device)
        tail = cfgfast.normal_noise((shape[0] - cut,) + shape[1:], 77, 9, 1, index_offset + cut, backend=backend, device=device)
        assert torch.equal(torch.cat([head, tail]), whole), f"split at {cut}"


# ---------------------------------------------------------------- the op itself


@pytest.mark.needs_extension
@pytest.mark.parametrize("shape, seed, step, stream, index_offset", [
    ((3, 1), 0, 0, 0, 0), ((2, 7), 2**64 - 1, 1, 1, 5), ((2, 4097), 2**63, 3, 0, 2**32 - 2),
    ((3, 2, 1, 5, 3), 2**32 + 7, 2**32 - 1, 2**32 - 1, 9), ((2, 3, 3, 33, 33), 12, 4, 1, 0),
])
def test_op_writes_every_element_and_nothing_else(cpu_isas, shape, seed, step, stream, index_offset):
    """Out poisoned with NaN inside a larger NaN buffer: every element written, no write outside it."""
    numel, pad = math.prod(shape), 67
    buffer = torch.full((numel + 2 * pad,), float("nan"))
    out = buffer[pad:pad + numel].view(shape)
    torch.ops.cfgfast.normal_noise_(out, _checks.seed_as_int64(seed), step, stream, index_offset)
    assert not bool(out.isnan().any()), "unwritten elements"
    assert bool(buffer[:pad].isnan().all() and buffer[pad + numel:].isnan().all()), "write outside out"
    assert_close_to_exact(out, normals_np(shape, seed, step, stream, index_offset), "cpu")
    assert torch.equal(out, cfgfast.normal_noise(shape, seed, step, stream, index_offset, backend="cpu"))


@pytest.mark.needs_extension
def test_opcheck():
    op = torch.ops.cfgfast.normal_noise_
    for shape, args in [((3, 5, 7), (5, 1, 1, 2)), ((2, 4097), (_checks.seed_as_int64(2**64 - 1), 0, 0, 7)),
                        ((1, 1), (0, 2**32 - 1, 2**32 - 1, 2**32 - 1))]:
        torch.library.opcheck(op, (torch.full(shape, float("nan")), *args))


@pytest.mark.needs_extension
@pytest.mark.parametrize("out, args, error, match", [
    (torch.empty(4, 6).t(), (0, 0, 1, 0), ValueError, "contiguous"),
    (torch.empty(2, 3, dtype=torch.float64), (0, 0, 1, 0), TypeError, "float32"),
    (torch.empty(()), (0, 0, 1, 0), ValueError, "batch"),
    (torch.empty(2, 3), (0, -1, 1, 0), ValueError, "step"),
    (torch.empty(2, 3), (0, 0, 2**32, 0), ValueError, "stream"),
    (torch.empty(2, 3), (0, 0, 1, 2**32 - 1), ValueError, "index_offset"),
])
def test_op_refuses_bad_out(out, args, error, match):
    """A direct torch.ops call checks its arguments too (csrc/op_checks.h), instead of writing out of bounds."""
    with pytest.raises(error, match=match):
        torch.ops.cfgfast.normal_noise_(out, *args)


# ---------------------------------------------------------------- bad input to normal_noise

BAD_INPUTS = [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(step=-1), ValueError, "step"),
    (dict(step=2**32), ValueError, "step"),
    (dict(step=1.5), TypeError, "step"),
    (dict(step=2.0), TypeError, "step"),
    (dict(step=None), TypeError, "step"),
    (dict(stream=-1), ValueError, "stream"),
    (dict(stream=2**32), ValueError, "stream"),
    (dict(stream=0.0), TypeError, "stream"),
    (dict(index_offset=-1), ValueError, "index_offset"),
    (dict(index_offset=2**32 - 2), ValueError, "index_offset"),  # batch 3: index_offset + batch > 2^32
    (dict(index_offset=2**32), ValueError, "index_offset"),
    (dict(index_offset=1.0), TypeError, "index_offset"),
    (dict(shape=5), TypeError, "shape"),
    (dict(shape="3x4"), TypeError, "shape"),
    (dict(shape=None), TypeError, "shape"),
    (dict(shape=()), ValueError, "shape"),
    (dict(shape=(3, -1)), ValueError, "shape"),
    (dict(shape=(-3, 4)), ValueError, "shape"),
    (dict(shape=(3, 4.0)), TypeError, "shape"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(backend="Reference"), ValueError, "backend"),
    (dict(backend=None), TypeError, "backend"),
    (dict(device="gpu"), ValueError, "device must be"),
    (dict(device=f"cuda:{torch.cuda.device_count()}"), ValueError, "device cuda:.* is not available"),  # one past the last
]


@pytest.mark.parametrize("backend_name", ["auto", "reference"])  # the reference has no check of its own
@pytest.mark.parametrize("change, error, match", BAD_INPUTS, ids=lambda x: repr(x) if isinstance(x, dict) else None)
def test_bad_input(change, error, match, backend_name):
    kwargs = dict(shape=(3, 4), seed=0, step=0, stream=1, index_offset=0, backend=backend_name) | change
    with pytest.raises(error, match=match):
        cfgfast.normal_noise(**kwargs)


def test_valid_limits_accepted():
    """The edges of the ranges above are valid: the checks are not off by one."""
    assert cfgfast.normal_noise((3, 4), 2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 3).shape == (3, 4)
    assert cfgfast.normal_noise([2, 3], torch.tensor(5), step=torch.tensor(1)).shape == (2, 3)
    assert cfgfast.normal_noise(torch.Size([1, 2]), np.uint64(2**64 - 1), np.int64(3)).shape == (1, 2)


def test_cpu_backend_without_extension(monkeypatch):
    """The extension missing: backend='cpu' raises naming it and the rebuild command; 'auto' falls back."""
    monkeypatch.setattr(_ext, "error", lambda: "ImportError: simulated missing cfgfast._C")
    assert "cpu" not in cfgfast.available_backends()
    with pytest.raises(RuntimeError, match=r"backend 'cpu'.*simulated missing cfgfast\._C.*pip install"):
        cfgfast.normal_noise((2, 3), 0, backend="cpu")
    fallback = cfgfast.normal_noise((2, 3), 4, 1, 1, 2)
    assert_close_to_exact(fallback, normals_np((2, 3), 4, 1, 1, 2), "reference")


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("cpu", marks=pytest.mark.needs_extension)])
def test_normal_noise_writes_into_out(backend_name):
    shape = (3, 2, 11)
    out = torch.full(shape, float("nan"))
    result = cfgfast.normal_noise(shape, 5, step=2, out=out, backend=backend_name)
    assert result.data_ptr() == out.data_ptr()
    assert cfgfast.normal_noise(shape, 5, step=2, out=out, device="cpu:0", backend=backend_name) is result  # cpu
    expected = cfgfast.normal_noise(shape, 5, step=2, backend="reference")
    torch.testing.assert_close(out, expected, rtol=5e-7, atol=1e-12)
    for bad in (torch.empty(3, 2, 10), torch.empty(shape, dtype=torch.float64), torch.empty(2, 11, 3).transpose(0, 2)):
        with pytest.raises(ValueError, match="out must be a contiguous float32 tensor"):
            cfgfast.normal_noise(shape, 5, out=bad, backend=backend_name)
