"""cfgfast.sample against diffusers' DiTPipeline on a DiT-XL/2-shaped transformer with random weights.

    pytest benchmarks/test_dit_speed.py --benchmark-only                          # DiT-XL/2 on a GPU
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/test_dit_speed.py --benchmark-only    # a tiny DiT on the CPU

The model: DiTTransformer2DModel built from DiT-XL/2-256's config (28 layers, hidden 1152 = 16 heads x 72, patch
2, 4x32x32 latents, learned sigma: out_channels 8, 1000 classes and the null label 1000), random weights,
nothing downloaded; float16 on the GPU, as DiT is run there (`DiTPipeline.from_pretrained(..., torch_dtype=
torch.float16)`), float32 on the CPU. In quick mode a tiny DiT of the same kind (2 layers, hidden 64, 4 heads,
4x8x8 latents) at batch 2 and 3 steps on the CPU; the full size is timed on a GPU only.

The variants, on the same weights, scheduler and number of steps:
- diffusers: DiTPipeline.__call__ itself (guidance_scale 4, the VAE replaced by a pass-through, so the time is
  the denoising loop's): one transformer pass of 2B a step, guidance on the eps channels, the learned sigma
  dropped, DDPMScheduler.step on all 2B rows with torch.randn noise;
- cfgfast.sample with w = 3 (guidance_scale = 1 + w) on the scheduler's own grid (model.model_lambdas), v = 0
  (DDPMScheduler's fixed_small variance, which the pipeline uses since it drops the sigma channels): one pass of
  2B a step on a GPU, the fused step and noise; and with cuda_graph=True (GPU only);
- the transformer's forward passes alone: the steps' passes of 2B, nothing else (where the time goes).
The scheduler: DDPMScheduler with DiT's linear betas and no clipping (DiT's latents are not in [-1, 1]).

Before any timing, the pipeline and cfgfast.sample are checked to give the same latents for the same noise on the
tiny DiT in float32 (on each device the run times), cfgfast's noise fed to the pipeline through randn_tensor.
After the run a summary gives each variant's time per sample and the pipeline's time over cfgfast's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import cfgfast

from .conftest import RESULTS
from .utils import (
    FORWARD_LABEL,
    QUICK,
    SAMPLE_GRAPH_LABEL,
    SAMPLE_LABEL,
    SEED,
    require_device,
    step_bytes,
)

diffusers = pytest.importorskip("diffusers")
# (after the importorskip: these need diffusers)
from diffusers.pipelines.dit import pipeline_dit
from diffusers.schedulers import scheduling_ddpm

from cfgfast.adapters import DiTAdapter

GUIDANCE_SCALE = 4.0  # DiTPipeline's default
W = GUIDANCE_SCALE - 1  # cfgfast's w: (1 + w) eps_c - w eps_u = eps_u + s (eps_c - eps_u)
NULL_LABEL = 1000  # DiTPipeline's class_null, whatever the model's class count: both configs have 1000 classes
DIT_XL_2 = {"num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
            "patch_size": 2, "sample_size": 32, "num_embeds_ada_norm": 1000}
TINY = {**DIT_XL_2, "num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 16, "sample_size": 8}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "variance_type": "fixed_small", "clip_sample": False}
PIPELINE_LABEL = "diffusers DiTPipeline, DDPMScheduler"


@dataclass(frozen=True)
class Case:
    device: str
    model: str
    batch: int
    steps: int
    dtype: torch.dtype

    @property
    def config(self) -> dict:
        return DIT_XL_2 if self.model == "DiT-XL/2" else TINY

    @property
    def size(self) -> str:
        return f"{self.model} {str(self.dtype).removeprefix('torch.')}, batch {self.batch}, {self.steps} steps"


# DiT-XL/2 on a GPU (the CPU would take minutes a call); the tiny DiT on the CPU in quick mode only.
CASES = [Case(device="cuda", model="DiT-XL/2", batch=batch, steps=50, dtype=torch.float16) for batch in (4, 32)]
if QUICK:
    CASES.append(Case(device="cpu", model="tiny DiT", batch=2, steps=3, dtype=torch.float32))
VARIANTS = {"cpu": ("diffusers", "sample", "forward"), "cuda": ("diffusers", "sample", "sample_graph", "forward")}
LABELS = {"diffusers": PIPELINE_LABEL, "sample": SAMPLE_LABEL, "sample_graph": SAMPLE_GRAPH_LABEL,
          "forward": FORWARD_LABEL}


class _PassThroughVAE:
    """The VAE slot of DiTPipeline: decode returns its latents (scaling_factor 1), so the pipeline's time is its
    denoising loop's and its output (before the pipeline's clamp to [0, 1]) is kept in `latents` for the check."""

    config = SimpleNamespace(scaling_factor=1.0)
    latents = None

    def decode(self, latents):
        self.latents = latents
        return SimpleNamespace(sample=latents)


def make_transformer(config: dict, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: DiT-XL/2's 675M weights are slow to fill on a CPU
        transformer = diffusers.DiTTransformer2DModel(**config).eval().requires_grad_(False)
    return transformer if dtype == torch.float32 else transformer.to(dtype)


def make_pipeline(transformer):
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_PassThroughVAE(),
                                 scheduler=diffusers.DDPMScheduler(**SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, labels: list[int], steps: int):
    pipe(labels, guidance_scale=GUIDANCE_SCALE, num_inference_steps=steps, output_type="pt")
    return pipe.vae.latents


def make_adapter(transformer):
    return DiTAdapter(transformer, diffusers.DDPMScheduler(**SCHEDULER))


def run_sample(model, labels: torch.Tensor, steps: int, cuda_graph: bool = False):
    # v=0: the pipeline's fixed_small variance (it drops the sigma channels, so the learned one is not used)
    return cfgfast.sample(model, labels, W, v=0.0, lambdas=model.model_lambdas(steps), seed=SEED, progress=False,
                          cuda_graph=cuda_graph)


@contextlib.contextmanager
def cfgfast_noise_in_pipeline(shape, device):
    """The pipeline draws cfgfast's noise (SPEC §3): its initial latents are sample()'s z (stream 0), and its
    i-th DDPMScheduler.step draws the noise of cfgfast's step i (stream 1) on both halves of its 2B rows."""
    steps = iter(range(10**9))

    def latents(*args, **kwargs):
        return cfgfast.normal_noise(shape, SEED, step=0, stream=0, device=device)

    def step_noise(*args, **kwargs):
        return cfgfast.normal_noise(shape, SEED, step=next(steps), stream=1, device=device).repeat(2, 1, 1, 1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_dit, "randn_tensor", latents)
        patch.setattr(scheduling_ddpm, "randn_tensor", step_noise)
        yield


