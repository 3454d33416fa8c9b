"""cfgfast.sample on a diffusers DiT (through cfgfast.adapters) against the diffusers DDPMScheduler loop.

    pytest benchmarks/test_adapter_speed.py --benchmark-only
    CFGFAST_BENCH_QUICK=1 pytest benchmarks/test_adapter_speed.py --benchmark-disable    # smoke run

Both sample the same small randomly initialised DiTTransformer2DModel (2 layers, 4x8x8 latents, learned
sigma channels, as tests/test_adapters.py builds it) at batch 64 over the model's own grid, one batched
cond/uncond forward pass of 128 per step, the paper's guidance (1 + w) eps_c - w eps_u, and DDPM's
fixed_small variance (cfgfast's v = 0): tests/test_adapters.py shows the two loops give the same samples
with the same noise. Here each draws its own: cfgfast the noise of SPEC §3 in its fused step, diffusers
torch.randn in DDPMScheduler.step (as DiTPipeline does). The model is tiny, so the steps and the
per-step overhead weigh more than they would next to a full-size DiT.
"""

from __future__ import annotations

import pytest
import torch

import cfgfast

from .utils import DEVICES, DIT_DIFFUSERS_LABEL, DIT_SAMPLE_LABEL, QUICK, SEED, require_device, step_bytes

diffusers = pytest.importorskip("diffusers")
from cfgfast.adapters import DiTAdapter  # noqa: E402  (needs diffusers)

W = 3.0
DIT_BATCH, DIT_STEPS = (64, 4) if QUICK else (64, 50)
DIT_SHAPE = (DIT_BATCH, 4, 8, 8)
DIT_SIZE = f"DiT {DIT_BATCH}x4x8x8, {DIT_STEPS} steps"


def _small_dit(device):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10).to(device).eval()


@torch.no_grad()
def _diffusers_loop(module, scheduler, labels, null_labels, generator):
    """DDPM ancestral sampling as DiTPipeline writes it, with the paper's guidance on the eps channels."""
    device = labels.device
    z = torch.randn(DIT_SHAPE, generator=generator, device=device)
    class_labels = torch.cat([labels, null_labels])
    for t in scheduler.timesteps:
        out = module(torch.cat([z, z]), t.to(device).expand(2 * DIT_BATCH), class_labels).sample
        eps_cond, eps_uncond = out[:, : DIT_SHAPE[1]].chunk(2)
        eps = (1 + W) * eps_cond - W * eps_uncond
        z = scheduler.step(eps, t, z, generator=generator).prev_sample
    return z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["sample", "diffusers"])
def test_dit_end_to_end(step_benchmark, device, variant):
    require_device(device)
    module = _small_dit(device)
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    model = DiTAdapter(module, scheduler)
    labels = torch.arange(DIT_BATCH, device=device) % model.null_label
    if variant == "sample":
        lambdas = model.model_lambdas(DIT_STEPS)

        def run():
            return cfgfast.sample(model, labels, W, v=0.0, lambdas=lambdas, seed=SEED, progress=False)
        label = DIT_SAMPLE_LABEL
    else:
        scheduler.set_timesteps(DIT_STEPS)
        null_labels = torch.full_like(labels, model.null_label)
        generator = torch.Generator(device).manual_seed(SEED)

        def run():
            return _diffusers_loop(module, scheduler, labels, null_labels, generator)
        label = DIT_DIFFUSERS_LABEL
    # the steps' bytes only (the model's are not counted): GB/s say little here, the time says it all
    step_benchmark(run, device=device, size=DIT_SIZE, label=label, shape=DIT_SHAPE,
                   bytes_moved=DIT_STEPS * step_bytes(DIT_SHAPE))
