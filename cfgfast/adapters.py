"""Adapters: diffusers' class-conditional models behind cfgfast's model protocol `model(z, lam, labels) -> output`.

    from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler
    from cfgfast.adapters import DiTAdapter

    model = DiTAdapter(DiTTransformer2DModel.from_pretrained(repo, subfolder="transformer"),
                       DPMSolverMultistepScheduler.from_pretrained(repo, subfolder="scheduler"))
    latents = cfgfast.sample(model, labels, w=3.0, sampler="dpmpp_2m", lambdas=model.model_lambdas(25))

The model. A diffusers model was trained on a discrete schedule: timestep k in 0 .. T-1 has alphas_cumprod[k],
the alpha_bar of DDPM, which is cfgfast's alpha^2, so its log-SNR is lambda_k = log(alpha_bar_k / (1 - alpha_bar_k))
(SPEC §1: alpha^2 = sigmoid(lambda)). The adapter maps cfgfast's continuous lambda to the model's continuous
timestep by interpolating lambda linearly between neighbouring integer timesteps and inverting (exact at the
integers); lambda outside the trained range [lambda_(T-1), lambda_0] is clamped to it (t in [0, T - 1]). The
adapter declares what sample() reads, from the scheduler's config and the model's:
- prediction_type: the config's "epsilon", "v_prediction" or "sample" (diffusers' names are cfgfast's);
- data_range: clip_sample_range where clip_sample is true, else None, so sample's clip="auto" is diffusers'
  clip_sample (dynamic thresholding has no cfgfast counterpart: a warning, and it is ignored);
- learned_variance: True for out_channels = 2 in_channels (IDDPM, ADM, DiT's learned sigma). The adapter then
  returns all 2C channels, prediction then nu, and sampler "ddpm" with v=None steps with the model's variance.

The grid. `model_lambdas(n)` is the lambda of what the scheduler's own `set_timesteps(n)` visits (on a copy:
the scheduler given is not changed), in increasing order: for a scheduler that keeps k-diffusion sigmas
sigma = sqrt((1 - alpha_bar) / alpha_bar) (DPMSolverMultistepScheduler, EulerDiscreteScheduler, ...) lambda =
-2 log sigma of its sigmas but the last (the final sigma), for one that does not (DDPMScheduler,
DDIMScheduler, ...) the lambda of alphas_cumprod at its timesteps. Its last point is the step that returns
x~: the diffusers schedulers' last step, to alpha_bar = 1 (sigma = 0), returns their x0 prediction there. On
that grid, with the guided output (1 + w) o_cond - w o_uncond (diffusers' guidance_scale is 1 + w), started
from cfgfast.normal_noise(shape, seed, step=0, stream=0) and drawing at loop index i the variance noise
cfgfast.normal_noise(shape, seed, step=i, stream=1),

    cfgfast.sample(model, labels, w, sampler=..., lambdas=model.model_lambdas(n), seed=seed)

equals the diffusers loop to float32 rounding (tested on small random models, epsilon and v_prediction):
- "ddpm": DDPMScheduler. Its step from timestep tau_i to tau_(i+1) is cfgfast's lambda_i -> lambda_(i+1):
  the same posterior mean; "fixed_small" is v = 0, "fixed_large" v = 1, and "learned_range", fed the
  conditional pass's variance channels, is v=None on a learned-variance model (a constant variance output
  2v - 1 is the number v). Where its last timestep tau is above 0 ("trailing" spacing, steps_offset >= 1)
  diffusers' last step still adds noise of std sqrt(b^v 1e-20^(1-v)), b = 1 - alpha_bar_tau (its variance
  clamped at 1e-20): 1e-10 for fixed_small, sqrt(b) for fixed_large, growing with v for learned_range.
  cfgfast's last step adds none (Algorithm 2 ends with x = x~): diffusers' sample is cfgfast's plus that
  std times cfgfast.normal_noise(shape, seed, step=n-1, stream=1) (tested).
- "ddim" with eta: DDIMScheduler with set_alpha_to_one=True (else its last step goes to alpha_bar_0, not 1),
  step(..., eta=eta, variance_noise=noise), and use_clipped_model_output=True where clip_sample is set. Its
  step goes from timestep t to t - T // n, which is the next visited timestep for "leading" and "trailing"
  spacing but not for "linspace".
- "dpmpp_2m" / "dpmpp_2m_sde": DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" /
  "sde-dpmsolver++", solver_order 2, solver_type "midpoint", final_sigmas_type "zero" and lower_order_final
  False (or n >= 15; diffusers' default True takes first-order last steps below 15). With karras, exponential
  or beta sigmas the grid is the same, but diffusers hands the model its timestep rounded to an integer and
  cfgfast the interpolated one.
Also:
- The grid must lie in sample()'s [lambda_min, lambda_max] (default [-20, 20]). diffusers' beta schedules
  at 1000 timesteps stay inside (squaredcos_cap_v2 reaches -19.8); where a grid leaves it (that schedule
  with more timesteps, some trained_betas) pass lambda_min=model.lambda_min, lambda_max=model.lambda_max.
- sample() hands the model lambda in float32, so the timestep the model sees equals diffusers' integer
  up to that rounding: exactly at most timesteps, else one float32 ulp of t away (at most ~6e-5).
- The default grid of sample() (no lambdas=) also works: its lambda beyond the model's range reaches the
  model as timestep 0 or T - 1, but those steps are spent outside what the model was trained on.
"""

