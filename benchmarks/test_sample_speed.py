"""sample() end to end against the loop users write by hand, and the model's forward passes alone.

    pytest benchmarks/test_sample_speed.py --benchmark-only

Three models: the exact toy (cfgfast.toy.three_classes, 2-D samples), the bundled digits model at batch 256
(target: sample >= 1.5x the hand loop), and an untrained 3x64x64 U-Net (target:
under 5% of each step spent outside the model's forward). On a GPU the digits model and the U-Net also
run there, with sample(cuda_graph=True) beside the eager sample(). The hand loop is Algorithm 2 as people write
it: a conditional and an unconditional forward pass of batch B, then the eager PyTorch step with torch.randn
noise. The summary prints hand loop / sample and the share of sample's time outside the forward passes.
"""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.models import UNet, UNetConfig
from cfgfast.toy import three_classes

from .utils import (
    FORWARD_LABEL,
    HAND_LOOP_LABEL,
    SAMPLE_GRAPH_LABEL,
    SAMPLE_LABEL,
    SAMPLE_MODELS,
    SEED,
    coefficients,
    eager_step,
    require_device,
    sample_size,
    step_bytes,
)

W, V = 2.0, 0.3

# An ADM-style 64x64 network small enough to time on a laptop CPU (the imagenet64 preset is ~10x the work).
UNET64 = UNetConfig(image_size=64, in_channels=3, num_classes=1000, base_channels=64, channel_mult=(1, 2, 2, 2),
                    num_res_blocks=1, attention_resolutions=(16, 8), num_heads=4, groups=32)


def _model(name: str, device: str):
    if name == "toy":
        return three_classes()
    if name == "digits":
        return cfgfast.load_pretrained("digits").to(device)
    torch.manual_seed(0)
    model = UNet(UNET64).eval().requires_grad_(False)
    for p in model.parameters():  # no zero-initialised layers, so the samples are not trivially 0
        p.data.normal_(0, 0.02)
    return model.to(device)


def _hand_loop(model, labels, w, steps, v, generator):
    """Algorithm 2 as users write it: cond and uncond forward passes, the eager step, torch.randn noise."""
    batch, device = labels.shape[0], labels.device
    null_labels = torch.full_like(labels, model.null_label)
    w = torch.full((batch,), w, device=device)
    grid = cfgfast.sampling_lambdas(steps)
    table = cfgfast.step_table("ddpm", grid, v=v)
    z = torch.randn((batch,) + tuple(model.sample_shape), generator=generator, device=device)
    for t, lam in enumerate(grid.tolist()):
        last = t == len(grid) - 1
        lam_b = torch.full((batch,), lam, device=device)
        eps_cond, eps_uncond = model(z, lam_b, labels), model(z, lam_b, null_labels)
        noise = None if last else torch.randn(z.shape, generator=generator, device=device)
        z = eager_step(z, eps_cond, eps_uncond, w, coefficients(table[t]), noise)
    return z


def _forward_only(model, labels, steps):
    """The model's work inside sample(): one forward pass of batch 2B per step, nothing else."""
    device = labels.device
    z = torch.randn((2 * labels.shape[0],) + tuple(model.sample_shape), device=device)
    both = torch.cat([labels, torch.full_like(labels, model.null_label)])
    for lam in cfgfast.sampling_lambdas(steps).tolist():
        model(z, torch.full((z.shape[0],), lam, device=device), both)


# cuda_graph=True needs the cuda backend; the toy's analytic eps is computed on the CPU.
VARIANTS = {"cpu": ("sample", "hand_loop", "forward_only"),
            "cuda": ("sample", "sample_graph", "hand_loop", "forward_only")}


def _cases():
    for device, models in SAMPLE_MODELS.items():
        for model_name in models:
            for variant in VARIANTS[device]:
                yield pytest.param(device, model_name, variant, id=f"{device}-{model_name}-{variant}")


@pytest.mark.parametrize(("device", "model_name", "variant"), list(_cases()))
def test_sample_end_to_end(step_benchmark, device, model_name, variant):
    require_device(device)
    model = _model(model_name, device)
    batch, steps = SAMPLE_MODELS[device][model_name]
    labels = torch.arange(batch, device=device) % (model.null_label)
    shape = (batch,) + tuple(model.sample_shape)
    if variant in ("sample", "sample_graph"):
        graph = variant == "sample_graph"

        # clip=None: the hand loop does not clip (the U-Nets declare data_range, which sample clips to by default)
        def run():
            return cfgfast.sample(model, labels, W, steps, v=V, seed=SEED, clip=None, progress=False,
                                  cuda_graph=graph)
        label = SAMPLE_GRAPH_LABEL if graph else SAMPLE_LABEL
    elif variant == "hand_loop":
        generator = torch.Generator(device).manual_seed(SEED)

        @torch.no_grad()
        def run():
            return _hand_loop(model, labels, W, steps, V, generator)
        label = HAND_LOOP_LABEL
    else:
        @torch.no_grad()
        def run():
            return _forward_only(model, labels, steps)
        label = FORWARD_LABEL
    # the steps' bytes only (the model's are not counted): GB/s here say little, the time says it all
    step_benchmark(run, device=device, size=sample_size(device, model_name), label=label, shape=shape,
                   bytes_moved=steps * step_bytes(shape))
