"""Guidance beyond the paper's combination (SPEC §7): APG, dynamic thresholding and guidance rescale, against the
float64 loop of tests/test_samplers.py (written from the SPEC's text), against diffusers' own functions, across
backends, batch splits and the device-table loop of cuda_graph=True."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TRITON_INTERPRETED
from test_samplers import LABELS, W, sample_float64

import cfgfast
from cfgfast.backends import CpuBackend, choose
from cfgfast import guidance as guidance_module
from cfgfast.guidance import APG, Guide, dynamic_threshold, rescaled_weights
from cfgfast.moments import sample_moments
from cfgfast.reference import guided_step_reference
from cfgfast.samplers import StepCoefficients
from cfgfast.step import guidance_weights
from cfgfast.toy import GaussianClasses

# The backends of CPU tensors: Triton under the interpreter where there is no GPU (its kernels then see these
# tests' tensors; on a GPU they run in tests/test_step.py's battery)
BACKENDS = ["reference"] + (["cpu"] if "cpu" in cfgfast.available_backends() else []) \
    + (["triton"] if TRITON_INTERPRETED else [])


def classes16(seed=6):
    """Three Gaussian classes in 16 dimensions: per-sample statistics over 16 elements mean something."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 16, 16, generator=g, dtype=torch.float64) / 8
    return GaussianClasses(1.5 * torch.randn(3, 16, generator=g, dtype=torch.float64),
                           a @ a.mT + 0.3 * torch.eye(16, dtype=torch.float64))


# x~ = g and z' = x~ (pred_z 0, pred_g 1, z' = direct_g g): what the step makes of its inputs, on x-predictions
LAST_X_ROW = StepCoefficients(0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)

APG_CASES = [  # (sampler, (eta_parallel, norm_threshold, momentum), rescale, guidance_interval)
    ("ddpm", (0.0, 0.0, 0.0), 0.0, None),
    ("dpmpp_2m", (0.5, 3.0, -0.5), 0.0, None),
    ("ddim", (1.0, 2.0, 0.5), 0.6, (-5.0, 5.0)),
    ("dpmpp_2m_sde", (0.0, 0.0, -0.75), 0.0, (-3.0, 8.0)),
    ("dpmpp_2m", (0.2, 3.0, 0.0), 0.4, None),  # (o_c = o_u to float32 rounding at the last steps: Delta ~ 0)
]


@pytest.mark.parametrize("sampler, apg, rescale, interval", APG_CASES, ids=[c[0] for c in APG_CASES])
def test_apg_matches_float64_spec(sampler, apg, rescale, interval):
    model = classes16()
    lams = cfgfast.default_lambdas(12, sampler).tolist()
    inside = [True] * len(lams) if interval is None else [interval[0] <= lam <= interval[1] for lam in lams]
    w_steps = torch.stack([W * float(i) for i in inside])
    expected = sample_float64(model, LABELS, w_steps, lams, sampler, seed=4, rescale=rescale, apg=apg)
    plain = sample_float64(model, LABELS, w_steps, lams, sampler, seed=4)
    assert (expected - plain).abs().max() > 0.05  # APG changes these samples
    for backend in BACKENDS:
        got = cfgfast.sample(model, LABELS, W, sampler=sampler, lambdas=lams, seed=4, guidance=APG(*apg),
                             guidance_rescale=rescale, guidance_interval=interval, backend=backend)
        # (ddim on the paper's grid from lam = -20 scales float32 rounding by alpha'/alpha)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=2e-3 if sampler == "ddim" else 5e-4)


class Rounded:
    """The model with its outputs rounded to a 16-bit dtype, returned in it or widened back to float32."""

    def __init__(self, model, dtype, widen: bool):
        self.model, self.dtype, self.widen = model, dtype, widen

    def __getattr__(self, name):  # (prediction_type, null_label, sample_shape: the model's)
        return getattr(self.model, name)

    def __call__(self, z, lam, labels):
        out = self.model(z, lam, labels).to(self.dtype)
        return out.float() if self.widen else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("apg", [APG(0.2, 3.0), APG(0.2, 3.0, -0.5)], ids=["no-momentum", "momentum"])
