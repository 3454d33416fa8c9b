"""The README's Python examples run as written (one namespace, in order, with fewer sampling steps), so the
docs cannot drift from the API; the one that needs downloaded weights is left out by name."""

from __future__ import annotations

import os
import re

import pytest
import torch

import cfgfast
from cfgfast.models import UNet

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def runnable_blocks() -> list[str]:
    blocks = python_blocks()
    downloads = [b for b in blocks if "from_pretrained" in b]
    assert len(downloads) == 1 and "DiTAdapter" in downloads[0]  # the DiT example: weights cannot be fetched here
    return [b for b in blocks if b not in downloads]


def own_loop_block(blocks: list[str]) -> str:
    loops = [b for b in blocks if "cfgfast.guided_step(" in b]
    assert len(loops) == 1, "expected one README example of a hand-written loop with guided_step"
    return loops[0]


def run_readme(monkeypatch) -> dict:
    """Every runnable example in order, in one namespace, with 16 sampling steps where the README says 256."""
    blocks = runnable_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    sample = UNet.sample
    monkeypatch.setattr(UNet, "sample", lambda self, *args, steps=16, **kwargs: sample(self, *args, steps=steps,
                                                                                        **kwargs))
    for block in blocks:
        # 16 steps instead of 256 (and model.sample's default): the same code, a sixteenth of the time
        exec(compile(block.replace("256", "16"), README, "exec"), namespace)
    return namespace


def assert_equal_to_float32_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    # the README's loop runs two passes of batch B, sample one of batch 2B: the model's rounding differs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_readme_examples_run(monkeypatch):
    namespace = run_readme(monkeypatch)
    x, z, labels, model = namespace["x"], namespace["z"], namespace["labels"], namespace["model"]
    # the headline call, without clip=: the bundled model's data range keeps the samples in [-1, 1]
    assert x.shape == z.shape == (len(labels), *model.sample_shape)
    assert bool(torch.isfinite(x).all()) and x.abs().max() <= 1
    # the own loop is sample() with the same sampler, steps and seed
    sampler, lams = namespace["sampler"], namespace["lams"]
    assert sampler in cfgfast.SAMPLERS and any(r[6] != 0 for r in namespace["table"].tolist())  # a multistep one
    want = cfgfast.sample(model, labels, w=3.0, steps=len(lams), sampler=sampler, seed=0)
    assert_equal_to_float32_rounding(z, want)


@pytest.mark.parametrize("sampler", [s for s in cfgfast.SAMPLERS if s != "dpmpp_2m"])
def test_the_readme_loop_is_sample_for_every_sampler(sampler):
    """The own-loop example with another sampler name (on the grid it builds) equals sample() on that grid."""
    blocks = runnable_blocks()
    namespace: dict = {}
    exec(compile(blocks[0].replace("256", "16"), README, "exec"), namespace)  # the model and the labels
    loop = own_loop_block(blocks)
    assert 'sampler = "dpmpp_2m"\n' in loop
    exec(compile(loop.replace('sampler = "dpmpp_2m"\n', f'sampler = "{sampler}"\n'), README, "exec"), namespace)
    model, labels, lams = namespace["model"], namespace["labels"], namespace["lams"]
    want = cfgfast.sample(model, labels, w=3.0, sampler=sampler, seed=0, lambdas=lams)
    assert_equal_to_float32_rounding(namespace["z"], want)