from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from collections.abc import Mapping

import torch

try:
    import diffusers
except ImportError as error:  # diffusers is an optional extra
    raise ImportError(f"cfgfast.adapters needs diffusers ({error}): pip install 'cfgfast[diffusers]'") from error

from . import _checks
from .samplers import PREDICTION_TYPES

# Beta schedules of DDPMScheduler that read beta_start and beta_end (squaredcos_cap_v2 and laplace do not).
_BETA_RANGE_SCHEDULES = ("linear", "scaled_linear", "sigmoid")


def _init_keys(cls) -> frozenset:
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


def _config_class(config: Mapping):
    """The scheduler class a config dict names in its _class_name (as a scheduler_config.json does), else DDPM."""
    name = config.get("_class_name")
    if name is None:
        return diffusers.DDPMScheduler
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler config's _class_name must name a diffusers scheduler class, got {name!r}")
    return cls


def _scheduler_config(scheduler) -> tuple[type, dict]:
    """The class and config of `scheduler`: a diffusers scheduler (its config) or a config mapping (e.g. a
    scheduler_config.json read as a dict; DDPMScheduler unless its _class_name says), which must say where its
    betas come from."""
    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        cls = _config_class(config)
        if config.get("trained_betas") is None:
            if "beta_schedule" not in config:
                raise ValueError("scheduler config must give its betas: 'trained_betas' or 'beta_schedule' "
                                 f"(diffusers' defaults would be a guess), got keys {sorted(config)}")
            needed = ["num_train_timesteps"]
            if config["beta_schedule"] in _BETA_RANGE_SCHEDULES:
                needed += ["beta_start", "beta_end"]
            missing = [key for key in needed if key not in config]
            if missing:
                raise ValueError(f"scheduler config with beta_schedule {config['beta_schedule']!r} must give "
                                 f"{missing}, got keys {sorted(config)}")
    elif isinstance(scheduler, diffusers.SchedulerMixin) and isinstance(getattr(scheduler, "config", None), Mapping):
        # a scheduler object: its config holds every value it was built with (not any object with a config: a
        # model's or a pipeline's would fall back to diffusers' default betas, silently another schedule)
        cls, config = type(scheduler), dict(scheduler.config)
    else:
        raise TypeError("scheduler must be a diffusers scheduler (e.g. DDPMScheduler) or its config as a dict, "
                        f"got {type(scheduler).__name__}")
    if config.get("thresholding"):
        frame, level = sys._getframe(1), 2  # the warning points at the caller's line, outside this module
        while frame is not None and frame.f_code.co_filename == __file__:
            frame, level = frame.f_back, level + 1
        warnings.warn("scheduler's thresholding=True (dynamic thresholding) has no cfgfast counterpart and is "
                      "ignored: the adapter reads only the schedule (sample's clip= is the static clip_sample)",
                      stacklevel=level)
    # keys of other schedulers and the bookkeeping keys (_class_name, ...) do not concern this class
    keys = _init_keys(cls)
    return cls, {key: value for key, value in config.items() if key in keys}


def _prediction_type(config: Mapping) -> str:
    prediction_type = config.get("prediction_type", "epsilon")
    if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
        hint = " (a flow-matching model: cfgfast samples diffusion models)" * (prediction_type == "flow_prediction")
        raise ValueError(f"scheduler's prediction_type must be one of {list(PREDICTION_TYPES)}, "
                         f"got {prediction_type!r}{hint}")
    return prediction_type