def test_apg_reads_16_bit_outputs_as_their_float32_values(backend, dtype, apg):
    """The fused step and the moments widen 16-bit outputs exactly: the same samples as from their float32 values
    (with momentum o_c is widened into a buffer beside the float32 running value)."""
    model = classes16()
    lams = cfgfast.default_lambdas(6, "dpmpp_2m").tolist()
    kwargs = dict(sampler="dpmpp_2m", lambdas=lams, seed=5, guidance=apg, guidance_rescale=0.4, backend=backend)
    widened = cfgfast.sample(Rounded(model, dtype, widen=True), LABELS, W, **kwargs)
    got = cfgfast.sample(Rounded(model, dtype, widen=False), LABELS, W, **kwargs)
    torch.testing.assert_close(got, widened, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler, guidance", [("ddpm", "cfg"), ("ddim", "cfgpp"), ("dpmpp_2m", "cfg"),
                                               ("dpmpp_2m_sde", "cfg")])
def test_threshold_matches_float64_spec(sampler, guidance):
    model = classes16()
    lams = cfgfast.default_lambdas(12, sampler).tolist()
    threshold = (0.9, 1.6)
    expected = sample_float64(model, LABELS, W, lams, sampler, seed=8, cfgpp=guidance == "cfgpp",
                              threshold=threshold)
    clipped = sample_float64(model, LABELS, W, lams, sampler, seed=8, cfgpp=guidance == "cfgpp", clip=1.0)
    assert (expected - clipped).abs().max() > 0.05  # thresholding is not clipping to [-1, 1] here
    for backend in BACKENDS:
        got = cfgfast.sample(model, LABELS, W, sampler=sampler, lambdas=lams, seed=8, guidance=guidance,
                             threshold=threshold, backend=backend)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=2e-3 if sampler == "ddim" else 5e-4)
    assert got.abs().max() <= 1.0  # the last x~ is thresholded too: within [-1, 1]


def test_apg_with_threshold_and_v_prediction_matches_float64_spec():
    model = classes16()
    model.prediction_type = "v_prediction"
    lams = cfgfast.default_lambdas(10, "dpmpp_2m").tolist()
    apg, threshold = (0.3, 4.0, -0.5), (0.95, 2.0)
    expected = sample_float64(model, LABELS, W, lams, "dpmpp_2m", prediction_type="v_prediction", seed=1, apg=apg,
                              threshold=threshold, rescale=0.3)
    got = cfgfast.sample(model, LABELS, W, sampler="dpmpp_2m", lambdas=lams, seed=1, guidance=APG(*apg),
                         threshold=threshold, guidance_rescale=0.3, backend="reference")
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=5e-4)


def test_apg_equals_diffusers_normalized_guidance():
    """On x-predictions (prediction type "sample": x~_c = o_c), three steps with diffusers' MomentumBuffer."""
    pytest.importorskip("diffusers")
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(3)
    for eta, rho, beta in ((0.0, 0.0, 0.0), (0.4, 5.0, -0.5), (1.0, 0.5, 0.7)):
        batch, w = 3, 4.0
        z = torch.randn(batch, 3, 5, 5, generator=g)
        ours = torch.zeros_like(z)
        guide = Guide(APG(eta, rho, beta), buffer=ours if beta else None)
        buffer = MomentumBuffer(beta) if beta else None
        weights = guidance_weights(torch.full((batch,), w))
        for _ in range(3):
            o_c, o_u = torch.randn(2, batch, 3, 5, 5, generator=g)
            # the step's inputs, and x~ as the step forms it (the last step's row: z' = x~ = g)
            pred_cond, pred_uncond, apg_weights, clip = guide.inputs(choose("reference", z.device), z, o_c, o_u,
                                                                     weights, 0.0, 1.0, True)
            x, _ = guided_step_reference(z, pred_cond, pred_uncond, apg_weights, LAST_X_ROW, None)
            expected = normalized_guidance(o_c, o_u, w, buffer, eta=eta, norm_threshold=rho,
                                           use_original_formulation=True)
            torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
            assert apg_weights.shape == (batch, 3) and clip is None
            if beta:
                torch.testing.assert_close(ours, buffer.running_average, rtol=1e-6, atol=1e-6)


def test_threshold_equals_diffusers_threshold_sample():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    x = 2.5 * torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # p near 1 (a topk of the largest values), p = 0.5 (two selections), p = 1 (the largest)
    for p, bound in ((0.995, 1.0), (0.995, 1.5), (0.9, 2.0), (0.5, 3.0), (1.0, 10.0)):
        scheduler = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=bound)
        torch.testing.assert_close(dynamic_threshold(x.clone(), (p, bound)), scheduler._threshold_sample(x.clone()),
                                   rtol=1e-6, atol=1e-6)


