"""cfgfast.moments.sample_moments on every backend against a float64 numpy formula and the torch reference; the fast
backends' sums per sample the same bits whatever the batch, its split, the thread count or the CPU instruction set.

Tolerance: the fast backends add in float64 in another order than the reference; each sum of n terms is within
n 2^-53 of the sum of the terms' magnitudes. ERROR_BUDGET (2^-36) covers n up to 2^17 terms added in one chain
with room to spare, and is still 2^12 times tighter than one float32 rounding of the result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CPU_ISAS, TRITON_INTERPRETED, backend_device

import cfgfast
from cfgfast import _ext
from cfgfast.moments import sample_moments, sample_moments_reference

ERROR_BUDGET = 2.0**-36
RESCALE = [[1.0, 0.0], [4.5, -3.5]]  # o_c and g = w_c o_c - w_u o_u: guidance rescale's two vectors
APG = [[0.0, 4.0, -4.0, 0.9], [1.3, -0.7, 0.0, 0.0]]  # (z, o_c, o_u, buffer): a momentum Delta and x~_c
IDENTITY_2, IDENTITY_3, IDENTITY_4 = ([[float(i == j) for i in range(k)] for j in range(k)] for k in (2, 3, 4))


def moments_float64(inputs, combos):
    """(out, magnitude) in float64 numpy, written from the definition: out[b, j, l] = <v_j, v_l>, out[b, j, V] =
    sum v_j; magnitude: the same sums of |terms|, which bound the rounding error of any order of addition."""
    x = [t.detach().double().cpu().numpy().reshape(t.shape[0], -1) for t in inputs]
    batch, v = x[0].shape[0], len(combos)
    out = np.zeros((batch, v, v + 1))
    mag = np.zeros((batch, v, v + 1))
    vec = [sum(c * xi for c, xi in zip(row, x)) for row in combos]
    for j in range(v):
        out[:, j, v] = vec[j].sum(axis=1)
        mag[:, j, v] = np.abs(vec[j]).sum(axis=1)
        for m in range(v):
            out[:, j, m] = (vec[j] * vec[m]).sum(axis=1)
            mag[:, j, m] = np.abs(vec[j] * vec[m]).sum(axis=1)
    return out, mag


def assert_close_to_float64(got, inputs, combos):
    assert got.dtype == torch.float64 and got.shape == (inputs[0].shape[0], len(combos), len(combos) + 1)
    expected, mag = moments_float64(inputs, combos)
    err = np.abs(got.cpu().numpy() - expected)
    assert np.all(err <= ERROR_BUDGET * mag), f"max error {err.max():.3g}, budget {(ERROR_BUDGET * mag).max():.3g}"


def make_inputs(shape, dtypes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * (i + 1)).to(device=device, dtype=d) for i, d in enumerate(dtypes)]


def fast(backend):
    """The backends whose sums are cut into fixed chunks (the reference's order is torch's)."""
    if backend == "reference":
        pytest.skip("the batch-independence of the fast backends' order of addition")


# (1,): one element; (7,): no whole group of four; (3, 7, 7): 147; 2 * 8192 + 5: three chunks, the last partial
PER_SAMPLE = [(1,), (7,), (3, 7, 7), (2 * 8192 + 5,)]
DTYPES = {
    "f32": (torch.float32,) * 4,
    "bf16": (torch.bfloat16,) * 4,
    "f16": (torch.float16,) * 4,
    "mixed": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


@pytest.mark.parametrize("per_sample", PER_SAMPLE, ids=str)
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=str)
@pytest.mark.parametrize("combos", [RESCALE, APG, [[2.0]], [[1.0, -1.0, 0.5], [0.0, 1.0, 0.0], [3.0, 0.0, -2.0],
                                                              [0.25, 0.25, 0.25]], IDENTITY_4],
                         ids=["rescale", "apg", "one", "3-inputs-4-vectors", "identity-4"])
def test_matches_float64_formula(backend, per_sample, dtypes, combos):
    k = len(combos[0])
    inputs = make_inputs((3,) + per_sample, DTYPES[dtypes][:k], seed=len(per_sample), device=backend_device(backend))
    got = sample_moments(inputs, combos, backend=backend)
    assert_close_to_float64(got, inputs, combos)
    torch.testing.assert_close(got, sample_moments_reference(inputs, combos), rtol=2e-12, atol=1e-12)


@pytest.mark.parametrize("per_sample", PER_SAMPLE + [(5, 4099)], ids=str)
def test_a_sample_does_not_depend_on_its_batch(backend, per_sample):
    fast(backend)
    if backend == "triton" and TRITON_INTERPRETED and math.prod(per_sample) > 8192:
        per_sample = (8192 + 3,)  # two chunks are enough for the interpreter
    inputs = make_inputs((7,) + per_sample, (torch.float32, torch.bfloat16), seed=3, device=backend_device(backend))
    whole = sample_moments(inputs, RESCALE, backend=backend)
    for i, j in ((0, 3), (3, 4), (4, 7), (6, 7)):
        part = sample_moments([t[i:j] for t in inputs], RESCALE, backend=backend)
        assert torch.equal(part, whole[i:j]), f"samples {i}:{j} differ from the whole batch's"


@pytest.mark.needs_extension
def test_cpu_sums_do_not_depend_on_threads_or_instruction_set():
    inputs = make_inputs((5, 3 * 8192 + 7), (torch.float32, torch.bfloat16, torch.float16, torch.float32), seed=4)
    threads = torch.get_num_threads()
    results = {}
    try:
        for isa in CPU_ISAS:
            previous = _ext.load().set_cpu_isa(isa)
            try:
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    results[(isa, n)] = sample_moments(inputs, APG, backend="cpu")
            finally:
                _ext.load().set_cpu_isa(previous)
    finally:
        torch.set_num_threads(threads)
    first = next(iter(results.values()))
    for key, got in results.items():
        assert torch.equal(got, first), f"{key} differs from {next(iter(results))}"


def _bits_on_every_isa(inputs, combos):
    """{isa: the moments' bits (int64, so that NaNs compare too)} with one thread."""
    threads = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(1)
        for isa in CPU_ISAS:
            previous = _ext.load().set_cpu_isa(isa)
            try:
                results[isa] = sample_moments(inputs, combos, backend="cpu").view(torch.int64)
            finally:
                _ext.load().set_cpu_isa(previous)
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("combos", [RESCALE, APG, IDENTITY_2, IDENTITY_3, IDENTITY_4, [[1.0, 0.0], [2.0, 0.0]]],
                         ids=["rescale", "apg", "identity", "identity-3", "identity-4", "second-input-unread"])
def test_inputs_of_one_type_give_the_same_bits_on_every_instruction_set(dtype, combos):
    """Inputs of one type are widened in registers (AVX2), and where the combos are the identity every v_j = x_j is
    taken as it is, with fused multiply-adds for the exact products of 32-bit inputs: the same bits as the scalar
    code, also with signed zeros, infinities and NaNs (where 0 x_i is NaN), and where a product overflows float64."""
    k = len(combos[0])
    inputs = make_inputs((6, 2 * 8192 + 7), (dtype,) * k, seed=8)
    inputs[0][0, :100] = -0.0  # v_0 = -0 where x_1 is 0 (0 x_1 = +0 would make it +0)
    inputs[-1][0, :50] = 0.0
    inputs[-1][1, 9000] = float("inf")
    inputs[-1][2, 3] = float("nan")
    inputs[0][3, 8200] = float("-inf")
    inputs[-1][3, 8201] = float("inf")
    if dtype == torch.float64:
        inputs[-1][4, 17] = 1e300  # finite, but its square is not
    results = _bits_on_every_isa(inputs, combos)
    first = next(iter(results.values()))
    for isa, got in results.items():
        assert torch.equal(got, first), f"{isa} differs from {next(iter(results))}"


def test_views_are_read_in_logical_order(backend):
    fast(backend)
    device = backend_device(backend)
    base = torch.randn(6, 3, 10, 8, device=device)
    z = base[::2, :, 1:9, :].transpose(2, 3)  # [3, 3, 8, 8], strided
    o = torch.randn(3, 8, 8, 3, device=device).permute(0, 3, 1, 2).to(torch.bfloat16)
    assert not z.is_contiguous() and not o.is_contiguous()
    got = sample_moments([z, o], [[1.0, 2.0], [0.5, -1.0]], backend=backend)
    dense = sample_moments([z.contiguous(), o.contiguous()], [[1.0, 2.0], [0.5, -1.0]], backend=backend)
    assert torch.equal(got, dense)


def test_empty_samples_and_batches(backend):
    device = backend_device(backend)
    got = sample_moments([torch.empty(3, 0, device=device)] * 2, RESCALE, backend=backend)
    assert torch.equal(got, torch.zeros(3, 2, 3, dtype=torch.float64))
    got = sample_moments([torch.empty(0, 4, 5, device=device)], [[1.0], [2.0]], backend=backend)
    assert got.shape == (0, 2, 3) and got.dtype == torch.float64


def test_gram_is_symmetric_and_nan_stays_in_its_sample(backend):
    device = backend_device(backend)
    inputs = make_inputs((4, 37), (torch.float32, torch.float32), seed=5, device=device)
    inputs[1][2, 5] = float("nan")
    got = sample_moments(inputs, [[1.0, 0.0], [0.3, 2.0], [1.0, -1.0]], backend=backend)
    assert torch.isnan(got[2]).all()  # (0 x NaN is NaN: every v_j reads every input)
    rest = got[[0, 1, 3]]
    assert not torch.isnan(rest).any()
    assert torch.equal(rest[:, :, :3], rest[:, :, :3].transpose(1, 2))


def test_the_moments_of_guidance_rescale_and_apg(backend):
    """What the guidance methods read from the moments: std(o_c) and std(g) per sample (rescale), and APG's dot
    products, equal to the same quantities in float64 torch."""
    device = backend_device(backend)
    z, oc, ou, buf = make_inputs((3, 3, 8, 8), (torch.float32,) * 4, seed=6, device=device)
    w_c, w_u = 4.5, 3.5
    m = sample_moments([oc, ou], [[1.0, 0.0], [w_c, -w_u]], backend=backend)
    n = oc[0].numel()
    std = ((m[:, :, :2].diagonal(dim1=1, dim2=2) - m[:, :, 2] ** 2 / n) / (n - 1)).sqrt()
    g = w_c * oc.double() - w_u * ou.double()
    torch.testing.assert_close(std[:, 0], oc.double().flatten(1).std(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(std[:, 1], g.flatten(1).std(dim=1), rtol=1e-12, atol=0)
    m = sample_moments([z, oc, ou, buf], APG, backend=backend)
    delta = (4.0 * (oc.double() - ou.double()) + 0.9 * buf.double()).flatten(1)
    x_c = (1.3 * z.double() - 0.7 * oc.double()).flatten(1)
    torch.testing.assert_close(m[:, 0, 0], (delta * delta).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(m[:, 0, 1], (delta * x_c).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(m[:, 1, 1], (x_c * x_c).sum(1), rtol=1e-12, atol=0)


@pytest.mark.needs_extension
def test_auto_takes_the_compiled_op_on_cpu():
    inputs = make_inputs((3, 4099), (torch.float32, torch.bfloat16), seed=7)
    assert torch.equal(sample_moments(inputs, RESCALE), sample_moments(inputs, RESCALE, backend="cpu"))
    assert torch.equal(sample_moments(inputs, RESCALE, backend="reference"), sample_moments_reference(inputs, RESCALE))


@pytest.mark.parametrize("inputs, combos, backend, error, match", [
    (torch.zeros(2, 3), [[1.0]], "auto", TypeError, "inputs must be a sequence"),
    ([], [[1.0]], "auto", ValueError, "inputs must hold 1 to 4"),
    ([torch.zeros(2, 3)] * 5, [[1.0] * 5], "auto", ValueError, "inputs must hold 1 to 4"),
    ([torch.zeros(2, 3), 1.0], [[1.0, 1.0]], "auto", TypeError, r"inputs\[1\] must be a tensor"),
    ([torch.zeros(2, 3, dtype=torch.int32)], [[1.0]], "auto", TypeError, r"inputs\[0\] must be float32"),
    ([torch.zeros(())], [[1.0]], "auto", ValueError, "batch dimension"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [[1.0, 1.0]], "auto", ValueError, r"inputs\[1\] must have the shape"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], [[1.0, 1.0]], "auto", ValueError, r"inputs\[1\] must be on"),
    ([torch.zeros(2, 3)], [], "auto", ValueError, "combos must be 1 to 4 rows"),
    ([torch.zeros(2, 3)], [[1.0]] * 5, "auto", ValueError, "combos must be 1 to 4 rows"),
    ([torch.zeros(2, 3)] * 2, [[1.0]], "auto", ValueError, r"combos\[0\] must hold 2 numbers"),
    ([torch.zeros(2, 3)], [["a"]], "auto", TypeError, r"combos\[0\] must hold real numbers"),
    ([torch.zeros(2, 3)], [[1.0]], "fast", ValueError, "backend must be one of"),
    ([torch.zeros(2, 3, device="meta")], [[1.0]], "cpu", RuntimeError, "backend 'cpu' cannot run"),
])
def test_bad_arguments_are_named(inputs, combos, backend, error, match):
    with pytest.raises(error, match=match):
        sample_moments(inputs, combos, backend=backend)


@pytest.mark.needs_extension
@pytest.mark.parametrize("inputs, combos, num_vectors, error, match", [
    ([torch.zeros(2, 3)] * 5, [1.0] * 5, 1, ValueError, "inputs must hold 1 to 4"),
    ([torch.zeros(2, 3)], [1.0] * 5, 5, ValueError, "num_vectors must be in"),
    ([torch.zeros(2, 3)] * 2, [1.0] * 3, 2, ValueError, "combos must hold num_vectors x len"),
    ([torch.zeros(())], [1.0], 1, ValueError, "batch dimension"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)], [1.0, 1.0], 1, TypeError, r"inputs\[1\] must be"),
    ([torch.zeros(2, 3), torch.zeros(3, 2)], [1.0, 1.0], 1, ValueError, r"inputs\[1\] must have the shape"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, device="meta")], [1.0, 1.0], 1, ValueError, r"inputs\[1\] must be on"),
])
def test_op_refuses_bad_arguments(inputs, combos, num_vectors, error, match):
    """A direct torch.ops call checks its arguments too, as its fake kernel does."""
    with pytest.raises(error, match=match):
        torch.ops.cfgfast.sample_moments(inputs, combos, num_vectors)