def _data_range(config: Mapping) -> float | None:
    if not config.get("clip_sample", False):
        return None
    value = config.get("clip_sample_range", 1.0)
    try:
        return _checks.clip(value)
    except (TypeError, ValueError):
        raise ValueError(f"scheduler's clip_sample_range must be a positive number (the data lie in [-c, c]), "
                         f"got {value!r}") from None


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on t's device, where nothing may be read back to the host."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class DDPMLambdas:
    """The log-SNRs of a scheduler's discrete DDPM schedule, the map between them and continuous timesteps, and
    the scheduler's grid (`model_lambdas`), prediction type and data range.

    lambdas[k] = log(alpha_bar_k) - log(1 - alpha_bar_k) in float64 from diffusers' float32 alphas_cumprod
    (the values its scheduler steps with), strictly decreasing in k = 0 .. T - 1.
    """

    def __init__(self, scheduler):
        cls, config = _scheduler_config(scheduler)
        steps = config.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ValueError(f"scheduler's num_train_timesteps must be an int of at least 2 (a schedule of one "
                             f"timestep has no step to take), got {steps!r}")
        self.prediction_type = _prediction_type(config)
        self.data_range = _data_range(config)
        self._scheduler = cls.from_config(config)  # our own: set_timesteps mutates it
        alpha_bar = getattr(self._scheduler, "alphas_cumprod", None)
        if not isinstance(alpha_bar, torch.Tensor):
            raise TypeError(f"scheduler must have a discrete DDPM schedule (alphas_cumprod), as DDPMScheduler, "
                            f"DDIMScheduler or DPMSolverMultistepScheduler do, got {cls.__name__}")
        alpha_bar = alpha_bar.double()
        if alpha_bar.shape[0] != self._scheduler.config.num_train_timesteps:
            # set_timesteps spaces num_train_timesteps, so it would visit timesteps the betas do not have
            raise ValueError(f"scheduler's num_train_timesteps must equal the number of trained_betas "
                             f"{alpha_bar.shape[0]}, got {self._scheduler.config.num_train_timesteps}")
        outside = ~((alpha_bar > 0) & (alpha_bar < 1))  # NaN too
        if bool(outside.any()):
            k = int(torch.nonzero(outside)[0])
            raise ValueError(f"scheduler's alphas_cumprod must lie in (0, 1) for a finite log-SNR, got "
                             f"{float(alpha_bar[k])} at timestep {k} (a zero-terminal-SNR schedule, "
                             "rescale_betas_zero_snr=True, has no finite lambda at its last timestep)")
        self.lambdas = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        steps = torch.diff(self.lambdas)
        if not bool((steps < 0).all()):
            k = int(torch.nonzero(~(steps < 0))[0])
            raise ValueError(f"scheduler's betas must be positive (log-SNR strictly decreasing in t), got a "
                             f"non-decreasing step at timestep {k + 1}")
        self._increasing = self.lambdas.flip(0)  # searchsorted wants increasing knots
        self._on_device = {torch.device("cpu"): self._increasing}

    @property
    def num_train_timesteps(self) -> int:
        return self.lambdas.shape[0]

    @property
    def lambda_min(self) -> float:
        """lambda of the noisiest timestep T - 1."""
        return float(self.lambdas[-1])

    @property
    def lambda_max(self) -> float:
        """lambda of the cleanest timestep 0."""
        return float(self.lambdas[0])

    def _knots(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self._increasing.to(device)
        return self._on_device[device]

    def timestep(self, lam: torch.Tensor) -> torch.Tensor:
        """The continuous timestep (float64, in [0, T - 1]) whose interpolated log-SNR is lam; lam outside
        [lambda_min, lambda_max] gives the nearest end."""
        lam = _checks.tensor("lam", lam)
        if not lam.is_floating_point():
            raise TypeError(f"lam must be a floating-point tensor, got {lam.dtype}")
        # (+-inf is the nearest end; NaN has none.) The check reads lam on the host: not while a CUDA graph captures
        # (sample(cuda_graph=True) checked the model's output at the grid's lambdas eagerly first)
        if not _capturing(lam) and bool(torch.isnan(lam).any()):
            raise ValueError("lam must not be NaN")
        knots = self._knots(lam.device)
        lam = lam.double().clamp(knots[0], knots[-1])
        last = knots.shape[0] - 1
        upper = torch.searchsorted(knots, lam, right=True).clamp(1, last)  # knots[upper - 1] <= lam <= knots[upper]
        below = knots[upper - 1]
        position = (upper - 1) + (lam - below) / (knots[upper] - below)  # exact at the knots
        return last - position

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """The log-SNR (float64) at continuous timesteps t in [0, T - 1], linear between integers."""
        t = _checks.tensor("t", t).double()
        last = self.num_train_timesteps - 1
        if not bool(((t >= 0) & (t <= last)).all()):
            raise ValueError(f"t must lie in [0, {last}] (the scheduler's timesteps), got values outside it")
        knots = self.lambdas.to(t.device)
        lower = t.floor().long().clamp(max=last - 1)
        return torch.lerp(knots[lower], knots[lower + 1], t - lower)

    def model_lambdas(self, num_inference_steps: int) -> torch.Tensor:
        """float64 [num_inference_steps], increasing: lambda of what the scheduler's set_timesteps
        (num_inference_steps) visits, noisiest first (its sigmas but the final one where it keeps sigmas, else its
        timesteps). As `lambdas=` of cfgfast.sample, the last point is the step that returns x~."""
        n = _checks.integer("num_inference_steps", num_inference_steps, low=2,
                            high=self.num_train_timesteps + 1)
        scheduler = self._scheduler
        scheduler.set_timesteps(n)
        name = type(scheduler).__name__
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor):
            if sigmas.shape != (n + 1,):
                # e.g. Heun's and KDPM2's interleaved sigmas: two model evaluations a step
                raise ValueError(f"{name}.set_timesteps({n}) gives {sigmas.shape[0]} sigmas, not {n} and a final "
                                 f"one: it takes other than one model evaluation a step, as cfgfast's samplers do")
            visited = sigmas[:-1].double()
            if not (bool((visited > 0).all()) and bool(torch.isfinite(visited).all())
                    and bool((torch.diff(visited) < 0).all())):
                raise ValueError(f"{name}.set_timesteps({n}) gives sigmas {visited.tolist()}: not {n} distinct "
                                 f"positive finite noise levels, so it has no grid of {n} steps")
            return -2.0 * torch.log(visited)  # sigma^2 = (1 - alpha_bar) / alpha_bar = e^-lambda
        timesteps = scheduler.timesteps  # decreasing: noisiest first, as lambda increases
        if timesteps.shape[0] != n or not bool((torch.diff(timesteps) < 0).all()):
            raise ValueError(f"{name}.set_timesteps({n}) visits {timesteps.tolist()}: not {n} distinct "
                             f"timesteps, so it has no grid of {n} steps")
        last = self.num_train_timesteps - 1
        if not bool(((timesteps >= 0) & (timesteps <= last)).all()):
            # e.g. steps_offset=1 with num_inference_steps = num_train_timesteps visits timestep T
            raise ValueError(f"num_inference_steps={n} with the scheduler's timestep_spacing "
                             f"{scheduler.config.timestep_spacing!r} and steps_offset "
                             f"{scheduler.config.steps_offset} visits timesteps outside [0, {last}] "
                             f"(from {int(timesteps.min())} to {int(timesteps.max())}): ask for fewer steps")
        return self.lam(timesteps.double())