def test_per_sample_statistics_ignore_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 7, 3, 9, 9, generator=g)
    whole = sample_moments([a, b], [[1.0, 0.0], [0.5, -2.0]])
    for i, j in ((0, 1), (1, 4), (4, 7)):
        assert torch.equal(sample_moments([a[i:j], b[i:j]], [[1.0, 0.0], [0.5, -2.0]]), whole[i:j])
        assert torch.equal(dynamic_threshold(a[i:j].clone(), (0.9, 2.0)), dynamic_threshold(a.clone(), (0.9, 2.0))[i:j])
    weights = guidance_weights(torch.linspace(0, 5, 7))
    assert torch.equal(torch.cat([rescaled_weights(a[i:j], b[i:j], weights[i:j], 0.7) for i, j in ((0, 3), (3, 7))]),
                       rescaled_weights(a, b, weights, 0.7))
    # APG's combination of the inputs' moments, on the host (numpy) and on the device (torch): per sample, also of
    # a batch of one and where x~_c cancels (pred_z z against pred_g o_c, as for epsilon-prediction near lambda = -20)
    big = torch.randn(64, 3, 9, 9, generator=g)
    inputs = [big, big + 1e-3 * torch.randn(64, 3, 9, 9, generator=g), torch.randn(64, 3, 9, 9, generator=g)]
    combos = [(22026.47, -22026.46, 0.0), (0.0, 22026.46, -22026.46)]
    for ops in (guidance_module._HostMath, guidance_module._DeviceMath):
        whole = [torch.as_tensor(m) for m in guidance_module._combined_moments(ops, inputs, combos)[:5]]
        for i, j in ((0, 1), (1, 2), (2, 9), (9, 64)):
            part = guidance_module._combined_moments(ops, [t[i:j] for t in inputs], combos)[:5]
            assert all(torch.equal(torch.as_tensor(p), m[i:j]) for p, m in zip(part, whole)), (ops.__name__, i, j)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in cfgfast.available_backends()])
def test_batch_split_gives_the_same_samples(backend):
    """Bit for bit, for any split: also with a sample alone, and with samples at w = 0 for some steps (a step that
    guides their batch-mates does not guide them, nor move their APG running value, as it would not alone)."""
    model = classes16()
    w_steps = W.expand(8, -1).clone()
    w_steps[:3, ::3] = 0.0  # samples 0, 3, 6, 9 unguided at the first three steps
    w_steps[5, :2] = 0.0
    kwargs = dict(sampler="dpmpp_2m", seed=3, guidance=APG(0.2, 3.0, -0.5), threshold=(0.9, 1.5),
                  guidance_rescale=0.4, backend=backend)
    whole = cfgfast.sample(model, LABELS, w_steps, 8, **kwargs)
    for splits in (((0, 5), (5, 12)), ((0, 1), (1, 2), (2, 12)), ((0, 3), (3, 4), (4, 11), (11, 12))):
        parts = [cfgfast.sample(model, LABELS[i:j], w_steps[:, i:j], 8, index_offset=i, **kwargs) for i, j in splits]
        assert torch.equal(torch.cat(parts), whole), splits
    lams = cfgfast.default_lambdas(8, "dpmpp_2m").tolist()
    expected = sample_float64(model, LABELS, w_steps, lams, "dpmpp_2m", seed=3, rescale=0.4, apg=(0.2, 3.0, -0.5),
                              threshold=(0.9, 1.5))
    torch.testing.assert_close(whole.double(), expected, rtol=1e-4, atol=1e-4)


needs_cpu = pytest.mark.skipif("cpu" not in cfgfast.available_backends(), reason="needs the compiled extension")


def composed_everywhere(monkeypatch) -> None:
    """The cpu backend runs guidance rescale and APG through the per-sample op; this sends them through the
    composition of whole-batch passes (the other backends' path), as Guide(per_sample=False) does."""
    monkeypatch.setattr(CpuBackend, "per_sample_guidance", False)


def count_op_calls(monkeypatch) -> list:
    """A list that gains an entry at each call of the cpu backend's per-sample op (which still runs)."""
    calls = []
    op = CpuBackend.per_sample_guided_step
    monkeypatch.setattr(CpuBackend, "per_sample_guided_step", lambda self, *a: (calls.append(1), op(self, *a)))
    return calls


PER_SAMPLE_CASES = [  # (sampler, prediction_type, guidance, rescale, clip)
    ("ddim", "epsilon", "cfg", 0.7, None),
    ("ddim", "v_prediction", "cfgpp", 0.5, None),
    ("ddpm", "epsilon", APG(0.0, 0.0), 0.0, None),  # (learned variance: the noise scaled by nu)
    ("dpmpp_2m", "v_prediction", APG(0.3, 5.0), 0.6, 1.0),
    ("dpmpp_2m_sde", "sample", APG(0.0, 5.0, -0.5), 0.0, None),
    ("ddim", "epsilon", APG(1.0, 2.0, 0.5), 0.4, None),
]


