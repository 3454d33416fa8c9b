"""cfgfast.sample (SPEC §4, the paper's Algorithm 2) on the exact toy model: the right distribution at
w = 0, separation growing with w, one 2B pass per guided step, reproducibility across backends and
batch splits, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cfgfast
from cfgfast.toy import three_classes

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in cfgfast.available_backends()]


class Counting:
    """Wraps a model and records the batch size of each forward pass."""

    def __init__(self, model):
        self.model, self.batches = model, []
        self.null_label, self.sample_shape = model.null_label, model.sample_shape

    def __call__(self, z, lam, labels):
        self.batches.append(z.shape[0])
        return self.model(z, lam, labels)


def test_unguided_samples_have_each_class_mean_and_covariance():
    model = three_classes()
    n = 6000
    labels = torch.arange(n) % 3
    x = cfgfast.sample(model, labels, 0.0, steps=256, seed=1).double()
    for k in range(3):
        xk = x[labels == k]
        # standard errors with 2000 samples: mean ~0.016, covariance entries ~0.013; the 256-step grid's
        # own bias on the covariance is at most ~0.015
        torch.testing.assert_close(xk.mean(0), model.means[k], rtol=0, atol=0.06)
        torch.testing.assert_close(torch.cov(xk.T), model.covs[k], rtol=0, atol=0.06)


def test_guidance_pushes_classes_apart():
    model = three_classes()
    labels = torch.arange(3000) % 3
    spreads = []
    for w in (0.0, 1.0, 4.0):
        x = cfgfast.sample(model, labels, w, steps=48, seed=2)
        means = torch.stack([x[labels == k].mean(0) for k in range(3)])
        spreads.append(torch.pdist(means).min().item())
    assert spreads[0] < spreads[1] < spreads[2]


def test_one_forward_pass_of_2b_per_guided_step_and_b_when_unguided():
    model = Counting(three_classes())
    labels = torch.tensor([0, 1, 2, 0])
    cfgfast.sample(model, labels, 2.0, steps=10, max_batch=None)
    assert model.batches == [8] * 10
    model.batches.clear()
    cfgfast.sample(model, labels, 0.0, steps=10, max_batch=None)
    assert model.batches == [4] * 10


def test_guidance_interval_skips_the_unconditional_pass_outside_it():
    model = Counting(three_classes())
    grid = cfgfast.sampling_lambdas(20)
    lo, hi = grid[5].item(), grid[12].item()  # grid points: the interval's ends are inside it (lam_lo <= lam <= lam_hi)
    x = cfgfast.sample(model, torch.tensor([0, 1]), 3.0, steps=20, guidance_interval=(lo, hi), max_batch=None)
    inside = [lo <= lam <= hi for lam in grid.tolist()]
    assert model.batches == [4 if g else 2 for g in inside] and 0 < sum(inside) < 20
    # equal to guidance given per step by hand: w where lam is inside, 0 elsewhere
    z = cfgfast.normal_noise((2, 2), 0, step=0, stream=0)
    for t, lam in enumerate(grid.tolist()):
        lam_b = torch.full((2,), lam)
        eps_c = model.model(z, lam_b, torch.tensor([0, 1]))
        eps_u = model.model(z, lam_b, torch.tensor([3, 3]))
        last = t == 19
        z = cfgfast.reverse_step(z, eps_c, eps_u, lam, lam if last else grid[t + 1].item(), 3.0 if inside[t] else 0.0,
                                 step=t, last=last)
    torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_seed_same_samples_for_any_split(backend):
    model = three_classes()
    labels = torch.arange(10) % 3
    w = torch.linspace(0, 4, 10)
    whole = cfgfast.sample(model, labels, w, steps=24, seed=7, backend=backend)
    parts = [cfgfast.sample(model, labels[i:j], w[i:j], steps=24, seed=7, index_offset=i, backend=backend)
             for i, j in ((0, 3), (3, 4), (4, 10))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)


def test_backends_agree():
    if "cpu" not in cfgfast.available_backends():
        pytest.skip("cpu backend unavailable")
    model, labels = three_classes(), torch.arange(12) % 3
    a = cfgfast.sample(model, labels, 2.0, steps=32, seed=3, backend="cpu")
    b = cfgfast.sample(model, labels, 2.0, steps=32, seed=3, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_model_output_keeps_float32_state():
    model = three_classes()

    def bf16_model(z, lam, labels):
        return model(z, lam, labels).to(torch.bfloat16)

    labels = torch.arange(300) % 3
    x = cfgfast.sample(bf16_model, labels, 1.0, steps=64, null_label=3, shape=(2,))
    reference = cfgfast.sample(model, labels, 1.0, steps=64)
    assert x.dtype == torch.float32
    # bfloat16 keeps 8 bits: eps errors of ~0.4% per step, amplified by alpha'/alpha early on
    assert (x - reference).abs().median() < 0.05 and (x - reference).abs().max() < 1.0


def test_custom_lambda_grid():
    toy = three_classes()
    seen = []

    def model(z, lam, labels):
        seen.append(lam[0].item())
        return toy(z, lam, labels)

    grid = torch.linspace(-10, 10, 7, dtype=torch.float64)
    cfgfast.sample(model, torch.tensor([0]), 1.0, lambdas=grid, null_label=3, shape=(2,), max_batch=None)
    torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), grid, rtol=0, atol=1e-6)  # float32 lam


def test_a_model_that_keeps_its_input_sees_every_state():
    toy, kept = three_classes(), []

    def recording(z, lam, labels):
        kept.append(z)
        return toy(z, lam, labels)

    cfgfast.sample(recording, torch.tensor([0, 1]), 0.0, steps=6, null_label=3, shape=(2,))
    assert len({id(z) for z in kept}) == 6
    assert all(not torch.equal(a, b) for a, b in zip(kept, kept[1:]))


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(labels=torch.tensor([0, 4])), ValueError, r"labels must lie in \[0, 3\]"),
        (dict(labels=torch.tensor([-1, 0])), ValueError, r"labels must lie in \[0, 3\]"),
        (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be a 1-D integer tensor"),
        (dict(labels=torch.tensor([[0, 1]])), TypeError, "labels must be a 1-D integer tensor"),
        (dict(steps=1), ValueError, "steps must be at least 2"),
        (dict(w=float("nan")), ValueError, "w must be finite"),
        (dict(w=torch.ones(3)), ValueError, "w must be a number or a tensor of shape"),
        (dict(v=2.0), ValueError, r"v must be in \[0, 1\]"),
        (dict(seed=-1), ValueError, "seed must be at least 0"),
        (dict(lambdas=[0.0, 0.0, 1.0]), ValueError, "lambdas must be increasing"),
        (dict(lambdas=[-1.0, 0.0, 1.0], steps=7), ValueError, r"steps must be left out with lambdas= .*length, 3"),
        (dict(lambdas=[0.0, 1.0, float("inf")]), ValueError, r"lambdas\[2\] must be finite"),
        (dict(lambdas=[-1000.0, 0.0]), ValueError, r"lambdas\[0\] must lie in \[-80, 80\]"),
        (dict(lambdas=[-30.0, 0.0]), ValueError, r"lambdas must lie in \[lambda_min, lambda_max\]"),
        (dict(lambdas=[-1.0, 0.0], lambda_min="x"), TypeError, "lambda_min must be a real number"),
        (dict(lambdas=[-1.0, 0.0], lambda_min=5.0, lambda_max=-5.0), ValueError, "lambda_min must be below lambda_max"),
        (dict(lambdas=[-1.0, 0.0], lambda_max=float("nan")), ValueError, "lambda_max must be finite"),
        (dict(lambdas={0.0: "a", 1.0: "b"}), TypeError, "lambdas must be a 1-D sequence of numbers, got dict"),
        (dict(lambdas={0.0, 1.0}), TypeError, "lambdas must be a 1-D sequence of numbers, got set"),
        (dict(lambdas=torch.tensor([0.0, 1.0], device="meta")), ValueError, "lambdas must have values"),
        (dict(lambda_min=-1e-14, lambda_max=0.0, steps=50), ValueError, "steps=50 is too many for the range"),
        (dict(classifier=lambda z, lam: z, null_label="x"), TypeError, "null_label must be an int"),
        (dict(model=lambda z, lam, labels: torch.ones(z.shape, dtype=torch.int64)), TypeError,
         "model must return a floating-point output at step 0"),
        (dict(shape=2), TypeError, "shape must be a tuple of ints"),
        (dict(guidance_interval=(1.0, 0.0)), ValueError, "guidance_interval must have lam_lo <= lam_hi"),
        (dict(guidance_interval=3.0), TypeError, "guidance_interval must be a pair"),
        (dict(guidance_interval={5.0, 0.0}), TypeError, "guidance_interval must be a pair .*, got a set"),
        (dict(guidance_interval={0.0: 5.0}), TypeError, "guidance_interval must be a pair .*, got a dict"),
        (dict(guidance_interval=("a", "b")), TypeError, "guidance_interval must be a pair of numbers"),
        (dict(null_label=100), ValueError, r"null_label must lie in \[0, 3\] \(the model's label rows\)"),
        (dict(labels=torch.tensor([0, 4])), ValueError, r"labels must lie in \[0, 3\]"),
        (dict(cuda_graph="no"), TypeError, "cuda_graph must be True or False"),
        (dict(progress="x"), TypeError, "progress must be True or False"),
        (dict(lambdas=[-1.0, 0.0, 100.0]), ValueError, r"lambdas\[2\] must lie in \[-80, 80\]"),
        (dict(model=lambda z, lam, labels: z[:, :1]), ValueError, r"model must return an output of shape \(2, 2\) at step 0"),
        (dict(model=lambda z, lam, labels: z * float("nan")), ValueError, "non-finite at step 0"),
        (dict(model=object()), TypeError, "model must be callable"),
        (dict(labels=torch.tensor([0, 1], device="meta")), ValueError, r"got the meta device \(labels\)"),
        (dict(clip=0.0), ValueError, "clip must be positive"),
        (dict(w=lambda lam: torch.tensor(float("nan") if lam > 0 else 1.0)), ValueError,
         r"w\(lam\) at step \d+ \(lam=[\d.]+\) must be finite"),
        (dict(model=lambda z, lam, labels: torch.zeros(z.shape, device="meta")), ValueError,
         "model must return its output on cpu at step 0"),
    ],
)
def test_bad_input(kwargs, exc, message):
    args = dict(model=three_classes(), labels=torch.tensor([0, 1]), w=1.0, steps=8)
    args.update(kwargs)
    model, labels, w = args.pop("model"), args.pop("labels"), args.pop("w")
    if not hasattr(model, "null_label") and callable(model):
        args.update(null_label=3, shape=(2,))
    with pytest.raises(exc, match=message):
        cfgfast.sample(model, labels, w, **args)


def test_a_given_grid_takes_one_element_tensor_and_infinite_bounds():
    model, grid = three_classes(), [-30.0, 0.0, 30.0]
    expected = cfgfast.sample(model, torch.tensor([0, 1]), 1.0, lambdas=grid, lambda_min=-30.0, lambda_max=30.0)
    for bounds in (dict(lambda_min=torch.tensor(-30.0), lambda_max=torch.tensor(30.0)),
                   dict(lambda_min=float("-inf"), lambda_max=torch.tensor(float("inf"))),
                   dict(lambda_min=np.float32(-np.inf), lambda_max=np.float64(np.inf))):
        got = cfgfast.sample(model, torch.tensor([0, 1]), 1.0, lambdas=grid, **bounds)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_missing_shape_and_null_label_are_named():
    with pytest.raises(ValueError, match="null_label is unknown"):
        cfgfast.sample(lambda z, lam, labels: z, torch.tensor([0]), 1.0, steps=4, shape=(2,))
    with pytest.raises(ValueError, match="shape is unknown"):
        cfgfast.sample(lambda z, lam, labels: z, torch.tensor([0]), 1.0, steps=4, null_label=1)


def test_toy_eps_is_the_exact_score():
    """eps*(z, c) = -sigma grad log p(z_lam | c), checked against autograd of the closed-form log density."""
    model = three_classes()
    z = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    lam = torch.full((5,), 0.7)
    alpha, sigma = cfgfast.alpha_sigma(0.7)
    for k in range(3):
        dist = torch.distributions.MultivariateNormal(alpha * model.means[k], alpha**2 * model.covs[k]
                                                      + sigma**2 * torch.eye(2, dtype=torch.float64))
        (grad,) = torch.autograd.grad(dist.log_prob(z).sum(), z)
        eps = model(z.detach().float(), lam, torch.full((5,), k))
        torch.testing.assert_close(eps.double(), -sigma * grad, rtol=1e-5, atol=1e-6)
    mixture = torch.stack([torch.distributions.MultivariateNormal(
        alpha * model.means[k], alpha**2 * model.covs[k] + sigma**2 * torch.eye(2, dtype=torch.float64)).log_prob(z)
        for k in range(3)]).logsumexp(0)
    (grad,) = torch.autograd.grad(mixture.sum(), z)
    eps = model(z.detach().float(), lam, torch.full((5,), 3))
    torch.testing.assert_close(eps.double(), -sigma * grad, rtol=1e-5, atol=1e-6)


def test_toy_sample_data_has_the_class_moments():
    model = three_classes()
    labels = torch.arange(30000) % 3
    x = model.sample_data(labels, torch.Generator().manual_seed(0)).double()
    for k in range(3):
        torch.testing.assert_close(x[labels == k].mean(0), model.means[k].double(), rtol=0, atol=0.03)
        torch.testing.assert_close(torch.cov(x[labels == k].T), model.covs[k], rtol=0, atol=0.03)


def test_non_finite_names_the_first_bad_step():
    model = three_classes()
    grid = cfgfast.sampling_lambdas(10).tolist()

    def breaks_at_step_4(z, lam, labels):
        eps = model(z, lam, labels)
        return eps * float("inf") if abs(lam[0].item() - grid[4]) < 1e-6 else eps

    with pytest.raises(ValueError, match=f"non-finite at step 4 \\(lam={grid[4]:.4g}\\)"):
        cfgfast.sample(breaks_at_step_4, torch.tensor([0, 1]), 1.0, steps=10, null_label=3, shape=(2,))


def _tiny_unet():
    from cfgfast.models import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, in_channels=1, num_classes=3, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=(8,), num_heads=2, groups=4)).eval()
    for p in model.parameters():  # no zero-initialised output: the samples then depend on the model
        p.data.normal_(0, 0.05)
    return model


class _LearnedVariance(torch.nn.Module):
    """A tiny U-Net with nu channels appended (nu = tanh of the prediction): a learned-variance model."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.null_label, self.sample_shape = unet, unet.null_label, unet.sample_shape
        self.learned_variance = True

    def forward(self, z, lam, labels):
        out = self.unet(z, lam, labels)
        return torch.cat([out, torch.tanh(out)], dim=1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sampler_name, interval, learned", [("ddpm", None, False), ("ddpm", (-5.0, 5.0), False),
                                                             ("ddpm", None, True), ("dpmpp_2m_sde", None, False),
                                                             ("ddim", (-5.0, 5.0), False)])