def _output_channels(name: str, in_channels: int, out_channels: int) -> None:
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{name} must output its prediction with in_channels={in_channels} channels, or "
                         f"{2 * in_channels} (prediction and learned variance), got out_channels={out_channels}")


class _DiffusersAdapter(torch.nn.Module):
    """model(z, lam, labels) -> output around a diffusers module called as module(z, t, class_labels)."""

    def __init__(self, module: torch.nn.Module, scheduler, *, in_channels: int, out_channels: int, sample_shape,
                 num_labels: int, null_label: int):
        super().__init__()
        self.module = module
        self.schedule = DDPMLambdas(scheduler)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.sample_shape = sample_shape
        self.num_labels = num_labels  # rows of the class embedding, null_label included
        self.null_label = null_label
        # what cfgfast.sample reads from a model
        self.prediction_type = self.schedule.prediction_type
        self.data_range = self.schedule.data_range
        self.learned_variance = out_channels == 2 * in_channels

    @property
    def lambda_min(self) -> float:
        return self.schedule.lambda_min

    @property
    def lambda_max(self) -> float:
        return self.schedule.lambda_max

    def model_lambdas(self, num_inference_steps: int) -> torch.Tensor:
        """The scheduler's own grid for cfgfast.sample(..., lambdas=): see DDPMLambdas.model_lambdas."""
        return self.schedule.model_lambdas(num_inference_steps)

    def forward(self, z: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = _checks.tensor("z", z)
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"z must be [B, {self.in_channels}, H, W], got shape {tuple(z.shape)}")
        batch = z.shape[0]
        for name, value in (("lam", lam), ("labels", labels)):
            if _checks.tensor(name, value).device != z.device:
                raise ValueError(f"{name} must be on z's device {z.device}, got {value.device}")
            if value.shape != (batch,):
                raise ValueError(f"{name} must have shape [{batch}] (one per sample of z), got {tuple(value.shape)}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {labels.dtype}")
        if batch and not _capturing(labels):  # (the labels are read on the host: not inside a graph's capture)
            low, high = (int(x) for x in torch.aminmax(labels))
            if low < 0 or high >= self.num_labels:
                raise ValueError(f"labels must lie in [0, {self.num_labels - 1}] (the model's {self.num_labels} "
                                 f"class embeddings, null_label {self.null_label} included), got values in "
                                 f"[{low}, {high}]")
        if self.module.training:
            raise ValueError(f"the {type(self.module).__name__} is in training mode (random label dropout, "
                             "dropout): call .eval() on it or on the adapter first")
        t = self.schedule.timestep(lam).float()  # the models embed timesteps in float32
        dtype = next(self.module.parameters()).dtype  # the input layer's (module.dtype walks every submodule)
        if batch == 0:  # diffusers' modules cannot reshape an empty batch
            return z.new_empty((0, self.out_channels) + tuple(z.shape[2:]), dtype=dtype)
        # the prediction, then (learned_variance) its nu channels
        return self.module(z.to(dtype), t, labels, return_dict=False)[0]