def per_sample_step(per_sample, sampler, prediction, guidance, rescale, clip, batch, dtype=torch.float32,
                    shape=(3, 64, 64)):
    """One guided step on the cpu backend (3x64x64 samples: two chunks of the moments): (z', x~_prev, M)."""
    g = torch.Generator().manual_seed(0)
    z, o_c, o_u, start, prev, nu = (torch.randn(batch, *shape, generator=g) for _ in range(6))
    o_c, o_u = o_c.to(dtype), (o_c + 0.3 * o_u).to(dtype)
    learned = sampler == "ddpm"
    table = cfgfast.step_table(sampler, cfgfast.default_lambdas(20, sampler).tolist(), prediction_type=prediction,
                               learned_variance=learned, guidance="cfgpp" if guidance == "cfgpp" else "cfg")
    weights = guidance_weights(torch.tensor([3.0, 0.0, 7.0, 1.0, 2.0][:batch]))
    running = start if isinstance(guidance, APG) and guidance.momentum else None
    x_prev = prev if sampler.startswith("dpmpp") else None
    out = torch.empty_like(z)
    row = table[7].tolist()
    Guide(guidance, rescale, None, clip, running, per_sample=per_sample).step(
        choose("cpu", z.device), out, z, o_c, o_u, weights, x_prev, nu.to(dtype) if learned else None, None, row, row,
        5, 7, 0, True)
    return out, x_prev, running


# (APG's momentum with 16-bit outputs takes the composition: its step reads o_c widened to float32 beside M)
PER_SAMPLE_DTYPE_CASES = [(dtype,) + case for dtype in (torch.float32, torch.bfloat16) for case in PER_SAMPLE_CASES
                          if dtype == torch.float32 or not (isinstance(case[2], APG) and case[2].momentum)]


@needs_cpu
@pytest.mark.parametrize("batch", [1, 5])  # (with 2 threads or more, a batch of 1 runs the op's batch-wide stages)
@pytest.mark.parametrize("dtype, sampler, prediction, guidance, rescale, clip", PER_SAMPLE_DTYPE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}".replace("torch.", "") for c in PER_SAMPLE_DTYPE_CASES])
def test_per_sample_op_equals_the_composition(monkeypatch, dtype, sampler, prediction, guidance, rescale, clip,
                                              batch):
    """The cpu backend's per-sample op (each sample's reduction and step in one task) gives the step the composition
    of whole-batch passes gives, which the other backends run and the float64 tests check: z', the multistep state
    and APG's running value, to float32 rounding, for every sampler, prediction type and method, 16-bit outputs,
    learned variance, clip, and a sample at w = 0 beside guided ones."""
    calls = count_op_calls(monkeypatch)
    got = per_sample_step(True, sampler, prediction, guidance, rescale, clip, batch, dtype)
    assert calls == [1]
    expected = per_sample_step(False, sampler, prediction, guidance, rescale, clip, batch, dtype)
    assert calls == [1]
    for a, b in zip(got, expected):
        if b is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@needs_cpu
@pytest.mark.parametrize("shape", [(8193,), (3, 5, 7), (24577,)], ids=str)
@pytest.mark.parametrize("guidance, rescale", [(APG(0.3, 5.0, -0.5), 0.6), ("cfg", 0.7)], ids=["apg", "rescale"])
def test_per_sample_op_on_ragged_samples(monkeypatch, shape, guidance, rescale):
    """Samples whose size is no multiple of 4 (the step's groups) or of 8192 (the moments' chunks): the last group
    and the last chunk short, as the composition has them."""
    calls = count_op_calls(monkeypatch)
    for batch in (1, 3):
        got = per_sample_step(True, "dpmpp_2m", "epsilon", guidance, rescale, None, batch, shape=shape)
        expected = per_sample_step(False, "dpmpp_2m", "epsilon", guidance, rescale, None, batch, shape=shape)
        for a, b in zip(got, expected):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    assert calls == [1, 1]


@needs_cpu
def test_apg_momentum_with_16_bit_outputs_takes_the_composition(monkeypatch):
    """Its step reads o_c beside the float32 running value, one dtype: the composition widens o_c first."""
    calls = []
    monkeypatch.setattr(CpuBackend, "per_sample_guided_step", lambda self, *a: calls.append(1))
    out, _, running = per_sample_step(True, "ddim", "epsilon", APG(0.3, 5.0, -0.5), 0.0, None, 2, torch.bfloat16)
    assert calls == [] and torch.isfinite(out).all() and running.abs().max() > 0