def test_device_table_loop_equals_sample(backend, sampler_name, interval, learned):
    """cuda_graph=True's loop (λ, guidance mask and coefficient row looked up at a device step counter, the
    step advancing the counter, the multistep state in a static buffer) run eagerly on the CPU: the same samples
    as sample()."""
    from cfgfast import sampler

    if backend == "cpu" and "cpu" not in cfgfast.available_backends():
        pytest.skip("the compiled CPU kernel is not built")
    model = _LearnedVariance(_tiny_unet()) if learned else _tiny_unet()
    labels = torch.tensor([0, 1, 2, 1, 0])
    w = torch.tensor([0.0, 1.0, 3.0, 0.5, 2.0])
    kwargs = dict(sampler=sampler_name, eta=0.5 if sampler_name == "ddim" else 0.0, seed=5, index_offset=3,
                  guidance_interval=interval, backend=backend, clip=1.5)
    expected = cfgfast.sample(model, labels, w, 6, **kwargs)
    with torch.no_grad():
        plan, z = sampler._plan(model, labels, w, 6, kwargs["sampler"], kwargs["eta"], None, None, 5, None, None,
                                None, None, 1.5, 3, backend, interval, None, False, None)
        got = sampler._loop_table(plan, z, None, capture=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cuda_graph_refusals():
    model = _tiny_unet()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        cfgfast.sample(model, torch.tensor([0]), 1.0, 4, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_equals_uncaptured_run():
    if "cuda" not in cfgfast.available_backends():
        pytest.fail("a GPU is present but the cuda backend is not built")
    labels = torch.arange(12, device="cuda") % 3
    w = torch.linspace(0, 4, 12, device="cuda")
    for learned in (False, True):
        model = (_LearnedVariance(_tiny_unet()) if learned else _tiny_unet()).cuda()
        for sampler_name in cfgfast.SAMPLERS:
            for interval in (None, (-5.0, 5.0)):
                kwargs = dict(sampler=sampler_name, seed=1, guidance_interval=interval)
                plain = cfgfast.sample(model, labels, w, 32, **kwargs)
                graphed = cfgfast.sample(model, labels, w, 32, cuda_graph=True, **kwargs)
                torch.testing.assert_close(graphed, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_graph_on_a_gpu_that_is_not_the_current_one():
    # the capture and the replays run on the model's GPU, not on the current one (cuda:0)
    if "cuda" not in cfgfast.available_backends():
        pytest.fail("GPUs are present but the cuda backend is not built")
    torch.cuda.set_device(0)
    model = _tiny_unet().to("cuda:1")
    labels = torch.arange(4, device="cuda:1") % 3
    plain = cfgfast.sample(model, labels, 2.0, 16, seed=1)
    graphed = cfgfast.sample(model, labels, 2.0, 16, seed=1, cuda_graph=True)
    assert graphed.device == torch.device("cuda:1")
    torch.testing.assert_close(graphed, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("means, covs, weights, message", [
    ([[0.0, 0.0]], [[[1.0, 5.0], [0.0, 1.0]]], None, "covs must be symmetric"),  # eigh read one triangle: identity
    ([[0.0, float("nan")]], [[[1.0, 0.0], [0.0, 1.0]]], None, "means must be finite"),
    ([[0.0, 0.0]], [[[1.0, 0.0], [0.0, float("inf")]]], None, "covs must be finite"),
    ([[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], [float("nan")], "weights must be finite"),
    ([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], None, r"means must have shape \[K, D\]"),
])
def test_toy_refuses_bad_classes(means, covs, weights, message):
    from cfgfast.toy import GaussianClasses

    with pytest.raises(ValueError, match=message):
        GaussianClasses(means, covs, weights)


def test_toy_takes_a_covariance_symmetric_to_float32_rounding():
    from cfgfast.toy import GaussianClasses

    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float32) @ torch.tensor(
        [[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]], dtype=torch.float32)
    cov = rotation @ torch.diag(torch.tensor([0.5, 2.0])) @ rotation.T  # (float32: off by ~1e-8 from symmetric)
    model = GaussianClasses([[0.0, 0.0]], cov[None])
    assert torch.equal(model.covs, model.covs.mT)


def test_toy_checks_its_inputs():
    """Label -1 gave class 2's eps and label 4 the unconditional one; a lam of length 1 was broadcast."""
    model, z = three_classes(), torch.zeros(2, 2)
    for lam, labels, message in ((torch.zeros(2), torch.tensor([0, 4]), r"labels must lie in \[0, 3\]"),
                                 (torch.zeros(2), torch.tensor([-1, 0]), r"labels must lie in \[0, 3\]"),
                                 (torch.zeros(1), torch.tensor([0, 1]), r"lam must be a tensor of shape \[2\]"),
                                 (torch.zeros(2), torch.tensor([0]), r"labels must be an integer tensor of shape \[2\]")):
        with pytest.raises(ValueError, match=message):
            model(z, lam, labels)
    for labels in (torch.tensor([-1]), torch.tensor([3])):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
            model.sample_data(labels)


# ---- guidance that varies by step, and the forward pass in parts

def _hand_loop(model, labels, w_of_step, steps, seed, backend="reference"):
    """A loop with cfgfast's public step: w_of_step(t) -> a number or [B]; the unconditional pass only where some w
    is not 0."""
    lams = cfgfast.sampling_lambdas(steps).tolist()
    table = cfgfast.step_table("ddpm", lams)
    z = cfgfast.normal_noise((labels.shape[0], *model.sample_shape), seed, step=0, stream=0)
    null = torch.full_like(labels, model.null_label)
    for t, lam in enumerate(lams):
        lam_b = torch.full((labels.shape[0],), lam)
        w = torch.as_tensor(w_of_step(t), dtype=torch.float32).expand(labels.shape[0])
        o_c = model(z, lam_b, labels)
        o_u = model(z, lam_b, null) if bool((w != 0).any()) else o_c
        z = cfgfast.guided_step(z, o_c, o_u, table[t], w, seed=seed, step=t, backend=backend)
    return z


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_guidance_schedule_equals_a_hand_loop_with_the_same_w_per_step(backend):
    model = Counting(three_classes())
    labels = torch.tensor([0, 1, 2, 0])
    steps = 12
    lams = cfgfast.sampling_lambdas(steps).tolist()
    per_step = [0.0 if t % 3 == 0 else 0.5 * t for t in range(steps)]
    expected = _hand_loop(model.model, labels, lambda t: per_step[t], steps, 3, backend)
    by_tensor = cfgfast.sample(model, labels, torch.tensor(per_step), steps, seed=3, backend=backend, max_batch=None)
    torch.testing.assert_close(by_tensor, expected, rtol=1e-6, atol=1e-6)
    # the unguided steps ran the conditional pass alone (one pass a step: max_batch=None)
    assert model.batches == [4 if w == 0 else 8 for w in per_step]
    by_callable = cfgfast.sample(model, labels, lambda lam: per_step[lams.index(lam)], steps, seed=3, backend=backend)
    torch.testing.assert_close(by_callable, by_tensor, rtol=0, atol=0)
    # [T, B]: one row a step, one w per sample
    per_sample = torch.tensor(per_step)[:, None] * torch.tensor([1.0, 0.0, 2.0, 0.5])
    expected = _hand_loop(model.model, labels, lambda t: per_sample[t], steps, 3, backend)
    got = cfgfast.sample(model, labels, per_sample, steps, seed=3, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # the interval is a schedule that is 0 outside it
    inside = cfgfast.sample(model, labels, 2.0, steps, seed=3, guidance_interval=(-3.0, 3.0), backend=backend)
    as_schedule = cfgfast.sample(model, labels, lambda lam: 2.0 if -3.0 <= lam <= 3.0 else 0.0, steps, seed=3,
                                 backend=backend)
    torch.testing.assert_close(inside, as_schedule, rtol=0, atol=0)


@pytest.mark.parametrize("max_batch", [1, 3, 5, 8, None])
def test_the_forward_pass_in_parts_gives_the_same_samples(max_batch):
    model = Counting(three_classes())
    labels = torch.tensor([0, 1, 2, 0])
    whole = cfgfast.sample(model.model, labels, 1.5, 6, seed=2, backend="cpu" if "cpu" in CPU_BACKENDS else
                           "reference", max_batch=None)
    parts = cfgfast.sample(model, labels, 1.5, 6, seed=2, backend="cpu" if "cpu" in CPU_BACKENDS else "reference",
                           max_batch=max_batch)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)  # bit for bit
    # below 2B rows the conditional and unconditional rows are passed apart
    assert max(model.batches) == (8 if max_batch is None or max_batch >= 8 else min(max_batch, 4))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(w=torch.ones(5, 2)), ValueError, r"w as a tensor of two dimensions must be \[steps, B\] = \[6, 2\]"),
    (dict(w=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0])), ValueError, "w must be finite"),
    (dict(w=lambda lam: "x"), TypeError, r"w\(lam\) at step 0 \(lam=-20\) must be a real number"),
    (dict(w=lambda lam: torch.ones(3)), ValueError, r"w\(lam\) at step 0 .* must be a number or a tensor of shape \[2\]"),
    (dict(max_batch=0), ValueError, "max_batch must be"),
    (dict(max_batch="all"), TypeError, "max_batch must be an int"),
])
def test_bad_schedules_are_named(kwargs, exc, message):
    args = dict(w=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        cfgfast.sample(three_classes(), torch.tensor([0, 1]), args.pop("w"), 6, **args)


def test_on_the_cpu_the_conditional_and_unconditional_passes_run_apart_by_default():
    """max_batch="auto" on the CPU: two passes of B a guided step, as a hand loop runs them."""
    model = Counting(three_classes())
    labels = torch.tensor([0, 1, 2, 0, 1])
    cfgfast.sample(model, labels, 2.0, steps=4)
    assert model.batches == [5] * 8


def test_device_table_loop_with_guidance_rescale_equals_sample():
    """cuda_graph=True's loop (run eagerly) computes the rescale on the device at every step, as sample() does."""
    from cfgfast import sampler

    model = _tiny_unet()
    labels = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([0.0, 1.0, 3.0, 0.5])
    expected = cfgfast.sample(model, labels, w, 5, seed=2, guidance_rescale=0.6, clip=1.5, backend="reference")
    with torch.no_grad():
        plan, z = sampler._plan(model, labels, w, 5, "ddpm", 0.0, None, None, 2, None, None, None, None, 1.5, 0,
                                "reference", None, None, False, None, guidance_rescale=0.6)
        got = sampler._loop_table(plan, z, None, capture=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, cfgfast.sample(model, labels, w, 5, seed=2, clip=1.5, backend="reference"))
