"""cfgfast.adapters on small randomly initialised diffusers models (no downloads): the lambda <-> timestep
map, what the adapter reads from the scheduler and the model (prediction type, data range, learned variance,
the scheduler's own grid), and cfgfast.sample against hand-written diffusers loops (DDIMScheduler,
DPMSolverMultistepScheduler, DDPMScheduler) with the same model, grid and noise, to float32 rounding; and bad
input."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cfgfast  # noqa: E402
from cfgfast.adapters import DDPMLambdas, DiTAdapter, UNet2DAdapter  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

SEED = 7
STEPS = 10  # inference steps of the sampling comparisons
LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def small_dit(out_channels=8):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=out_channels, num_layers=2, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10).eval()


def small_unet(out_channels=3, **config):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=4, attention_head_dim=4, **{"num_class_embeds": 6, **config}).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def dit():
    return small_dit()


@pytest.fixture(scope="module")
def unet():
    return small_unet(out_channels=6)  # learned variance: eps and 3 variance channels


# ---- lambda <-> timestep

@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_lambda_timestep_round_trip(beta_schedule):
    schedule = DDPMLambdas({**LINEAR, "beta_schedule": beta_schedule})
    alpha_bar = diffusers.DDPMScheduler(**{**LINEAR, "beta_schedule": beta_schedule}).alphas_cumprod.double()
    k = torch.arange(1000, dtype=torch.float64)
    # at the integers: log(alpha_bar / (1 - alpha_bar)) of the scheduler's own alphas_cumprod, exactly
    torch.testing.assert_close(schedule.lam(k), torch.log(alpha_bar / (1 - alpha_bar)), rtol=1e-12, atol=1e-12)
    assert torch.equal(schedule.timestep(schedule.lam(k)), k)
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    torch.testing.assert_close(schedule.timestep(schedule.lam(t)), t, rtol=0, atol=1e-9)
    lam = torch.linspace(schedule.lambda_min, schedule.lambda_max, 3001, dtype=torch.float64)
    torch.testing.assert_close(schedule.lam(schedule.timestep(lam)), lam, rtol=0, atol=1e-9)
    assert bool((torch.diff(schedule.timestep(lam)) < 0).all())  # higher log-SNR, earlier (cleaner) timestep
    # outside the trained range: the nearest end
    assert schedule.timestep(torch.tensor([-30.0, 30.0])).tolist() == [999.0, 0.0]


def test_float32_lambda_gives_the_integer_timestep_to_float32_rounding():
    schedule = DDPMLambdas(LINEAR)
    t = schedule.timestep(schedule.lambdas.float()).float()
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float32), rtol=0, atol=2e-5)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_model_lambdas_are_the_set_timesteps_log_snrs_increasing(spacing, offset):
    scheduler = diffusers.DDPMScheduler(**LINEAR, timestep_spacing=spacing, steps_offset=offset)
    grid = DDPMLambdas(scheduler).model_lambdas(STEPS)
    scheduler.set_timesteps(STEPS)
    alpha_bar = scheduler.alphas_cumprod.double()[scheduler.timesteps]
    assert grid.dtype == torch.float64 and grid.shape == (STEPS,)
    torch.testing.assert_close(grid, torch.log(alpha_bar) - torch.log1p(-alpha_bar), rtol=1e-12, atol=1e-12)
    assert bool((torch.diff(grid) > 0).all())


def test_scheduler_object_config_dict_and_other_schedulers_agree():
    from_dict = DDPMLambdas(LINEAR).lambdas
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        assert torch.equal(DDPMLambdas(cls(**LINEAR)).lambdas, from_dict)


# ---- what the adapter reads from the scheduler and the model

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_type_is_the_schedulers(prediction_type):
    for scheduler in (diffusers.DDPMScheduler(**LINEAR, prediction_type=prediction_type),
                      diffusers.DPMSolverMultistepScheduler(**LINEAR, prediction_type=prediction_type),
                      {**LINEAR, "prediction_type": prediction_type}):
        assert DiTAdapter(small_dit(), scheduler).prediction_type == prediction_type
    assert DiTAdapter(small_dit(), LINEAR).prediction_type == "epsilon"  # diffusers' default


def test_data_range_is_the_schedulers_clip_sample():
    assert DDPMLambdas({**LINEAR, "clip_sample": True, "clip_sample_range": 2.5}).data_range == 2.5
    assert DDPMLambdas({**LINEAR, "clip_sample": True}).data_range == 1.0  # diffusers' default range
    assert DDPMLambdas({**LINEAR, "clip_sample": False, "clip_sample_range": 2.5}).data_range is None
    assert DDPMLambdas(LINEAR).data_range is None
    assert DDPMLambdas(diffusers.DDIMScheduler(**LINEAR)).data_range == 1.0  # DDIM's default clip_sample=True
    assert DDPMLambdas(diffusers.DPMSolverMultistepScheduler(**LINEAR)).data_range is None  # it has no clip_sample


@pytest.mark.parametrize("out_channels", [4, 8])
def test_dit_returns_its_whole_output(out_channels):
    module = small_dit(out_channels)
    model = DiTAdapter(module, LINEAR)
    assert model.null_label == 10 and model.sample_shape == (4, 8, 8)
    assert model.learned_variance == (out_channels == 8)
    table = module.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == model.null_label + 1  # the null row exists: DiT trained with label dropout
    z = torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 0])
    labels = torch.tensor([0, 9, 10])
    with torch.no_grad():
        out = model(z, model.schedule.lam(t).float(), labels)
        want = module(z, t, labels).sample  # eps, then (learned sigma) nu
    assert out.shape == (3, out_channels, 8, 8)
    torch.testing.assert_close(out, want)


def test_unet_returns_its_whole_output(unet):
    model = UNet2DAdapter(unet, LINEAR)
    assert model.null_label == 5 and model.sample_shape == (3, 8, 8) and model.learned_variance
    assert not UNet2DAdapter(small_unet(), LINEAR).learned_variance
    assert UNet2DAdapter(unet, LINEAR, null_label=0).null_label == 0
    z = torch.randn(2, 3, 8, 8)
    t = torch.tensor([700, 3])
    labels = torch.tensor([4, 5])
    with torch.no_grad():
        out = model(z, model.schedule.lam(t).float(), labels)
        want = unet(z, t, labels).sample
    assert out.shape == (2, 6, 8, 8)
    torch.testing.assert_close(out, want)


# ---- the scheduler's grid

def _lambdas_at(alphas_cumprod, timesteps):
    alpha_bar = alphas_cumprod.double()[timesteps.long()]
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing"}])
def test_model_lambdas_of_dpm_solver_are_its_sigmas(config):
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, **config)
    grid = DDPMLambdas(scheduler).model_lambdas(STEPS)
    assert scheduler.num_inference_steps is None  # the user's scheduler is not set: the adapter sets a copy
    scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(grid, -2 * torch.log(scheduler.sigmas[:-1].double()), rtol=0, atol=1e-12)
    assert grid.dtype == torch.float64 and bool((torch.diff(grid) > 0).all())
    if not config.get("use_karras_sigmas"):
        # its timesteps' log-SNRs, to its float32 sigmas' rounding
        torch.testing.assert_close(grid, _lambdas_at(scheduler.alphas_cumprod, scheduler.timesteps), rtol=0,
                                   atol=1e-5)
    if not config:
        # its default "linspace" spacing visits other timesteps than DDPM's default "leading"
        ddpm = diffusers.DDPMScheduler(**LINEAR)
        ddpm.set_timesteps(STEPS)
        assert not torch.equal(scheduler.timesteps, ddpm.timesteps)


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler])
def test_model_lambdas_of_other_schedulers(cls):
    scheduler = cls(**LINEAR, timestep_spacing="trailing")
    grid = DiTAdapter(small_dit(), scheduler).model_lambdas(STEPS)
    scheduler.set_timesteps(STEPS)
    sigmas = getattr(scheduler, "sigmas", None)
    want = _lambdas_at(scheduler.alphas_cumprod, scheduler.timesteps) if sigmas is None \
        else -2 * torch.log(sigmas[:-1].double())
    torch.testing.assert_close(grid, want, rtol=0, atol=1e-12)


def test_a_config_dict_builds_the_scheduler_its_class_name_names():
    config = {**LINEAR, "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.30.0"}
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR)
    assert torch.equal(DDPMLambdas(config).model_lambdas(STEPS), DDPMLambdas(scheduler).model_lambdas(STEPS))
    with pytest.raises(ValueError, match="_class_name must name a diffusers scheduler class, got 'NoSuchScheduler'"):
        DDPMLambdas({**LINEAR, "_class_name": "NoSuchScheduler"})


def test_schedulers_without_a_discrete_schedule_or_one_evaluation_a_step_are_refused(dit):
    with pytest.raises(TypeError, match=r"discrete DDPM schedule \(alphas_cumprod\).* got FlowMatchEulerDiscrete"):
        DiTAdapter(dit, diffusers.FlowMatchEulerDiscreteScheduler())
    heun = DiTAdapter(dit, diffusers.HeunDiscreteScheduler(**LINEAR))
    with pytest.raises(ValueError, match=r"HeunDiscreteScheduler.set_timesteps\(10\) gives 20 sigmas"):
        heun.model_lambdas(STEPS)


# ---- cfgfast.sample == the diffusers loop with the same model, grid and noise

def diffusers_loop(module, scheduler, labels, null_label, sample_shape, w, monkeypatch, v=None, **step_kwargs):
    """The sampling loop as a diffusers user writes it (DiTPipeline's): one batched cond/uncond pass, the paper's
    guidance (1 + w) o_c - w o_u on the prediction channels, scheduler.step. DDPMScheduler's "learned_range" gets
    the conditional pass's variance channels (v=None) or the constant 2v - 1; the others get the prediction
    only. The noise is cfgfast's (SPEC §3): loop index i draws stream 1, step i, the noise of cfgfast's step
    lambda_i -> lambda_(i+1); DDPMScheduler.step takes no variance_noise, so it comes through randn_tensor."""
    channels, batch = sample_shape[0], len(labels)
    ddpm = isinstance(scheduler, diffusers.DDPMScheduler)
    learned_range = ddpm and scheduler.config.variance_type == "learned_range"
    z = cfgfast.normal_noise((batch,) + sample_shape, SEED, step=0, stream=0)  # the initial z of sample()
    w = w.reshape(-1, 1, 1, 1)
    null_labels = torch.full_like(labels, null_label)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            noise = cfgfast.normal_noise(z.shape, SEED, step=i, stream=1)
            out = module(torch.cat([z, z]), t.expand(2 * batch), torch.cat([labels, null_labels])).sample
            out_cond, out_uncond = out[:, :channels].chunk(2)
            guided = (1 + w) * out_cond - w * out_uncond
            if learned_range:
                nu = out[:batch, channels:] if v is None else torch.full_like(guided, 2 * v - 1)
                guided = torch.cat([guided, nu], dim=1)
            if ddpm:
                monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, noise=noise, **k: noise)
                z = scheduler.step(guided, t, z).prev_sample
            else:
                z = scheduler.step(guided, t, z, variance_noise=noise, **step_kwargs).prev_sample
    return z


def assert_float32_close(got, want):
    # a random model's output does not cancel z's noise, so samples reach |x| ~ 1e2 - 1e3; both float32 loops lie
    # within ~1e-6 max|x| of a float64 run of the diffusers loop: hold them to ~30 float32 ulps of max|x|
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=4e-6 * float(want.abs().max()))


def compare(request, monkeypatch, which, scheduler, sampler, *, v=None, eta=0.0, **step_kwargs):
    module = request.getfixturevalue(which)
    adapter = (DiTAdapter if which == "dit" else UNet2DAdapter)(module, scheduler)  # its grid: this scheduler's
    grid = adapter.model_lambdas(STEPS)
    scheduler.set_timesteps(STEPS)
    labels = torch.tensor([0, 3, adapter.null_label - 1, 1])
    w = torch.tensor([0.0, 1.0, 2.5, 4.0])
    if sampler == "ddim":
        step_kwargs["eta"] = eta
    want = diffusers_loop(module, scheduler, labels, adapter.null_label, adapter.sample_shape, w, monkeypatch, v=v,
                          **step_kwargs)
    # sample reads prediction_type, data_range (clip="auto") and learned_variance from the adapter
    extra = {"v": v} if sampler == "ddpm" else {"eta": eta} if sampler == "ddim" else {}
    got = cfgfast.sample(adapter, labels, w, sampler=sampler, lambdas=grid, seed=SEED, **extra)
    assert_float32_close(got, want)


PREDICTION = ["epsilon", "v_prediction"]


@pytest.mark.parametrize("prediction_type", PREDICTION)
@pytest.mark.parametrize("which, eta, extra", [
    ("dit", 0.0, {}),
    ("unet", 0.0, {"timestep_spacing": "trailing"}),
    ("dit", 0.7, {"timestep_spacing": "trailing"}),
    ("unet", 1.0, {}),
    ("dit", 0.5, {"clip_sample": True, "clip_sample_range": 1.5}),  # data_range 1.5: sample's clip="auto"
])
def test_ddim_equals_diffusers(request, monkeypatch, prediction_type, which, eta, extra):
    scheduler = diffusers.DDIMScheduler(**LINEAR, **{"clip_sample": False, **extra}, set_alpha_to_one=True,
                                        prediction_type=prediction_type)
    compare(request, monkeypatch, which, scheduler, "ddim", eta=eta, use_clipped_model_output=True)


@pytest.mark.parametrize("prediction_type", PREDICTION)
@pytest.mark.parametrize("which", ["dit", "unet"])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_solver_equals_diffusers(request, monkeypatch, prediction_type, which, algorithm):
    scheduler = diffusers.DPMSolverMultistepScheduler(**LINEAR, algorithm_type=algorithm, solver_order=2,
                                                      solver_type="midpoint", final_sigmas_type="zero",
                                                      lower_order_final=False, prediction_type=prediction_type)
    sampler = "dpmpp_2m" if algorithm == "dpmsolver++" else "dpmpp_2m_sde"
    compare(request, monkeypatch, which, scheduler, sampler)


@pytest.mark.parametrize("prediction_type", PREDICTION)
@pytest.mark.parametrize("which", ["dit", "unet"])
def test_ddpm_learned_range_is_the_models_learned_variance(request, monkeypatch, prediction_type, which):
    """v=None (sample's default) on a learned-variance model: the conditional pass's nu, as diffusers'
    "learned_range" reads the model's variance channels."""
    scheduler = diffusers.DDPMScheduler(**LINEAR, variance_type="learned_range", clip_sample=False,
                                        prediction_type=prediction_type)
    compare(request, monkeypatch, which, scheduler, "ddpm")


@pytest.mark.parametrize("which, variance_type, v, extra", [
    ("dit", "fixed_small", 0.0, {}),
    ("dit", "learned_range", 0.3, {}),  # a number v overrides the learned variance
    ("unet", "fixed_small", 0.0, {}),
    ("unet", "learned_range", 0.2, {"prediction_type": "v_prediction"}),
    ("dit", "fixed_large", 1.0, {}),
    ("dit", "fixed_small", 0.0, {"clip_sample": True}),  # data_range clip_sample_range: sample's clip="auto"
    ("dit", "learned_range", 0.3, {"timestep_spacing": "trailing"}),  # last timestep 99: a tiny last noise
])
def test_ddpm_with_a_fixed_v_equals_diffusers(request, monkeypatch, which, variance_type, v, extra):
    scheduler = diffusers.DDPMScheduler(**LINEAR, variance_type=variance_type, **{"clip_sample": False, **extra})
    compare(request, monkeypatch, which, scheduler, "ddpm", v=v)


@pytest.mark.parametrize("variance_type, v", [("fixed_large", 1.0), ("learned_range", 0.9), ("fixed_small", 0.0)])
@pytest.mark.parametrize("extra", [{"timestep_spacing": "trailing"}, {"steps_offset": 1}])
def test_where_the_last_timestep_is_above_0_diffusers_adds_a_last_noise(dit, monkeypatch, variance_type, v, extra):
    """The documented exception: diffusers' last step from a timestep tau > 0 adds noise of std
    sqrt(b^v 1e-20^(1-v)), b = 1 - alpha_bar_tau, drawn at loop index n - 1; cfgfast's last step returns x~."""
    scheduler = diffusers.DDPMScheduler(**LINEAR, variance_type=variance_type, clip_sample=False, **extra)
    adapter = DiTAdapter(dit, scheduler)
    scheduler.set_timesteps(STEPS)
    tau = int(scheduler.timesteps[-1])
    assert tau > 0
    labels, w = torch.tensor([0, 3, 9]), torch.tensor([0.0, 1.0, 3.0])
    want = diffusers_loop(dit, scheduler, labels, adapter.null_label, adapter.sample_shape, w, monkeypatch, v=v)
    got = cfgfast.sample(adapter, labels, w, v=v, lambdas=adapter.model_lambdas(STEPS), seed=SEED)
    b = 1 - float(scheduler.alphas_cumprod[tau])
    std = (b ** v * 1e-20 ** (1 - v)) ** 0.5
    last_noise = cfgfast.normal_noise(got.shape, SEED, step=STEPS - 1, stream=1)
    assert_float32_close(got + std * last_noise, want)
    if variance_type != "fixed_small":
        # the difference is that noise, not rounding (samples of |x| ~ 1e3 round to ~1e-4, as large as a last
        # noise from timestep 1): its projection on the noise has the std above
        difference = (want - got).double().flatten()
        noise = last_noise.double().flatten()
        assert float(difference @ noise / (noise @ noise)) == pytest.approx(std, rel=0.05)


# ---- bad input

def test_output_channels_neither_c_nor_2c_are_refused():
    with pytest.raises(ValueError, match=r"out_channels=6"):
        DiTAdapter(small_dit(out_channels=6), LINEAR)
    with pytest.raises(ValueError, match=r"out_channels=4"):
        UNet2DAdapter(small_unet(out_channels=4), LINEAR)


@pytest.mark.parametrize("scheduler, message", [
    ({"num_train_timesteps": 1000}, "'trained_betas' or 'beta_schedule'"),
    ({"beta_schedule": "linear", "num_train_timesteps": 1000}, r"\['beta_start', 'beta_end'\]"),
    ({"beta_schedule": "squaredcos_cap_v2"}, r"\['num_train_timesteps'\]"),
    ({**LINEAR, "prediction_type": "flow_prediction"}, r"got 'flow_prediction' \(a flow-matching model"),
    ({**LINEAR, "prediction_type": "x0"},
     r"prediction_type must be one of \['epsilon', 'v_prediction', 'sample'\], got 'x0'"),
    ({**LINEAR, "clip_sample": True, "clip_sample_range": 0.0}, "clip_sample_range must be a positive number"),
    ({**LINEAR, "rescale_betas_zero_snr": True}, "zero-terminal-SNR"),
    ({"trained_betas": [0.1, 0.0, 0.2], "num_train_timesteps": 3}, "betas must be positive"),
    ({"trained_betas": [0.1, 0.2, 0.3]}, "num_train_timesteps must equal the number of trained_betas 3, got 1000"),
    ({**LINEAR, "beta_start": float("nan")}, r"alphas_cumprod must lie in \(0, 1\).*got nan at timestep 0"),
    ({"trained_betas": [0.1, float("nan"), 0.1], "num_train_timesteps": 3}, "got nan at timestep 1"),
    ({**LINEAR, "num_train_timesteps": 1}, "num_train_timesteps must be an int of at least 2"),
    ({**LINEAR, "num_train_timesteps": 0}, "num_train_timesteps must be an int of at least 2"),
    ({**LINEAR, "num_train_timesteps": 2.5}, "num_train_timesteps must be an int of at least 2"),
])
def test_bad_scheduler_configs_are_refused(scheduler, message):
    with pytest.raises(ValueError, match=message):
        DDPMLambdas(scheduler)


def test_bad_models_and_schedulers_are_named(dit):
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler"):
        DiTAdapter(dit, "linear")
    # objects with a config that are not schedulers (their betas would be diffusers' defaults, silently)
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler .* got DiTTransformer2DModel"):
        DiTAdapter(dit, dit)
    pipeline = diffusers.DDPMPipeline(unet=small_unet(), scheduler=diffusers.DDPMScheduler(**LINEAR))
    with pytest.raises(TypeError, match="got DDPMPipeline"):
        UNet2DAdapter(small_unet(), pipeline)
    thresholding = diffusers.DDPMScheduler(**LINEAR, thresholding=True)
    with pytest.warns(UserWarning, match="thresholding=True .* ignored") as caught:
        DDPMLambdas(thresholding)
    with pytest.warns(UserWarning, match="thresholding=True .* ignored") as caught_too:
        DiTAdapter(dit, thresholding)
    # the caller's line (here, not in cfgfast nor in pytest)
    assert (caught[0].filename, caught_too[0].filename) == (__file__, __file__)
    assert caught_too[0].lineno == caught[0].lineno + 2
    with pytest.raises(TypeError, match="transformer must be a diffusers DiTTransformer2DModel"):
        DiTAdapter(small_unet(), LINEAR)
    with pytest.raises(ValueError, match="num_class_embeds=None"):
        UNet2DAdapter(small_unet(num_class_embeds=None), LINEAR)
    with pytest.raises(ValueError, match="time_embedding_type 'positional', got 'learned'"):
        UNet2DAdapter(small_unet(time_embedding_type="learned", num_train_timesteps=1000), LINEAR)
    with pytest.raises(ValueError, match="null_label must be at least 0, below 6"):
        UNet2DAdapter(small_unet(), LINEAR, null_label=6)


def test_a_null_label_that_is_not_the_last_row():
    """A model trained with row 0 as "no class" samples its classes 1..5: sample bounds labels by the model's rows,
    not by its null label, and passes row 0 as the unconditional label."""
    model = UNet2DAdapter(small_unet(), LINEAR, null_label=0)
    seen = []
    forward = model.forward
    model.forward = lambda z, lam, labels: (seen.append(labels.clone()), forward(z, lam, labels))[1]
    x = cfgfast.sample(model, torch.tensor([1, 5]), 2.0, lambdas=model.model_lambdas(3), backend="reference")
    # the first step's passes (one of batch 2B, or two of B): the labels, then the null row
    assert x.shape == (2, 3, 8, 8) and torch.equal(torch.cat(seen)[:4], torch.tensor([1, 5, 0, 0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\] \(null_label 0\)"):
        cfgfast.sample(model, torch.tensor([6]), 2.0, lambdas=model.model_lambdas(3))


def test_labels_beyond_the_class_count_are_refused(dit):
    model = DiTAdapter(dit, LINEAR)
    z, lam = torch.zeros(2, 4, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] .* got values in \[0, 11\]"):
        model(z, lam, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(z, lam, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="labels must be int64"):
        model(z, lam, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lam must have shape \[2\]"):
        model(z, torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"z must be \[B, 4, H, W\]"):
        model(torch.zeros(2, 3, 8, 8), lam, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="z must be a floating-point tensor, got torch.int64"):
        model(torch.zeros(2, 4, 8, 8, dtype=torch.int64), lam, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lam must not be NaN"):
        model(z, torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):  # sample's own check, before any pass
        cfgfast.sample(model, torch.tensor([11]), 1.0, lambdas=model.model_lambdas(4))


def test_grid_that_is_not_increasing_is_refused(dit):
    model = DiTAdapter(dit, LINEAR)
    with pytest.raises(ValueError, match="lambdas must be increasing"):
        cfgfast.sample(model, torch.tensor([0]), 1.0, lambdas=model.model_lambdas(4).flip(0))
    with pytest.raises(ValueError, match="num_inference_steps must be at least 2"):
        model.model_lambdas(1)
    with pytest.raises(ValueError, match="below 1001"):
        model.model_lambdas(1001)
    offset = DiTAdapter(dit, {**LINEAR, "steps_offset": 1})  # 1000 steps from timestep 1: timestep 1000 too
    with pytest.raises(ValueError, match=r"num_inference_steps=1000 .* steps_offset 1 visits timesteps outside "
                                         r"\[0, 999\] \(from 1 to 1000\)"):
        offset.model_lambdas(1000)
    assert offset.model_lambdas(999).shape == (999,)


def test_an_empty_batch_samples_nothing(dit, unet):
    for model in (DiTAdapter(dit, LINEAR), UNet2DAdapter(unet, LINEAR)):
        x = cfgfast.sample(model, torch.zeros(0, dtype=torch.long), 1.0, lambdas=model.model_lambdas(3))
        assert x.shape == (0,) + model.sample_shape and x.dtype == torch.float32


def test_grid_beyond_the_default_lambda_range_samples_with_the_models_range():
    module = small_dit()
    model = DiTAdapter(module, {"num_train_timesteps": 4000, "beta_schedule": "squaredcos_cap_v2",
                                "timestep_spacing": "trailing"})  # trailing: the grid starts at t = T - 1
    grid = model.model_lambdas(3)
    assert grid[0] == model.lambda_min < -20
    with pytest.raises(ValueError, match=r"lambdas must lie in \[lambda_min, lambda_max\]"):
        cfgfast.sample(model, torch.tensor([1]), 1.0, lambdas=grid)
    x = cfgfast.sample(model, torch.tensor([1]), 1.0, lambdas=grid, lambda_min=model.lambda_min,
                       lambda_max=model.lambda_max)
    assert x.shape == (1, 4, 8, 8) and bool(torch.isfinite(x).all())


def test_training_mode_is_refused():
    module = small_dit().train()
    model = DiTAdapter(module, LINEAR)
    with pytest.raises(ValueError, match=r"training mode .* call \.eval\(\)"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([0]))