@needs_cpu
def test_per_sample_op_gives_the_same_bits_for_any_thread_count():
    """One task a sample where the batch makes as many tasks as there are threads, the stages batch-wide otherwise:
    the same values."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 4):  # (3 samples: one task each, then stages split over 4 threads)
            torch.set_num_threads(n)
            results.append(per_sample_step(True, "dpmpp_2m", "epsilon", APG(0.3, 5.0, -0.5), 0.6, None, 3))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_value_keeps_a_small_difference_at_high_noise(monkeypatch, backend):
    """M <- momentum M + pred_g (o_c - o_u) where pred_g = -2.2e4 (epsilon-prediction at lambda = -20) and o_u
    differs from o_c by 1e-4: float32 to about 1e-7 of |M| against float64 (pred_g o_c - pred_g o_u in float32 would
    be 1e-3 off), on the host's arithmetic and the device's (forced here), whose row is a one-row device table."""
    g = torch.Generator().manual_seed(0)
    z, o_c = torch.randn(2, 4, 3, 16, 16, generator=g)
    o_u = o_c + 1e-4 * torch.randn(4, 3, 16, 16, generator=g)
    row = cfgfast.step_table("ddim", cfgfast.default_lambdas(50, "ddim").tolist())[0]
    assert row[1] < -2e4
    w = torch.tensor([3.0, 0.0, 1.0, 3.0])
    start = torch.randn(4, 3, 16, 16, generator=g)
    expected = -0.5 * start.double() + row[1].item() * (o_c.double() - o_u.double())
    expected[1] = start[1]  # (w = 0: unchanged)
    for arithmetic in ("host", "device"):
        if arithmetic == "device":
            composed_everywhere(monkeypatch)
            monkeypatch.setattr(guidance_module, "_arithmetic", lambda t: guidance_module._DeviceMath)
        running = start.clone()
        cfgfast.guided_step(z, o_c, o_u, row, w, guidance=APG(0.0, 0.0, -0.5), momentum_buffer=running,
                            backend=backend)
        assert torch.equal(running[1], start[1])
        torch.testing.assert_close(running.double(), expected, rtol=0, atol=3e-6 * float(expected.abs().max()))
    # pred_g read from a device table (a 0-d tensor): the update's row is a one-row table on the device
    running = start.clone()
    Guide(APG(0.0, 0.0, -0.5), buffer=running)._update_running_value(choose(backend, z.device), o_c, o_u, row[1], w)
    assert torch.equal(running[1], start[1])
    torch.testing.assert_close(running.double(), expected, rtol=0, atol=3e-6 * float(expected.abs().max()))


def test_empty_batch_with_every_method():
    model = classes16()
    none = torch.zeros(0, dtype=torch.long)
    for kwargs in (dict(threshold=(0.9, 1.5)), dict(guidance=APG(0.1, 1.0, 0.5), guidance_rescale=0.5)):
        assert cfgfast.sample(model, none, 2.0, 4, **kwargs).shape == (0, 16)
    z = torch.zeros(0, 16)
    row = cfgfast.step_table("ddim", cfgfast.default_lambdas(4, "ddim").tolist())[1]
    assert cfgfast.guided_step(z, z, z, row, 2.0, threshold=(0.9, 1.5)).shape == (0, 16)


INTERVAL = (-4.0, 6.0)


def device_table_loop(steps, backend, mode=None, **guidance):
    """cuda_graph=True's loop run eagerly (no capture; under the dispatch mode `mode` where given): classes16 with
    "dpmpp_2m", seed 2 and the guidance interval INTERVAL. Returns (its plan, the samples)."""
    from cfgfast import sampler

    with torch.no_grad():
        plan, z = sampler._plan(classes16(), LABELS, W, steps, "dpmpp_2m", 0.0, None, None, 2, None, None, None, None,
                                "auto", 0, backend, INTERVAL, None, False, None, **guidance)
        with mode if mode is not None else contextlib.nullcontext():
            return plan, sampler._loop_table(plan, z, None, capture=False)


def test_capture_warms_up_on_the_grid(monkeypatch):
    """cuda_graph=True runs each recorded step (guided, unguided) twice before capturing it, every time at the grid's
    first row: a grid of 3 steps with both kinds has fewer rows than the four warm-up steps. torch.cuda's streams and
    graphs are stubbed so that the warm-up and the capture run eagerly on the CPU (a replay does nothing here)."""
    from cfgfast import sampler

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    for name, fake in (("device", lambda device: contextlib.nullcontext()), ("Stream", lambda device: Stream()),
                       ("stream", lambda stream: contextlib.nullcontext()), ("current_stream", lambda *a: Stream()),
                       ("CUDAGraph", Graph), ("graph", lambda graph, stream=None: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    lams = cfgfast.default_lambdas(3, "dpmpp_2m").tolist()
    with torch.no_grad():
        plan, z = sampler._plan(classes16(), LABELS, W, 3, "dpmpp_2m", 0.0, None, None, 2, None, None, None, None,
                                "auto", 0, "reference", (lams[0], lams[0]), None, False, None,
                                guidance=APG(0.5, 2.0, -0.5), threshold=None, guidance_rescale=0.0)
        assert plan.guided == [True, False, False]
        sampler._loop_table(plan, z, None, capture=True)
    assert torch.equal(plan.guide.buffer, torch.zeros_like(z))  # (reset after the warm-up moved it)


@pytest.mark.parametrize("guidance, threshold, rescale", [(APG(0.5, 2.0, -0.5), None, 0.0),
                                                          ("cfg", (0.9, 1.5), 0.5),
                                                          (APG(0.0, 0.0, 0.6), (0.8, 2.0), 0.3)])
def test_device_table_loop_equals_sample(guidance, threshold, rescale):
    """cuda_graph=True's loop (run eagerly here): the rows read on the device, APG's running value a static buffer
    left unchanged outside the guidance interval."""
    kwargs = dict(guidance=guidance, threshold=threshold, guidance_rescale=rescale)
    expected = cfgfast.sample(classes16(), LABELS, W, 10, sampler="dpmpp_2m", seed=2, guidance_interval=INTERVAL,
                              backend="reference", **kwargs)
    plan, got = device_table_loop(10, "reference", **kwargs)
    assert plan.guided != [True] * 10 and any(plan.guided)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance, rescale", [(APG(0.5, 2.0, -0.5), 0.3), (APG(0.2, 0.0), 0.0), ("cfg", 0.6)])
def test_device_arithmetic_equals_the_hosts(monkeypatch, guidance, rescale):
    """The per-sample arithmetic in float64 torch on the tensors' device (CUDA tensors; forced here on the CPU, whose
    tensors take numpy's) gives the host's weights: sample and the device-table loop alike."""
    composed_everywhere(monkeypatch)
    kwargs = dict(guidance=guidance, guidance_rescale=rescale)
    expected = cfgfast.sample(classes16(), LABELS, W, 10, sampler="dpmpp_2m", seed=2, backend="cpu",
                              guidance_interval=INTERVAL, **kwargs)
    monkeypatch.setattr(guidance_module, "_arithmetic", lambda t: guidance_module._DeviceMath)
    got = cfgfast.sample(classes16(), LABELS, W, 10, sampler="dpmpp_2m", seed=2, backend="cpu",
                         guidance_interval=INTERVAL, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    _, got = device_table_loop(10, "cpu", threshold=None, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_device_arithmetic_makes_no_tensor_from_host_data(monkeypatch):
    """A CUDA graph being captured refuses a copy from the host: the device-table loop's guidance arithmetic (forced
    on the CPU's tensors here) makes its constants on the device, so it adds no tensor made from Python data
    (aten.lift_fresh) to the loop's own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorded(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(guidance_module, "_arithmetic", lambda t: guidance_module._DeviceMath)
    lifted = {}
    for guidance, rescale in (("cfg", 0.0), ("cfg", 0.6), (APG(0.2), 0.0), (APG(0.5, 2.0, -0.5), 0.3)):
        recorded = Recorded()
        device_table_loop(6, "cpu", recorded, guidance=guidance, threshold=None, guidance_rescale=rescale)
        lifted[(str(guidance), rescale)] = recorded.ops.count("aten.lift_fresh.default")
    assert set(lifted.values()) == {lifted[("cfg", 0.0)]}, lifted


