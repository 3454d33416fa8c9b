"""The samplers of SPEC §6 end to end on the exact toy: against a float64 implementation written from the SPEC's
text (not from cfgfast.samplers' coefficient rows), against diffusers' schedulers on the same lambda grid with the
same noise, and across prediction types, backends and batch splits."""

from __future__ import annotations

import math

import pytest
import torch

import cfgfast
from cfgfast.toy import three_classes

SAMPLERS = list(cfgfast.SAMPLERS)
PREDICTION_TYPES = list(cfgfast.PREDICTION_TYPES)


def alpha_sigma64(lam: float) -> tuple[float, float]:
    return math.sqrt(1.0 / (1.0 + math.exp(-lam))), math.sqrt(1.0 / (1.0 + math.exp(lam)))


def sample_float64(model, labels, w, lams, sampler, *, prediction_type="epsilon", eta=0.0, v=0.3, clip=None,
                   seed=0, nu_of=None, cfgpp=False, inside=None, rescale=0.0, apg=None, threshold=None):
    """SPEC §6 in float64: the model called in float32 (as the toy computes), everything else float64.
    w: one per sample [B], or one row a step [T, B]. nu_of(z, lam) gives a learned variance per element for "ddpm"
    (None: v). cfgpp: CFG++'s ddim (SPEC §7), at the steps where inside[t] (every step for inside=None). SPEC §7:
    rescale phi; apg (eta_parallel, norm_threshold, momentum) at the steps where some w != 0, a sample's running
    value M changed only at the steps where its own w != 0; threshold (p, M)."""
    batch = labels.shape[0]
    null = torch.full_like(labels, model.null_label)
    z = cfgfast.normal_noise((batch,) + tuple(model.sample_shape), seed, step=0, stream=0, backend="reference").double()
    w_steps = torch.as_tensor(w, dtype=torch.float64)
    w_steps = w_steps.expand(len(lams), batch) if w_steps.dim() == 1 else w_steps
    x_prev = h_prev = None
    running = torch.zeros_like(z)  # APG's M
    dims = tuple(range(1, z.dim()))

    def dot(a, b):
        return (a * b).sum(dim=dims, keepdim=True)

    def std_of(a):
        return a.std(dim=dims, correction=0, keepdim=True)

    for t, lam in enumerate(lams):
        w = w_steps[t].reshape(-1, *([1] * (z.dim() - 1)))
        lam_b = torch.full((batch,), lam)
        o_c = model(z.float(), lam_b, labels).double()
        o_u = model(z.float(), lam_b, null).double()
        g = (1 + w) * o_c - w * o_u
        if rescale and apg is None:  # SPEC §7: g <- phi g std(o_c) / std(g) + (1 - phi) g, population std per sample
            g = rescale * g * std_of(o_c) / std_of(g) + (1 - rescale) * g
        alpha, sigma = alpha_sigma64(lam)
        x_of = {"epsilon": lambda o: (z - sigma * o) / alpha, "v_prediction": lambda o: alpha * z - sigma * o,
                "sample": lambda o: o}[prediction_type]
        x = x_of(g)
        x_u = x_of(o_u)  # CFG++: the unclipped x-prediction of the unconditional output
        if apg is not None and bool((w_steps[t] != 0).any()):
            eta_parallel, rho, beta = apg
            x_c = x_of(o_c)
            delta = x_c - x_u + beta * running
            running = torch.where(w != 0, delta, running)
            if rho > 0:
                delta = delta * torch.clamp(rho / dot(delta, delta).sqrt(), max=1.0)
            parallel = dot(delta, x_c) / dot(x_c, x_c) * x_c
            x = x_c + w * (delta - parallel + eta_parallel * parallel)
            if rescale:
                x = rescale * x * std_of(x_c) / std_of(x) + (1 - rescale) * x
        if threshold is not None:
            p, bound = threshold
            s = torch.quantile(x.abs().reshape(batch, -1), p, dim=1).clamp(1.0, bound)
            s = s.reshape(-1, *([1] * (z.dim() - 1)))
            x = x.clamp(-s, s) / s
        if clip is not None:
            x = x.clamp(-clip, clip)
        if t == len(lams) - 1:
            return x
        lam_next = lams[t + 1]
        alpha_n, sigma_n = alpha_sigma64(lam_next)
        r = math.exp(lam - lam_next)
        n = cfgfast.normal_noise(z.shape, seed, step=t, stream=1, backend="reference").double()
        if sampler == "ddpm":
            small, large = (1 - r) * sigma_n**2, (1 - r) * sigma**2
            v_t = v if nu_of is None else (nu_of(z, lam) + 1) / 2
            std = torch.exp((1 - v_t) * math.log(small) / 2 + v_t * math.log(large) / 2) if nu_of is not None \
                else math.sqrt(small ** (1 - v) * large**v)
            z = r * alpha_n / alpha * z + (1 - r) * alpha_n * x + std * n
        elif sampler == "ddim":
            s2 = eta**2 * (1 - r) * sigma_n**2
            eps_hat = (z - alpha * (x_u if cfgpp and (inside is None or inside[t]) else x)) / sigma
            z = alpha_n * x + math.sqrt(sigma_n**2 - s2) * eps_hat + math.sqrt(s2) * n
        else:
            h = (lam_next - lam) / 2
            if x_prev is None:
                d = x
            else:
                rho = h_prev / h
                d = (1 + 1 / (2 * rho)) * x - (1 / (2 * rho)) * x_prev
            if sampler == "dpmpp_2m":
                z = sigma_n / sigma * z + alpha_n * (1 - math.exp(-h)) * d
            else:
                z = (sigma_n / sigma * math.exp(-h) * z + alpha_n * (1 - math.exp(-2 * h)) * d
                     + sigma_n * math.sqrt(1 - math.exp(-2 * h)) * n)
            x_prev, h_prev = x, h
    raise AssertionError("unreachable")