_AGREEMENT: set[tuple[str, bool]] = set()


def check_agreement(device: str, cuda_graph: bool = False) -> None:
    """The pipeline and cfgfast.sample (cuda_graph: sample(cuda_graph=True)) give the same latents for the same
    noise, on the tiny DiT in float32; once per device and variant, before its timings."""
    if (device, cuda_graph) in _AGREEMENT:
        return
    batch, steps = 3, 4
    labels = [0, 417, 999]  # 417: an arbitrary middle class
    shape = (batch, TINY["in_channels"], TINY["sample_size"], TINY["sample_size"])
    # cuDNN's convolutions (the patch embedding) default to TF32, a 10-bit mantissa: float32 here, on both sides
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        transformer = make_transformer(TINY, device, torch.float32)
        with cfgfast_noise_in_pipeline(shape, device):
            want = run_pipeline(make_pipeline(transformer), labels, steps)
        got = run_sample(make_adapter(transformer), torch.tensor(labels, device=device), steps, cuda_graph=cuda_graph)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert want.shape == shape and bool(torch.isfinite(want).all()), "the pipeline's latents"
    # a random model's output does not cancel z's noise, so latents reach |x| ~ 1e2: both float32 loops within ~30
    # ulps of max|x| on the CPU (as tests/test_adapters.py holds them); a GPU's kernels round in other orders
    atol = (4e-6 if device == "cpu" else 2e-5) * float(want.abs().max())
    name = "sample(cuda_graph=True)" if cuda_graph else "sample"
    torch.testing.assert_close(got, want, rtol=0, atol=atol,
                               msg=lambda text: f"{name} against DiTPipeline on {device}: {text}")
    _AGREEMENT.add((device, cuda_graph))


def _forward_only(transformer, pipe, labels: torch.Tensor, steps: int):
    """The transformer's share of the pipeline: its passes of 2B at the scheduler's timesteps, nothing else."""
    device, batch = labels.device, labels.shape[0]
    config = transformer.config
    x = torch.randn((2 * batch, config.in_channels, config.sample_size, config.sample_size), device=device,
                    dtype=transformer.dtype)
    both = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    pipe.scheduler.set_timesteps(steps)
    timesteps = [t.to(device).expand(2 * batch) for t in pipe.scheduler.timesteps]

    @torch.no_grad()
    def run():
        for t in timesteps:
            transformer(x, timestep=t, class_labels=both, return_dict=False)

    return run


_TRANSFORMERS: dict = {}