def test_bad_guidance_arguments():
    model = classes16()
    labels = torch.arange(3)
    with pytest.raises(ValueError, match=r"APG eta_parallel must be in \[0, 1\], got 1.5"):
        APG(eta_parallel=1.5)
    with pytest.raises(ValueError, match=r"APG norm_threshold must be >= 0"):
        APG(norm_threshold=-1.0)
    with pytest.raises(ValueError, match=r"APG momentum must lie in \(-1, 1\)"):
        APG(momentum=1.0)
    with pytest.raises(TypeError, match="APG momentum must be a real number"):
        APG(momentum="0.5")
    with pytest.raises(ValueError, match=r"guidance must be one of \['cfg', 'cfgpp', 'cfgfast.APG\(...\)'\], got "
                                         r"'apg'"):
        cfgfast.sample(model, labels, 1.0, 4, guidance="apg")
    with pytest.raises(ValueError, match="guidance='cfgpp' \\(CFG\\+\\+\\) is a form of sampler 'ddim' only"):
        cfgfast.sample(model, labels, 1.0, 4, sampler="dpmpp_2m", guidance="cfgpp")
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\], got 1.5"):
        cfgfast.sample(model, labels, 1.0, 4, guidance=APG(), guidance_rescale=1.5)
    for threshold, message in (((0.0, 1.0), r"threshold's p .* must lie in \(0, 1\], got 0.0"),
                               ((1.2, 1.0), r"threshold's p .* must lie in \(0, 1\], got 1.2"),
                               ((0.9, 0.5), r"threshold's M .* must be at least 1 .*, got 0.5"),
                               ((0.9, float("inf")), "threshold's M must be finite, got inf")):
        with pytest.raises(ValueError, match=message):
            cfgfast.sample(model, labels, 1.0, 4, threshold=threshold)
    with pytest.raises(TypeError, match=r"threshold must be a pair \(p, M\)"):
        cfgfast.sample(model, labels, 1.0, 4, threshold=0.995)
    with pytest.raises(ValueError, match="threshold replaces clip .* got threshold=\\(0.9, 1.0\\) and clip=1.0"):
        cfgfast.sample(model, labels, 1.0, 4, threshold=(0.9, 1.0), clip=1.0)
    classifier = torch.nn.Linear(16, 3)
    with pytest.raises(ValueError, match="guidance=APG.* needs the model's unconditional pass"):
        cfgfast.sample(model, labels, 1.0, 4, guidance=APG(), classifier=classifier)
    with pytest.raises(ValueError, match="APG with momentum needs its running value"):
        Guide(APG(momentum=0.5))