LABELS = torch.arange(3).repeat(4)
W = torch.linspace(0.0, 3.0, 12)


@pytest.mark.parametrize("clip", [None, 1.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_matches_float64_spec(sampler, prediction_type, clip):
    model = three_classes(prediction_type)
    lams = cfgfast.sampling_lambdas(20, spacing=cfgfast.samplers.DEFAULT_SPACING[sampler]).tolist()
    eta = 0.6 if sampler == "ddim" else 0.0
    expected = sample_float64(model, LABELS, W, lams, sampler, prediction_type=prediction_type, eta=eta, clip=clip,
                              seed=5)
    for backend in ["reference"] + (["cpu"] if "cpu" in cfgfast.available_backends() else []):
        got = cfgfast.sample(model, LABELS, W, sampler=sampler, eta=eta, lambdas=lams, clip=clip, seed=5,
                             backend=backend)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [None, 1.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_cfgpp_matches_float64_spec(prediction_type, clip):
    """CFG++ (SPEC §7) with "ddim": x~ from g, the direction from the unconditional output's unclipped x-prediction;
    w = 0 still runs the unconditional pass; outside a guidance interval the step is plain ddim."""
    model = three_classes(prediction_type)
    lams = cfgfast.sampling_lambdas(16).tolist()
    w = W.clone()
    w[0] = 0.0
    for eta, interval in ((0.0, None), (0.5, (-6.0, 6.0))):
        inside = None if interval is None else [interval[0] <= lam <= interval[1] for lam in lams]
        w_steps = w if inside is None else torch.stack([w * float(i) for i in inside])  # w = 0 outside
        expected = sample_float64(model, LABELS, w_steps, lams, "ddim", prediction_type=prediction_type, eta=eta,
                                  clip=clip, seed=7, cfgpp=True, inside=inside)
        for backend in ["reference"] + (["cpu"] if "cpu" in cfgfast.available_backends() else []):
            got = cfgfast.sample(model, LABELS, w, sampler="ddim", eta=eta, lambdas=lams, clip=clip, seed=7,
                                 guidance="cfgpp", guidance_interval=interval, backend=backend)
            # an epsilon model's first steps scale float32 rounding by alpha'/alpha (150 from lam = -20 on this
            # grid): plain ddim's own error here is 3.6e-4
            atol = 5e-4 if prediction_type == "epsilon" else 1e-4
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=atol)
    plain = cfgfast.sample(model, LABELS, w, sampler="ddim", lambdas=lams, clip=clip, seed=7)
    assert not torch.allclose(plain, got)


@pytest.mark.parametrize("sampler, guidance", [("ddpm", "cfg"), ("dpmpp_2m_sde", "cfg"), ("ddim", "cfgpp")])
def test_guidance_rescale_matches_float64_spec(sampler, guidance):
    # 16-D classes: a standard deviation over a sample's elements means something (over the 2-D toy's two, a
    # near-zero std(g) makes k ill-conditioned)
    from cfgfast.toy import GaussianClasses

    g = torch.Generator().manual_seed(6)
    a = torch.randn(3, 16, 16, generator=g, dtype=torch.float64) / 8
    model = GaussianClasses(torch.randn(3, 16, generator=g, dtype=torch.float64),
                            a @ a.mT + 0.3 * torch.eye(16, dtype=torch.float64))
    lams = cfgfast.default_lambdas(12, sampler).tolist()
    expected = sample_float64(model, LABELS, W, lams, sampler, seed=3, cfgpp=guidance == "cfgpp", rescale=0.7)
    for backend in ["reference"] + (["cpu"] if "cpu" in cfgfast.available_backends() else []):
        got = cfgfast.sample(model, LABELS, W, sampler=sampler, lambdas=lams, seed=3, guidance=guidance,
                             guidance_rescale=0.7, backend=backend)
        # (ddim on the paper's grid from lam = -20 scales float32 rounding by alpha'/alpha: without rescale its
        # error against the same float64 loop is 1.4e-3 here)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=2e-3 if sampler == "ddim" else 5e-4)
    plain = cfgfast.sample(model, LABELS, W, sampler=sampler, lambdas=lams, seed=3, guidance=guidance)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg():
    pytest.importorskip("diffusers")
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    from cfgfast.guidance import rescaled_weights
    from cfgfast.step import guidance_weights

    g = torch.Generator().manual_seed(4)
    o_c, o_u = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    w = torch.tensor([0.0, 1.0, 2.5, 4.0, 9.0])
    wb = w.reshape(-1, 1, 1, 1)
    noise_cfg = o_u + (1 + wb) * (o_c - o_u)  # diffusers' guidance scale is 1 + w
    for phi in (0.0, 0.3, 0.7, 1.0):
        weights = rescaled_weights(o_c, o_u, guidance_weights(w), phi)
        ours = weights[:, 0].reshape(-1, 1, 1, 1) * o_c - weights[:, 1].reshape(-1, 1, 1, 1) * o_u
        torch.testing.assert_close(ours, rescale_noise_cfg(noise_cfg, o_c, guidance_rescale=phi), rtol=1e-5,
                                   atol=1e-5)
    # one sample's weights read that sample alone: a batch split gives the same bits
    whole = rescaled_weights(o_c, o_u, guidance_weights(w), 0.7)
    parts = torch.cat([rescaled_weights(o_c[i:j], o_u[i:j], guidance_weights(w[i:j]), 0.7)
                       for i, j in ((0, 2), (2, 5))])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)


def test_guided_step_rescale_on_every_backend():
    from cfgfast.guidance import rescaled_weights
    from cfgfast.step import guidance_weights

    g = torch.Generator().manual_seed(5)
    z, o_c, o_u = (torch.randn(3, 2, 17, generator=g) for _ in range(3))
    row = cfgfast.step_table("dpmpp_2m_sde", [-2.0, 0.0, 1.0])[1]
    w = torch.tensor([0.5, 2.0, 6.0])
    expected = cfgfast.guided_step(z, o_c, o_u, row, w, seed=1, step=1, backend="reference",
                                   guidance_rescale=0.5)
    by_hand = cfgfast.reference.guided_step_reference(
        z, o_c, o_u, rescaled_weights(o_c, o_u, guidance_weights(w), 0.5), cfgfast.StepCoefficients(*row.tolist()),
        cfgfast.normal_noise(z.shape, 1, step=1, backend="reference"))[0]
    torch.testing.assert_close(expected, by_hand, rtol=0, atol=0)
    for backend in [b for b in cfgfast.available_backends() if b in ("reference", "cpu")]:  # (CPU tensors)
        got = cfgfast.guided_step(z, o_c, o_u, row, w, seed=1, step=1, backend=backend, guidance_rescale=0.5)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prediction_types_give_the_same_samples():
    """The toy is exact in every parametrisation, so the three types sample the same distribution from the same
    noise: the same samples to float32 rounding."""
    for sampler in SAMPLERS:
        runs = [cfgfast.sample(three_classes(p), LABELS, W, 15, sampler=sampler, seed=3) for p in PREDICTION_TYPES]
        for other in runs[1:]:
            torch.testing.assert_close(other, runs[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_split_gives_the_same_samples(sampler):
    model = three_classes()
    whole = cfgfast.sample(model, LABELS, W, 8, sampler=sampler, seed=9)
    parts = [cfgfast.sample(model, LABELS[i:j], W[i:j], 8, sampler=sampler, seed=9, index_offset=i)
             for i, j in ((0, 5), (5, 12))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


class LearnedVarianceToy:
    """The toy with nu channels appended: nu = tanh(z) (any function of z), so "ddpm" reads it per element."""

    def __init__(self):
        self.toy = three_classes()
        self.null_label, self.sample_shape = self.toy.null_label, self.toy.sample_shape
        self.learned_variance = True

    def __call__(self, z, lam, labels):
        return torch.cat([self.toy(z, lam, labels), torch.tanh(z)], dim=1)


def test_learned_variance_matches_float64_spec():
    model = LearnedVarianceToy()
    lams = cfgfast.sampling_lambdas(12).tolist()
    expected = sample_float64(model.toy, LABELS, W, lams, "ddpm", seed=2,
                              nu_of=lambda z, lam: torch.tanh(z.float()).double())
    for backend in ["reference"] + (["cpu"] if "cpu" in cfgfast.available_backends() else []):
        got = cfgfast.sample(model, LABELS, W, lambdas=lams, seed=2, backend=backend)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # a number v overrides the learned variance
    fixed = cfgfast.sample(model, LABELS, W, lambdas=lams, seed=2, v=0.3)
    torch.testing.assert_close(fixed.double(), sample_float64(model.toy, LABELS, W, lams, "ddpm", seed=2),
                               rtol=1e-4, atol=1e-4)


# ---- diffusers' schedulers driven by hand with the toy's guided eps, on their own timesteps' lambdas

def _lambdas_of(alphas_cumprod: torch.Tensor, timesteps) -> list[float]:
    a = alphas_cumprod.double()[torch.as_tensor(timesteps).long()]
    return (torch.log(a) - torch.log1p(-a)).tolist()


def _peer_loop(scheduler, model, labels, w, lams, seed, **step_kwargs):
    """A diffusers-style loop: CFG in torch on eps, the scheduler's step, the noise of SPEC §3 as variance noise."""
    batch = labels.shape[0]
    null = torch.full_like(labels, model.null_label)
    z = cfgfast.normal_noise((batch,) + tuple(model.sample_shape), seed, step=0, stream=0, backend="reference")
    w = w.reshape(-1, 1)
    for t, timestep in enumerate(scheduler.timesteps):
        lam_b = torch.full((batch,), lams[t])
        eps_c, eps_u = model(z, lam_b, labels), model(z, lam_b, null)
        eps = (1 + w) * eps_c - w * eps_u
        noise = cfgfast.normal_noise(z.shape, seed, step=t, stream=1, backend="reference")
        z = scheduler.step(eps, timestep, z, variance_noise=noise, **step_kwargs).prev_sample
    return z


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_equals_diffusers(eta):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(20)
    lams = _lambdas_of(scheduler.alphas_cumprod, scheduler.timesteps)  # increasing: the timesteps decrease
    model = three_classes()
    peer = _peer_loop(scheduler, model, LABELS, W, lams, 4, eta=eta)
    ours = cfgfast.sample(model, LABELS, W, sampler="ddim", eta=eta, lambdas=lams, seed=4)
    torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmpp_2m_equals_diffusers(algorithm):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
                                                      final_sigmas_type="zero", lower_order_final=False)
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas[:-1].double()  # k-diffusion sigmas sqrt((1 - a) / a) at the timesteps; then 0
    lams = (-2.0 * torch.log(sigmas)).tolist()  # increasing: the sigmas decrease
    model = three_classes()
    peer = _peer_loop(scheduler, model, LABELS, W, lams, 6)
    sampler = "dpmpp_2m" if algorithm == "dpmsolver++" else "dpmpp_2m_sde"
    ours = cfgfast.sample(model, LABELS, W, sampler=sampler, lambdas=lams, seed=6)
    torch.testing.assert_close(ours, peer, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_equals_diffusers(variance_type, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddpm

    scheduler = diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=False)
    scheduler.set_timesteps(25)
    lams = _lambdas_of(scheduler.alphas_cumprod, scheduler.timesteps)
    toy = three_classes()
    learned = variance_type == "learned_range"
    batch = LABELS.shape[0]
    null = torch.full_like(LABELS, toy.null_label)
    z = cfgfast.normal_noise((batch, 2), 8, step=0, stream=0, backend="reference")
    w = W.reshape(-1, 1)
    for t, timestep in enumerate(scheduler.timesteps):
        lam_b = torch.full((batch,), lams[t])
        eps = (1 + w) * toy(z, lam_b, LABELS) - w * toy(z, lam_b, null)
        if learned:
            eps = torch.cat([eps, torch.tanh(z)], dim=1)
        noise = cfgfast.normal_noise(z.shape, 8, step=t, stream=1, backend="reference")
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, noise=noise, **k: noise)
        z = scheduler.step(eps, timestep, z).prev_sample
    model = LearnedVarianceToy() if learned else toy
    v = {"fixed_small": 0.0, "fixed_large": 1.0, "learned_range": None}[variance_type]
    ours = cfgfast.sample(model, LABELS, W, lambdas=lams, seed=8, v=v)
    torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-4)


def test_bad_sampler_arguments():
    model = three_classes()
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde'\]"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="euler")
    with pytest.raises(ValueError, match=r"prediction_type must be one of \['epsilon', 'v_prediction', 'sample'\]"):
        cfgfast.sample(model, LABELS, 1.0, 4, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="eta is a setting of sampler 'ddim' only"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="v is a setting of sampler 'ddpm' only"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="ddim", v=0.3)
    learned = LearnedVarianceToy()
    learned_wrong = lambda z, lam, labels: learned.toy(z, lam, labels)  # noqa: E731
    learned_wrong.learned_variance, learned_wrong.null_label, learned_wrong.sample_shape = True, 3, (2,)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        cfgfast.sample(learned_wrong, LABELS, 1.0, 4)
    with pytest.raises(ValueError, match="guidance='cfgpp' \\(CFG\\+\\+\\) is a form of sampler 'ddim' only"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="dpmpp_2m", guidance="cfgpp")
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        cfgfast.sample(model, LABELS, 1.0, 4, guidance_rescale=1.5)
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        cfgfast.guided_step(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), cfgfast.step_table(
            "ddim", [0.0, 1.0])[0], 1.0, guidance_rescale=-0.1)
    with pytest.raises(ValueError, match=r"guidance must be one of \['cfg', 'cfgpp', 'cfgfast.APG\(...\)'\]"):
        cfgfast.sample(model, LABELS, 1.0, 4, guidance="apg")
    with pytest.raises(ValueError, match="classifier guidance has none"):
        cfgfast.sample(model, LABELS, 1.0, 4, sampler="ddim", guidance="cfgpp", classifier=model.log_posterior)
    with pytest.raises(ValueError, match=r"spacing must be one of \['paper', 'uniform'\]"):
        cfgfast.sampling_lambdas(4, spacing="karras")


def test_default_grids():
    """sample walks default_lambdas(steps, sampler): the paper's spacing on [-20, 20] for ddpm and ddim, even
    spacing on [-10, 10] for the DPM-Solver++ samplers; a bound given replaces the sampler's."""
    assert cfgfast.default_lambdas(5, "dpmpp_2m").tolist() == [-10.0, -5.0, 0.0, 5.0, 10.0]
    torch.testing.assert_close(cfgfast.default_lambdas(7, "ddim"), cfgfast.sampling_lambdas(7), rtol=0, atol=0)
    assert cfgfast.default_lambdas(3, "dpmpp_2m_sde", lambda_min=-4.0).tolist() == [-4.0, 3.0, 10.0]
    model = three_classes()
    for sampler in SAMPLERS:
        a = cfgfast.sample(model, LABELS, W, 7, sampler=sampler, seed=1)
        b = cfgfast.sample(model, LABELS, W, sampler=sampler, seed=1, lambdas=cfgfast.default_lambdas(7, sampler))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