def _cases():
    for case in CASES:
        for variant in VARIANTS[case.device]:
            yield pytest.param(case, variant, id=f"{case.device}-{case.model.replace('/', '')}-b{case.batch}-{variant}")


@pytest.mark.parametrize(("case", "variant"), list(_cases()))
def test_dit_sampling(step_benchmark, dit_summary, case, variant):
    if case.device == "cpu":
        # a tiny model gains nothing from a second thread, and on a busy machine the OpenMP barriers of every small
        # op make it many times slower (tests/conftest.py one_thread)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _time_dit(step_benchmark, dit_summary, case, variant)
        finally:
            torch.set_num_threads(threads)
    else:
        _time_dit(step_benchmark, dit_summary, case, variant)


def _time_dit(step_benchmark, dit_summary, case, variant):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{case.model} is timed on a GPU only (CFGFAST_BENCH_QUICK=1 times a tiny DiT on the CPU)")
    require_device(case.device)
    check_agreement(case.device, cuda_graph=variant == "sample_graph")
    key = (case.model, case.device, case.dtype)
    if key not in _TRANSFORMERS:
        _TRANSFORMERS.clear()  # one DiT-XL/2 in memory at a time
        _TRANSFORMERS[key] = make_transformer(case.config, case.device, case.dtype)
    transformer = _TRANSFORMERS[key]
    pipe = make_pipeline(transformer)
    labels = [(137 * i) % 1000 for i in range(case.batch)]  # spread over the classes
    label_tensor = torch.tensor(labels, device=case.device)
    if variant == "diffusers":
        def run():
            return run_pipeline(pipe, labels, case.steps)
    elif variant in ("sample", "sample_graph"):
        model = make_adapter(transformer)

        def run():
            return run_sample(model, label_tensor, case.steps, cuda_graph=variant == "sample_graph")
    else:
        run = _forward_only(transformer, pipe, label_tensor, case.steps)
    config = case.config
    shape = (case.batch, config["in_channels"], config["sample_size"], config["sample_size"])
    # the steps' bytes only (the model's are not counted): GB/s say little here, the time says it all
    latents = step_benchmark(run, device=case.device, size=case.size, label=LABELS[variant], shape=shape,
                             bytes_moved=case.steps * step_bytes(shape, case.dtype))
    if variant != "forward":  # float16 on a random DiT-XL/2 could overflow: then the times are not of real work
        assert latents.shape == shape and bool(torch.isfinite(latents).all()), f"{variant}: non-finite latents"
    dit_summary[(case.device, case.size)] = case.batch


class _Summary:
    """Each DiT case's time per sample and the ratios, from the medians that conftest's step_benchmark records."""

    def __init__(self):
        self.batches: dict[tuple[str, str], int] = {}

    def __setitem__(self, key, batch):
        self.batches[key] = batch

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        cases = [(key, batch) for key, batch in self.batches.items() if key in RESULTS]
        if not cases:
            return
        terminalreporter.section("cfgfast.sample against DiTPipeline: time per sample, all measured in this run")
        for (device, size), batch in cases:
            rows = RESULTS[(device, size)]
            write(f"{size} on {device}")
            write(f"  {'variant':<50} {'ms/sample':>10} {'median ms':>10} {'min ms':>10}")
            for label, r in rows.items():
                write(f"  {label:<50} {r.median_s * 1e3 / batch:10.2f} {r.median_s * 1e3:10.2f} {r.min_s * 1e3:10.2f}")
            pipeline = rows.get(PIPELINE_LABEL)
            for label in (SAMPLE_LABEL, SAMPLE_GRAPH_LABEL):
                if pipeline and label in rows:
                    write(f"  {'DiTPipeline / ' + label:<50} {pipeline.median_s / rows[label].median_s:9.2f}x "
                          f"(minima {pipeline.min_s / rows[label].min_s:.2f}x)")
            forward = rows.get(FORWARD_LABEL)
            for label in (PIPELINE_LABEL, SAMPLE_LABEL, SAMPLE_GRAPH_LABEL):
                if forward and label in rows:
                    # eager passes: under a CUDA graph they lose their launch overhead, so the share can pass 100%
                    write(f"  {'forward / ' + label:<50} {100 * forward.median_s / rows[label].median_s:9.1f}%")
            write("")


@pytest.fixture(scope="session")
def dit_summary(request):
    """The summary printed at the end of the run (a plugin: pytest calls terminal-summary hooks of plugins only)."""
    summary = _Summary()
    # left registered: the terminal summary comes after the session's fixtures are torn down
    request.config.pluginmanager.register(summary, "cfgfast-dit-summary")
    return summary