def test_ddpm_with_threshold_equals_diffusers_ddpm_scheduler(monkeypatch):
    """DDPMScheduler(thresholding=True) thresholds its x0 before the posterior mean, as the ddpm row's x~ here."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddpm

    p, bound = 0.9, 1.6
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_small", clip_sample=False, thresholding=True,
                                        dynamic_thresholding_ratio=p, sample_max_value=bound)
    scheduler.set_timesteps(25)
    alphas = scheduler.alphas_cumprod.double()[scheduler.timesteps]
    lams = torch.log(alphas / (1 - alphas)).tolist()
    model = classes16()
    batch = LABELS.shape[0]
    null = torch.full_like(LABELS, model.null_label)
    z = cfgfast.normal_noise((batch, 16), 8, step=0, stream=0, backend="reference")
    w = W.reshape(-1, 1)
    for t, timestep in enumerate(scheduler.timesteps):
        lam_b = torch.full((batch,), lams[t])
        eps = (1 + w) * model(z, lam_b, LABELS) - w * model(z, lam_b, null)
        noise = cfgfast.normal_noise(z.shape, 8, step=t, stream=1, backend="reference")
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, noise=noise[..., None], **k: noise)
        # (as [B, 16, 1]: diffusers' thresholding takes a channel dimension and at least one more)
        z = scheduler.step(eps[..., None], timestep, z[..., None]).prev_sample[..., 0]
    for backend in BACKENDS:
        ours = cfgfast.sample(model, LABELS, W, lambdas=lams, seed=8, v=0.0, threshold=(p, bound), backend=backend)
        torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_loop_with_guided_step_equals_sample(backend):
    """A loop over guided_step with APG (the caller keeps its running value), rescale and thresholding is sample()
    with the same settings."""
    model = classes16()
    sampler, steps, seed = "dpmpp_2m", 10, 5
    settings = dict(guidance=APG(0.3, 2.0, -0.5), threshold=(0.9, 1.5), guidance_rescale=0.3)
    expected = cfgfast.sample(model, LABELS, W, steps, sampler=sampler, seed=seed, backend=backend, **settings)
    lams = cfgfast.default_lambdas(steps, sampler).tolist()
    table = cfgfast.step_table(sampler, lams)
    z = cfgfast.normal_noise((len(LABELS), *model.sample_shape), seed=seed, step=0, stream=0)
    x_prev, running = torch.empty_like(z), torch.zeros_like(z)
    null_labels = torch.full_like(LABELS, model.null_label)
    with torch.no_grad():
        for t, lam in enumerate(lams):
            lam_b = torch.full((len(LABELS),), lam)
            o_c, o_u = model(z, lam_b, LABELS), model(z, lam_b, null_labels)
            z = cfgfast.guided_step(z, o_c, o_u, table[t], W, x_prev=x_prev, seed=seed, step=t,
                                    momentum_buffer=running, backend=backend, **settings)
    assert running.abs().max() > 0
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_step_apg_equals_diffusers_normalized_guidance(backend):
    """guided_step(guidance=APG(...)) on an x-predicting model's ddim row is the plain step on diffusers'
    normalized_guidance of the two outputs (w = 0: x~ = pred_cond), three steps with its MomentumBuffer."""
    pytest.importorskip("diffusers")
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(7)
    table = cfgfast.step_table("ddim", [-2.0, 0.0, 1.0, 3.0], prediction_type="sample")
    eta, rho, beta, w = 0.3, 4.0, -0.5, 5.0
    z = torch.randn(4, 2, 6, 6, generator=g)
    running, buffer = torch.zeros_like(z), MomentumBuffer(beta)
    for t in range(3):
        o_c, o_u = torch.randn(2, 4, 2, 6, 6, generator=g)
        x = normalized_guidance(o_c, o_u, w, buffer, eta=eta, norm_threshold=rho, use_original_formulation=True)
        expected = cfgfast.guided_step(z, x, x, table[t], 0.0, backend="reference")
        got = cfgfast.guided_step(z, o_c, o_u, table[t], w, guidance=APG(eta, rho, beta), momentum_buffer=running,
                                  backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(running, buffer.running_average, rtol=1e-6, atol=1e-6)
        z = got


def test_guided_step_threshold_equals_diffusers_threshold_sample():
    """guided_step(threshold=(p, M)) thresholds x~ as DDPMScheduler._threshold_sample before the step reads it."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(8)
    row = cfgfast.step_table("ddim", [-1.0, 0.5], prediction_type="sample")[0]
    z, o_c, o_u = torch.randn(3, 5, 3, 4, 4, generator=g)
    w = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0])
    p, bound = 0.9, 1.8
    g_x = (1 + w)[:, None, None, None] * o_c - w[:, None, None, None] * o_u
    x = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=bound)._threshold_sample(g_x)
    for backend in BACKENDS:
        torch.testing.assert_close(cfgfast.guided_step(z, o_c, o_u, row, w, threshold=(p, bound), backend=backend),
                                   cfgfast.guided_step(z, x, x, row, 0.0, backend="reference"), rtol=1e-5, atol=1e-5)


