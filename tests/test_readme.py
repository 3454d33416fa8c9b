"""The README's Python examples run as written (one namespace, in order, with fewer sampling steps), so the
docs cannot drift from the API; the one that needs downloaded weights is left out by name."""

from __future__ import annotations

import os
import re

import torch

import cfgfast
from cfgfast.models import UNet

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_examples_run(monkeypatch):
    blocks = python_blocks()
    downloads = [b for b in blocks if "from_pretrained" in b]
    assert len(downloads) == 1 and "DiTAdapter" in downloads[0]  # the DiT example: weights cannot be fetched here
    runnable = [b for b in blocks if b not in downloads]
    assert len(runnable) >= 3
    namespace: dict = {}
    sample = UNet.sample
    monkeypatch.setattr(UNet, "sample", lambda self, *args, steps=16, **kwargs: sample(self, *args, steps=steps,
                                                                                        **kwargs))
    for block in runnable:
        # 16 steps instead of 256 (and model.sample's default): the same code, a sixteenth of the time
        exec(compile(block.replace("256", "16"), README, "exec"), namespace)
    # the "Using it" sample, the hand-written loop with reverse_step, and model.sample
    x, z, labels, model = namespace["x"], namespace["z"], namespace["labels"], namespace["model"]
    assert x.shape == z.shape == (len(labels), *model.sample_shape)
    assert bool(torch.isfinite(z).all()) and x.abs().max() <= 1
    # the hand loop is Algorithm 2 as sample runs it (two passes of batch B there, one of 2B here: rounding apart)
    want = cfgfast.sample(model, labels, w=3.0, steps=16)
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
