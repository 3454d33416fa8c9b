"""The README's DiT + VAE example on a tiny random DiTTransformer2DModel and AutoencoderKL built from configs
(nothing is downloaded): written out as the README reads, and the README's own block run with from_pretrained
answered by those tiny models."""

from __future__ import annotations

import os
import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cfgfast  # noqa: E402
from cfgfast.adapters import DiTAdapter  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# DiT-XL-2-256's scheduler config, as its conversion to diffusers wrote it
DIT_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                 "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": False, "prediction_type": "epsilon"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_dit(*args, **kwargs):
    """DiT-XL/2's shape of model, shrunk: 1000 ImageNet classes and the null row, learned sigma, 4x8x8 latents."""
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


def tiny_vae(*args, **kwargs):
    """An AutoencoderKL of 4 latent channels and one downsampling: 4x8x8 latents are 3x16x16 images."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)


def test_dit_vae_example():
    transformer = tiny_dit().eval()  # README: DiTTransformer2DModel.from_pretrained(repo, subfolder="transformer")
    vae = tiny_vae().eval()  # README: AutoencoderKL.from_pretrained(repo, subfolder="vae")
    labels = torch.tensor([207, 360, 387, 974])  # ImageNet classes

    # DDPM with DiT's learned sigma (v=None: the model's variance), on DDPMScheduler's grid
    model = DiTAdapter(transformer, diffusers.DDPMScheduler.from_config(DIT_SCHEDULER))
    assert model.learned_variance and model.prediction_type == "epsilon" and model.data_range is None
    latents = cfgfast.sample(model, labels, w=3.0, lambdas=model.model_lambdas(25), seed=0)

    # DPM-Solver++(2M) on DPMSolverMultistepScheduler's grid
    fast = DiTAdapter(transformer, diffusers.DPMSolverMultistepScheduler.from_config(DIT_SCHEDULER))
    fast_latents = cfgfast.sample(fast, labels, w=3.0, sampler="dpmpp_2m", lambdas=fast.model_lambdas(10), seed=0)

    for z in (latents, fast_latents):
        assert z.shape == (4, 4, 8, 8) and bool(torch.isfinite(z).all())
        with torch.no_grad():
            images = vae.decode(z / vae.config.scaling_factor).sample  # in [-1, 1] for a trained VAE
        images = (images / 2 + 0.5).clamp(0, 1)
        assert images.shape == (4, 3, 16, 16) and bool(torch.isfinite(images).all())


def test_the_readme_dit_block_runs(monkeypatch):
    with open(README, encoding="utf-8") as f:
        blocks = [b for b in re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M) if "DiTAdapter" in b]
    assert len(blocks) == 1, "the README has one DiT example"
    monkeypatch.setattr(diffusers.DiTTransformer2DModel, "from_pretrained", classmethod(tiny_dit))
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", classmethod(tiny_vae))
    for name in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"):
        cls = getattr(diffusers, name)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda cls, *a, **k: cls.from_config(DIT_SCHEDULER)))
    namespace: dict = {}
    # on the CPU, with a tenth of the steps: the same code
    code = re.sub(r"model_lambdas\((\d+)\)", lambda m: f"model_lambdas({max(2, int(m[1]) // 10)})",
                  blocks[0].replace('"cuda"', '"cpu"'))
    exec(compile(code, README, "exec"), namespace)
    latents, images = namespace["latents"], namespace["images"]
    assert latents.shape == (4, 4, 8, 8) and bool(torch.isfinite(latents).all())
    assert images.shape == (4, 3, 16, 16) and bool(((images >= 0) & (images <= 1)).all())