class DiTAdapter(_DiffusersAdapter):
    """A diffusers DiTTransformer2DModel (Peebles & Xie) as a cfgfast model.

    null_label = num_embeds_ada_norm (1000 for ImageNet DiT: the row its label dropout trained as "no
    class"); labels in [0, num_embeds_ada_norm]. sample_shape = (in_channels, sample_size, sample_size):
    DiT works in a VAE's latent space, so cfgfast.sample returns latents (decode them with the VAE).
    With out_channels = 2 in_channels (learned sigma) the output keeps both halves and learned_variance is
    True: sampler "ddpm" with v=None samples with the learned variance.
    scheduler: the diffusers scheduler (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, ...) or its
    config dict; see the module's docstring for the timestep map, the grid and what is read from it.
    """

    def __init__(self, transformer, scheduler):
        if not isinstance(transformer, diffusers.DiTTransformer2DModel):
            raise TypeError(f"transformer must be a diffusers DiTTransformer2DModel, got {type(transformer).__name__}")
        config = transformer.config
        in_channels = config.in_channels
        out_channels = in_channels if config.out_channels is None else config.out_channels
        _output_channels("transformer", in_channels, out_channels)
        num_classes = config.num_embeds_ada_norm
        super().__init__(transformer, scheduler, in_channels=in_channels, out_channels=out_channels,
                         sample_shape=(in_channels, config.sample_size, config.sample_size),
                         num_labels=num_classes + 1, null_label=num_classes)


class UNet2DAdapter(_DiffusersAdapter):
    """A class-conditional diffusers UNet2DModel (num_class_embeds, class_embed_type None) as a cfgfast model.

    null_label: the class embedding row the model was trained with as "no class"; default the last row,
    num_class_embeds - 1 (cfgfast.sample accepts labels in [0, num_class_embeds), the null row among them).
    sample_shape = (in_channels, *sample_size), or None where the config has no sample_size (pass shape= to
    sample). With out_channels = 2 in_channels (learned variance) the output keeps both halves and
    learned_variance is True. scheduler: as for DiTAdapter.
    """

    def __init__(self, unet, scheduler, null_label: int | None = None):
        if not isinstance(unet, diffusers.UNet2DModel):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
        config = unet.config
        if config.num_class_embeds is None or config.class_embed_type is not None:
            raise ValueError("unet must be class-conditional through a class embedding table (num_class_embeds "
                             f"set, class_embed_type None), got num_class_embeds={config.num_class_embeds}, "
                             f"class_embed_type={config.class_embed_type!r}")
        if config.time_embedding_type != "positional":
            # "learned" embeds integer timesteps only; "fourier" takes noise levels sigma, not DDPM timesteps
            raise ValueError("unet must embed its timesteps with time_embedding_type 'positional', got "
                             f"{config.time_embedding_type!r}")
        _output_channels("unet", config.in_channels, config.out_channels)
        rows = config.num_class_embeds
        null_label = rows - 1 if null_label is None else _checks.integer("null_label", null_label, high=rows)
        size = config.sample_size
        sample_shape = None if size is None else (config.in_channels,) + (
            (size, size) if isinstance(size, int) else tuple(size))
        super().__init__(unet, scheduler, in_channels=config.in_channels, out_channels=config.out_channels,
                         sample_shape=sample_shape, num_labels=rows, null_label=null_label)
