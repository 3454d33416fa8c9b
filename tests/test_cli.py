"""The command line, and an end-to-end check of schedule + noise + step: with exact noise predictions
and w = 0, guided sampling must reproduce the data distribution."""

from __future__ import annotations

import json

import pytest
import torch

import cfgfast
from cfgfast.__main__ import TWO_CLASS_SPREAD, main, two_class_samples


def class_stats(z, labels):
    gap = (z[labels == 1, 0].mean() - z[labels == 0, 0].mean()).item()
    within = torch.cat([z[labels == k] - z[labels == k].mean(0) for k in (0, 1)]).std().item()
    return gap, within


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in cfgfast.available_backends()])
def test_unguided_sampling_reproduces_the_data(backend):
    z, labels = two_class_samples(0.0, num=4000, steps=128, backend=backend)
    gap, within = class_stats(z, labels)
    # 4000 samples: the standard error of the gap is about 0.02 and of the spread about 0.005
    assert gap == pytest.approx(2.0, abs=0.08)
    assert within == pytest.approx(TWO_CLASS_SPREAD, abs=0.02)


def test_guidance_pushes_classes_apart():
    gaps = [class_stats(*two_class_samples(w, num=2000, steps=64))[0] for w in (0.0, 1.0, 4.0)]
    assert gaps[0] < gaps[1] < gaps[2]


def test_backends_give_the_same_samples():
    if "cpu" not in cfgfast.available_backends():
        pytest.skip("cpu backend unavailable")
    a, _ = two_class_samples(2.0, num=500, steps=32, backend="cpu")
    b, _ = two_class_samples(2.0, num=500, steps=32, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_info_prints_build_facts(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == cfgfast.__version__ and "reference" in info["available_backends"]


def test_step_demo_runs(capsys):
    assert main(["step-demo", "--num", "200", "--steps", "16", "--w", "0", "2"]) == 0
    assert "class gap" in capsys.readouterr().out


def test_bad_arguments_give_a_clear_error(capsys):
    assert main(["step-demo", "--num", "10", "--steps", "1"]) == 2
    assert "steps must be at least 2" in capsys.readouterr().err
