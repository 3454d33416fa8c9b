"""SPEC §5: every bad input to reverse_step gets a ValueError/TypeError naming the argument, on every
backend, and a direct call of the compiled op with bad arguments raises instead of crashing."""

from __future__ import annotations

import math

import pytest
import torch

import cfgfast

BACKENDS = [b for b in ("reference", "cpu") if b in cfgfast.available_backends()]


def good(**overrides):
    z = torch.randn(3, 4, 5)
    kwargs = dict(z=z, eps_cond=torch.randn_like(z), eps_uncond=torch.randn_like(z), lam=-1.0, lam_next=0.0, w=1.0,
                  v=0.3)
    kwargs.update(overrides)
    return kwargs


def call(backend, **overrides):
    kwargs = good(**overrides)
    args = [kwargs.pop(k) for k in ("z", "eps_cond", "eps_uncond", "lam", "lam_next", "w", "v")]
    return cfgfast.reverse_step(*args, backend=backend, **kwargs)


CASES = [
    # (overrides, exception, message that names the argument)
    (dict(z=torch.randn(3, 4, 5, dtype=torch.float64)), TypeError, "z must be float32"),
    (dict(z=[1.0, 2.0]), TypeError, "z must be a torch.Tensor"),
    (dict(z=torch.tensor(1.0)), ValueError, "batch dimension"),
    (dict(eps_cond=torch.randn(3, 4, 6)), ValueError, "eps_cond must have the shape of z"),
    (dict(eps_uncond=torch.randn(3, 20)), ValueError, "eps_uncond must have the shape of z"),
    (dict(eps_cond=torch.ones(3, 4, 5, dtype=torch.int32)), TypeError, "eps_cond must be float32, bfloat16"),
    (dict(eps_uncond=torch.randn(3, 4, 5, dtype=torch.float16)), TypeError,
     "eps_uncond must have the dtype of eps_cond"),
    (dict(eps_cond=torch.randn(3, 4, 5, device="meta")), ValueError, "eps_cond must be on z's device"),
    (dict(noise=torch.randn(3, 4, 4)), ValueError, "noise must have the shape of z"),
    (dict(noise=torch.randn(3, 4, 5, device="meta")), ValueError, "noise must be on z's device"),
    (dict(noise=torch.ones(3, 4, 5, dtype=torch.int64)), TypeError, "noise must be a floating-point"),
    (dict(w=torch.ones(2)), ValueError, r"w must be a number or a tensor of shape \[3\]"),
    (dict(w=torch.ones(3, 1)), ValueError, r"w must be a number or a tensor of shape \[3\]"),
    (dict(w=float("nan")), ValueError, "w must be finite"),
    (dict(w=math.inf), ValueError, "w must be finite"),
    (dict(w=torch.tensor([1.0, float("inf"), 0.0])), ValueError, "w must be finite"),
    (dict(w="2"), TypeError, "w must be a real number"),
    (dict(v=-0.1), ValueError, r"v must be in \[0, 1\]"),
    (dict(v=1.5), ValueError, r"v must be in \[0, 1\]"),
    (dict(v=float("nan")), ValueError, "v must be finite"),
    (dict(lam=0.0, lam_next=0.0), ValueError, "lam must be below lam_next"),
    (dict(lam=1.0, lam_next=-1.0), ValueError, "lam must be below lam_next"),
    (dict(lam=float("nan")), ValueError, "lam must be finite"),
    (dict(lam_next=float("inf")), ValueError, "lam_next must be finite"),
    (dict(lam=-1500.0), ValueError, r"lam must lie in \[-80, 80\]"),  # finite, but its step overflows
    (dict(lam_next=80.5), ValueError, r"lam_next must lie in \[-80, 80\]"),
    (dict(lam=torch.tensor([1.0, 2.0])), ValueError, "lam must be a number or a one-element tensor"),
    (dict(lam=torch.tensor(1.0, device="meta")), ValueError, "lam must have a value, got a tensor on the meta"),
    (dict(w=torch.ones(3, device="meta")), ValueError, "w must have values, got a tensor on the meta device"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(seed=2**64), ValueError, "seed must be at least 0, below"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(step=-3), ValueError, "step must be at least 0"),
    (dict(step=2**32), ValueError, "step must be at least 0, below"),
    (dict(index_offset=-1), ValueError, "index_offset must be at least 0"),
    (dict(index_offset=2**32 - 2), ValueError, "index_offset must be at least 0, below"),  # + batch 3 > 2^32
    (dict(clip=0.0), ValueError, "clip must be positive"),
    (dict(clip=float("nan")), ValueError, "clip must be finite"),
    (dict(last=1), TypeError, "last must be a bool"),
    (dict(out=torch.empty(3, 4, 5, dtype=torch.float64)), ValueError, "out must be a contiguous float32"),
    (dict(out=torch.empty(5, 4, 3).transpose(0, 2)), ValueError, "out must be a contiguous float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides,exc,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_is_named(backend, overrides, exc, message):
    with pytest.raises(exc, match=message):
        call(backend, **overrides)


@pytest.mark.parametrize("change", ["in_place", "through_a_view", "zero_dim"])
def test_w_changed_after_a_check_is_checked_again(change):
    """A w tensor found finite is not read again while unchanged (one host read per sampling loop, not per step);
    any in-place change, also through a view, makes the next step check it again."""
    w = torch.tensor(2.0) if change == "zero_dim" else torch.tensor([1.0, 2.0, 3.0])
    call("reference", w=w)
    call("reference", w=w)
    if change == "through_a_view":
        w[1:].fill_(float("nan"))
    else:
        w.fill_(float("inf"))
    with pytest.raises(ValueError, match="w must be finite"):
        call("reference", w=w)


def test_last_step_accepts_any_lam_next():
    out = call("reference", lam=2.0, lam_next=2.0, last=True)
    assert torch.isfinite(out).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        call("tpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        call(None)


def test_cpu_backend_refuses_other_devices():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    z = torch.randn(2, 3, device="meta")
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: it runs on CPU tensors"):
        cfgfast.reverse_step(z, torch.randn_like(z), torch.randn_like(z), 0.0, 1.0, 1.0, backend="cpu")


def test_sampling_lambdas_needs_two_steps():
    with pytest.raises(ValueError, match="steps must be at least 2"):
        cfgfast.sampling_lambdas(1)


@pytest.mark.parametrize("lambdas, error, message", [
    ("abc", TypeError, "lambdas must be a 1-D sequence of numbers, got str"),
    ([[-20.0, 0.0], [5.0, 20.0]], ValueError, r"lambdas must be 1-D, got shape \(2, 2\)"),
    ([True, False], TypeError, "lambdas must hold real numbers"),
    ([1.0], ValueError, "lambdas must hold at least 2 values"),
])
def test_lambda_grids_are_checked(lambdas, error, message):
    with pytest.raises(error, match=message):
        cfgfast.step_table("ddpm", lambdas)
    with pytest.raises(error, match=message):
        cfgfast.sample(lambda z, lam, y: z, torch.tensor([0]), 1.0, null_label=1, shape=(2,), lambdas=lambdas)


def test_alpha_sigma_names_bad_lam():
    with pytest.raises(TypeError, match="lam must be a real number or a tensor, got str"):
        cfgfast.alpha_sigma("x")
    with pytest.raises(ValueError, match="lam must not be NaN"):
        cfgfast.alpha_sigma(float("nan"))
    assert cfgfast.alpha_sigma(float("inf")) == (1.0, 0.0)  # the ends of the schedule stay defined


def test_bool_tensor_is_not_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        call("reference", seed=torch.tensor(True))


def test_log_snr_beyond_the_limit_is_named():
    # finite, but exp(-lambda_min / 2) or the step's alpha ratio overflows: a ValueError, not an OverflowError
    with pytest.raises(ValueError, match="lambda_min must lie in"):
        cfgfast.sampling_lambdas(4, -3000.0)
    with pytest.raises(ValueError, match="lambda_max must lie in"):
        cfgfast.training_lambdas(torch.rand(3), -10.0, 1e4)
    with pytest.raises(ValueError, match=r"lambdas\[0\] must lie in"):
        cfgfast.step_table("ddpm", [-1500.0, 0.0])
    with pytest.raises(ValueError, match="lambda_min must lie in"):
        cfgfast.sample(lambda z, lam, y: z, torch.tensor([0]), 1.0, 4, null_label=1, shape=(2,), lambda_min=-100.0)
    # the limit itself works, and gives finite float32 coefficients
    for sampler in cfgfast.SAMPLERS:
        for spacing in ("paper", "uniform"):
            table = cfgfast.step_table(sampler, cfgfast.sampling_lambdas(8, -80.0, 80.0, spacing))
            assert torch.isfinite(table.float()).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend unavailable")
@pytest.mark.parametrize(
    "mutate,exc,message",
    [
        (lambda a: a.update(z=a["z"].double()), TypeError, "z must be float32"),
        (lambda a: a.update(pred_cond=a["pred_cond"][:2]), ValueError, "pred_cond must have the shape of z"),
        (lambda a: a.update(pred_uncond=a["pred_uncond"].half()), TypeError, "pred_uncond must have the dtype"),
        (lambda a: a.update(weights=a["weights"][:1]), ValueError, "weights must have shape"),
        (lambda a: a.update(weights=a["weights"][:, :1]), ValueError, "weights must have shape"),
        (lambda a: a.update(x_prev=torch.randn(1)), ValueError, "x_prev"),
        (lambda a: a.update(x_prev=a["z"]), ValueError, "x_prev"),
        (lambda a: a.update(nu=torch.randn(1)), ValueError, "nu"),
        (lambda a: a.update(nu=a["z"].half()), TypeError, "nu"),
        (lambda a: a.update(noise=torch.randn(1)), ValueError, "noise must have the shape of z"),
        (lambda a: a.update(out=torch.empty(1)), ValueError, "out must be a contiguous float32"),
        (lambda a: a.update(coef=[1.0, 2.0]), ValueError, "coef must hold 10 numbers"),
        (lambda a: a.update(step=-1), ValueError, "step must be in"),
        (lambda a: a.update(index_offset=2**32), ValueError, "index_offset"),
        (lambda a: a.update(index_offset=2**63 - 1), ValueError, "index_offset"),  # + batch overflows int64
    ],
)
def test_direct_op_call_checks_its_arguments(mutate, exc, message):
    z = torch.randn(3, 8)
    args = dict(out=torch.empty_like(z), z=z, pred_cond=torch.randn_like(z), pred_uncond=torch.randn_like(z),
                weights=torch.ones(3, 2), x_prev=torch.zeros_like(z), nu=None, noise=None, coef=[1.0] * 10, seed=0,
                step=0, index_offset=0, clip=None)
    mutate(args)
    with pytest.raises(exc, match=message):
        torch.ops.cfgfast.guided_step_(*args.values())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend unavailable")
@pytest.mark.parametrize(
    "mutate,exc,message",
    [
        (lambda a: a.update(z=a["z"].double()), TypeError, "z must be float32"),  # (the step's own checks first)
        (lambda a: a.update(weights=torch.ones(3, 3)), ValueError, r"weights must have shape \[3, 2\]"),
        (lambda a: a.update(guide=[0.5, 0.0]), ValueError, "guide must be"),
        (lambda a: a.update(running=None), ValueError, "running .* is given where momentum"),
        (lambda a: a.update(guide=[0.0, 0.0, 1.0, 0.0]), ValueError, "running .* is given where momentum"),
        (lambda a: a.update(running=a["running"].double()), ValueError, "running must be a contiguous float32"),
        (lambda a: a.update(running=a["running"].t().contiguous().t()), ValueError, "running must be a contiguous"),
        (lambda a: a.update(pred_cond=a["pred_cond"].half(), pred_uncond=a["pred_uncond"].half()), ValueError,
         "with float32 pred_cond"),
        (lambda a: a.update(running=a["pred_uncond"]), ValueError, "running must not overlap pred_uncond"),
        (lambda a: a.update(running=a["x_prev"]), ValueError, "running must not overlap x_prev"),
        (lambda a: a["running"].untyped_storage().resize_(16), ValueError,
         "running needs 96 bytes of its storage, which holds 16"),
    ],
)
def test_direct_per_sample_op_call_checks_its_arguments(mutate, exc, message):
    z = torch.randn(3, 8)
    args = dict(out=torch.empty_like(z), z=z, pred_cond=torch.randn_like(z), pred_uncond=torch.randn_like(z),
                weights=torch.ones(3, 2), running=torch.zeros_like(z), x_prev=torch.zeros_like(z), nu=None,
                noise=None, coef=[1.0] * 10, guide=[0.0, 0.0, 1.0, -0.5], seed=0, step=0, index_offset=0, clip=None)
    mutate(args)
    with pytest.raises(exc, match=message):
        torch.ops.cfgfast.per_sample_guided_step_(*args.values())


def test_a_momentum_buffer_beyond_its_storage_is_named():
    """(its storage shrunk after the tensor was made: the running value's update would write past it)"""
    z = torch.randn(3, 8)
    row = cfgfast.step_table("ddim", cfgfast.default_lambdas(4, "ddim").tolist())[1]
    for backend in BACKENDS:
        buffer = torch.zeros_like(z)
        buffer.untyped_storage().resize_(16)
        with pytest.raises(ValueError, match="momentum_buffer needs 96 bytes of its storage, which holds 16"):
            cfgfast.guided_step(z, z + 1, z, row, 2.0, guidance=cfgfast.APG(0.0, 1.0, -0.5), momentum_buffer=buffer,
                                backend=backend)


def test_out_must_not_partly_overlap_an_input():
    buf = torch.randn(1, 4097)
    z = buf[:, :4096]
    eps = torch.randn(1, 4096)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="out must not partly overlap z"):
            cfgfast.reverse_step(z, eps, eps, 0.0, 1.0, 1.0, backend=backend, out=buf[:, 1:])
    if "cpu" in BACKENDS:  # the op itself refuses too
        with pytest.raises(RuntimeError, match="unsupported operation"):
            torch.ops.cfgfast.guided_step_(buf[:, 1:], z, eps, eps, torch.ones(1, 2), None, None, None, [1.0] * 10, 0,
                                           0, 0, None)


def test_out_is_not_a_16_bit_view_of_eps():
    # same address, shape and strides as out, but bfloat16: half of out's bytes, read while out is written
    out = torch.randn(2, 64)
    eps = torch.empty(0, dtype=torch.bfloat16).set_(out.untyped_storage(), 0, out.shape, out.stride())
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="out must not partly overlap eps_cond"):
            cfgfast.reverse_step(torch.randn(2, 64), eps, eps.clone(), 0.0, 1.0, 1.0, backend=backend, out=out)


def test_huge_numbers_are_named():
    with pytest.raises(ValueError, match="w must be finite in float32"):
        call("reference", w=1e39)
    with pytest.raises(ValueError, match="lam must be finite"):
        call("reference", lam=-10**400)
    with pytest.raises(ValueError, match="w must be finite"):
        call("reference", w=10**400)


def test_clip_beyond_float32_is_named_on_every_backend():
    # 1e300 is inf in float32, where the kernels clamp: refused alike everywhere (clip=None means no clipping)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"clip must be positive and finite in float32 \(clip=None"):
            call(backend, clip=1e300)
    with pytest.raises(ValueError, match="clip must be positive and finite in float32"):
        cfgfast.sample(lambda z, lam, y: z, torch.tensor([0]), 1.0, 4, null_label=1, shape=(2,), clip=1e39)
    largest = torch.finfo(torch.float32).max  # the largest bound allowed: no element is clipped
    inputs = dict(z=torch.randn(3, 4, 5), eps_cond=torch.randn(3, 4, 5), eps_uncond=torch.randn(3, 4, 5), last=True)
    for backend in BACKENDS:
        torch.testing.assert_close(call(backend, clip=largest, **inputs), call("reference", **inputs))


@pytest.mark.parametrize("per_sample", [True, False])
def test_w_made_under_inference_mode(per_sample):
    """An inference tensor has no version counter: such a w is checked at every call, not remembered."""
    with torch.inference_mode():
        w = torch.tensor([1.0, 2.0, 3.0]) if per_sample else torch.tensor(2.0)
    inputs = dict(z=torch.randn(3, 4, 5), eps_cond=torch.randn(3, 4, 5), eps_uncond=torch.randn(3, 4, 5))
    expected = call("reference", w=w.clone(), **inputs)
    for backend in BACKENDS:
        torch.testing.assert_close(call(backend, w=w, **inputs), expected)
        with torch.inference_mode():
            torch.testing.assert_close(call(backend, w=w, **inputs), expected)
    with torch.inference_mode():
        w.fill_(float("nan"))  # no version counter records this: the next call must still see it
    with pytest.raises(ValueError, match="w must be finite"):
        call("reference", w=w)
    model = lambda z, lam, y: z  # noqa: E731
    with torch.inference_mode():
        w = torch.full((2,), 3.0)
        x = cfgfast.sample(model, torch.tensor([0, 1]), w, 4, null_label=2, shape=(3,))
    torch.testing.assert_close(x, cfgfast.sample(model, torch.tensor([0, 1]), 3.0, 4, null_label=2, shape=(3,)))


def test_out_made_under_inference_mode():
    """Written inside inference_mode, as torch allows; outside it, refused by name before any backend runs (torch's
    in-place ops, the reference's copy_ and the compiled ops' version bump refuse it with their own words)."""
    with torch.inference_mode():
        out = torch.empty(3, 4, 5)
    table = cfgfast.step_table("ddpm", [-1.0, 0.0])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"out was made under torch.inference_mode\(\) and cannot be written"):
            call(backend, out=out)
        with pytest.raises(ValueError, match=r"out was made under torch.inference_mode\(\)"):
            cfgfast.normal_noise((3, 4, 5), 0, backend=backend, out=out)
        z = torch.randn(3, 4, 5)
        with pytest.raises(ValueError, match=r"out was made under torch.inference_mode\(\)"):
            cfgfast.guided_step_table(z, z, z, table, torch.tensor([0]), 1.0, backend=backend, out=out)
        inputs = dict(z=torch.randn(3, 4, 5), eps_cond=torch.randn(3, 4, 5), eps_uncond=torch.randn(3, 4, 5))
        with torch.inference_mode():
            torch.testing.assert_close(call(backend, out=out, **inputs), call("reference", **inputs))
            cfgfast.normal_noise((3, 4, 5), 0, backend=backend, out=out)