def test_guided_step_bad_guidance_arguments():
    z = torch.randn(2, 8)
    row = cfgfast.step_table("ddim", [-1.0, 1.0])[0]
    with pytest.raises(ValueError, match=r"guidance must be one of \['cfg', 'cfgfast.APG\(...\)'\], got 'cfgpp' "
                                         r"\(CFG\+\+ is a step table of its own"):
        cfgfast.guided_step(z, z, z, row, 1.0, guidance="cfgpp")
    with pytest.raises(ValueError, match="APG with momentum needs its running value.*momentum_buffer="):
        cfgfast.guided_step(z, z, z, row, 1.0, guidance=APG(momentum=0.5))
    with pytest.raises(ValueError, match="momentum_buffer must be a contiguous float32 tensor of z's shape"):
        cfgfast.guided_step(z, z, z, row, 1.0, guidance=APG(momentum=0.5), momentum_buffer=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="momentum_buffer must be a contiguous float32 tensor of z's shape"):
        cfgfast.guided_step(z, z, z, row, 1.0, guidance=APG(momentum=0.5), momentum_buffer=torch.zeros(2, 8).double())
    with pytest.raises(ValueError, match="momentum_buffer is APG's running value: give it with "
                                         r"guidance=cfgfast.APG\(momentum=...\) only"):
        cfgfast.guided_step(z, z, z, row, 1.0, momentum_buffer=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="momentum_buffer must not overlap z"):
        cfgfast.guided_step(z, z.clone(), z.clone(), row, 1.0, guidance=APG(momentum=0.5), momentum_buffer=z)
    with pytest.raises(ValueError, match="threshold replaces clip"):
        cfgfast.guided_step(z, z, z, row, 1.0, threshold=(0.9, 1.0), clip=1.0)
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\], got -0.5"):
        cfgfast.guided_step(z, z, z, row, 1.0, guidance=APG(), guidance_rescale=-0.5)