@pytest.mark.needs_extension
def test_op_reads_a_storage_too_small_for_its_view_nowhere():
    t = torch.zeros(4, 100)
    view = t[:, :50]
    t.untyped_storage().resize_(16)
    with pytest.raises(ValueError, match=r"inputs\[0\] needs"):
        torch.ops.cfgfast.sample_moments([view], [1.0], 1)


def test_reference_reads_a_storage_too_small_for_its_view_nowhere():
    """The reference backend makes the op's checks (cfgfast/_checks.py's twin of csrc/op_checks.h), storage too."""
    t = torch.zeros(4, 100)
    view = t[:, :50]
    t.untyped_storage().resize_(16)
    with pytest.raises(ValueError, match=r"cfgfast: inputs\[0\] needs 1400 bytes of its storage, which holds 16"):
        sample_moments([view], [[1.0]], backend="reference")


@pytest.mark.needs_extension
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 8192 + 1), (1, 0)], ids=str)
def test_opcheck(shape):
    inputs = make_inputs(shape, (torch.float32, torch.bfloat16, torch.float16), seed=8)
    torch.library.opcheck(torch.ops.cfgfast.sample_moments.default, (inputs, [1.0, 2.0, -1.0, 0.5, 0.0, 3.0], 2))


@pytest.mark.needs_extension
def test_compiled_equals_eager():
    inputs = make_inputs((4, 3, 8, 8), (torch.float32, torch.bfloat16), seed=9)

    def f(a, b):
        return sample_moments([a, b], RESCALE)

    assert torch.equal(torch.compile(f, fullgraph=True)(*inputs), f(*inputs))


def test_triton_interpreted_is_its_own_backend():
    if not TRITON_INTERPRETED:
        pytest.skip("the Triton interpreter (no GPU here)")
    inputs = make_inputs((2, 33), (torch.float32,), seed=10)
    assert_close_to_float64(sample_moments(inputs, [[1.0], [-2.0]], backend="triton"), inputs, [[1.0], [-2.0]])
    assert "triton" not in cfgfast.available_backends()  # (the interpreter is for tests: "auto" never takes it)