def test_numpy_scalars_are_numbers():
    import numpy as np

    torch.testing.assert_close(cfgfast.sampling_lambdas(5, np.float32(-5.0), np.float16(5.0)),
                               cfgfast.sampling_lambdas(5, -5.0, 5.0), rtol=0, atol=0)
    u = torch.rand(4)
    torch.testing.assert_close(cfgfast.training_lambdas(u, np.float32(-3.0), torch.tensor(3.0)),
                               cfgfast.training_lambdas(u, -3.0, 3.0), rtol=0, atol=0)
    model = lambda z, lam, y: z  # noqa: E731
    torch.testing.assert_close(
        cfgfast.sample(model, torch.tensor([0]), 1.0, 3, null_label=1, shape=(2,), lambda_min=np.float32(-20)),
        cfgfast.sample(model, torch.tensor([0]), 1.0, 3, null_label=1, shape=(2,)), rtol=0, atol=0)
    inputs = dict(z=torch.randn(3, 4, 5), eps_cond=torch.randn(3, 4, 5), eps_uncond=torch.randn(3, 4, 5))
    torch.testing.assert_close(call("reference", last=np.bool_(True), **inputs), call("reference", last=True, **inputs),
                               rtol=0, atol=0)


def test_step_table_checks_its_arguments():
    with pytest.raises(ValueError, match=r"v must be in \[0, 1\]"):
        cfgfast.step_table("ddpm", [0.0, 1.0], v=5.0)
    with pytest.raises(ValueError, match=r"lambdas\[0\] must be finite"):
        cfgfast.step_table("ddpm", [float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"lambdas\[1\] must lie in \[-80, 80\]"):
        cfgfast.step_table("ddim", [0.0, 100.0])
    with pytest.raises(ValueError, match="sampler must be one of"):
        cfgfast.step_table("heun", [0.0, 1.0])
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        cfgfast.step_table("ddpm", [0.0, 1.0], prediction_type="eps")
    with pytest.raises(ValueError, match="eta is a setting of sampler 'ddim' only"):
        cfgfast.step_table("ddpm", [0.0, 1.0], eta=0.5)
    with pytest.raises(TypeError, match="learned_variance must be True or False"):
        cfgfast.step_table("ddpm", [0.0, 1.0], learned_variance="yes")
    with pytest.raises(TypeError, match="uniform must be True or False"):
        cfgfast.training_lambdas(torch.rand(3), uniform="no")


def test_batches_beyond_the_sample_counter_are_named():
    # 2^32 + 1 samples of 0 elements: nothing to allocate, but sample indices that SPEC §3's counter cannot hold
    with pytest.raises(ValueError, match=r"shape\[0\] must be at most 2\^32 samples"):
        cfgfast.normal_noise((2**32 + 1, 0), 1)
    z = torch.empty(2**32 + 1, 0)
    with pytest.raises(ValueError, match=r"z's batch must be at most 2\^32 samples"):
        cfgfast.reverse_step(z, z, z, 0.0, 1.0, 1.0, backend="reference")
    for backend in BACKENDS:  # an empty batch of huge samples: nothing drawn, nothing allocated
        assert cfgfast.normal_noise((0, 2**40), 1, backend=backend).shape == (0, 2**40)


def test_integer_labels_and_w_of_any_width():
    model = lambda z, lam, y: z + y[:, None]  # noqa: E731
    expected = cfgfast.sample(model, torch.tensor([0, 1]), 2.0, 3, null_label=2, shape=(3,))
    for dtype in (torch.int8, torch.int16, torch.uint8):
        labels, w = torch.tensor([0, 1], dtype=dtype), torch.tensor([2, 2], dtype=dtype)
        torch.testing.assert_close(cfgfast.sample(model, labels, w, 3, null_label=2, shape=(3,)), expected,
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor"):
        cfgfast.sample(model, torch.tensor([True]), 2.0, 3, null_label=2, shape=(3,))
    with pytest.raises(TypeError, match="w must be a real tensor"):
        cfgfast.sample(model, torch.tensor([0]), torch.tensor([True]), 3, null_label=2, shape=(3,))


def test_op_checks_raise_as_torch_check():
    """The ops' checks skip torch._check's own cost where the condition is a plain True, and otherwise are it: a
    failure raises its error with the message, and a symbolic condition (torch.compile) is left to torch._check."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from cfgfast._checks import check, check_value

    check(True, lambda: "never built")
    check_value(True, lambda: "never built")
    with pytest.MonkeyPatch.context() as patch:  # a plain True does not reach torch._check at all
        for name in ("_check", "_check_value"):
            patch.setattr(torch, name, lambda *args: pytest.fail(f"torch.{name} called"))
        check(True, lambda: "never built")
        check_value(True, lambda: "never built")
    with pytest.raises(RuntimeError, match="cfgfast: a message"):
        check(False, lambda: "cfgfast: a message")
    with pytest.raises(ValueError, match="cfgfast: a value"):
        check_value(False, lambda: "cfgfast: a value")
    size = ShapeEnv().create_unbacked_symint()
    check(size >= 0, lambda: "never built")  # unbacked, unprovable here: torch._check records it as an assumption
    with pytest.raises(RuntimeError, match="cfgfast: a symbol"):
        check(size < 0, lambda: "cfgfast: a symbol")  # contradicts the recorded assumption
