"""Classifier guidance on the same fused step (SPEC §4 classifier=), and the paper's implicit-classifier
identity checked exactly: with exact scores, grad log p(c | z_lam) = -(eps*(z, c) - eps*(z)) / sigma, so
classifier guidance through the Bayes classifier and CFG through the exact eps give the same samples."""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.toy import three_classes


class ConditionalOnly:
    """The toy model, recording batch sizes and refusing the null label (no unconditional pass allowed)."""

    def __init__(self):
        self.model, self.batches = three_classes(), []
        self.sample_shape = self.model.sample_shape

    def __call__(self, z, lam, labels):
        assert bool((labels < 3).all()), "classifier guidance must not run an unconditional pass"
        self.batches.append(z.shape[0])
        return self.model(z, lam, labels)


@pytest.mark.parametrize("w", [0.5, 1.0, 4.0])
def test_classifier_guidance_through_the_bayes_classifier_equals_cfg(w):
    model = three_classes()
    labels = torch.arange(3000) % 3
    guided_by_classifier = cfgfast.sample(model, labels, w, steps=64, seed=3, classifier=model.log_posterior)
    guided_free = cfgfast.sample(model, labels, w, steps=64, seed=3)
    # float32 rounding: |x| <= 4, ulp 2.4e-7, a few ulps per step accumulated over 64 steps
    torch.testing.assert_close(guided_by_classifier, guided_free, rtol=0, atol=5e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_classifier_guidance_equals_cfg_for_every_prediction_type(prediction_type, sampler):
    """o_u := o_c + k sigma grad log p(c | z), k = 1/alpha for v and -sigma/alpha for x0 (SPEC §6): the identity
    holds in every parametrisation."""
    model = three_classes(prediction_type)
    labels = torch.arange(300) % 3
    by_classifier = cfgfast.sample(model, labels, 2.0, steps=24, sampler=sampler, seed=4,
                                   classifier=model.log_posterior)
    free = cfgfast.sample(model, labels, 2.0, steps=24, sampler=sampler, seed=4)
    torch.testing.assert_close(by_classifier, free, rtol=0, atol=2e-4)


def test_only_the_conditional_pass_runs():
    model = ConditionalOnly()
    cfgfast.sample(model, torch.tensor([0, 1, 2]), 2.0, steps=8, classifier=model.model.log_posterior)
    assert model.batches == [3] * 8


def test_classifier_guidance_separates_classes():
    model = ConditionalOnly()
    labels = torch.arange(1500) % 3
    gaps = []
    for w in (0.0, 3.0):
        x = cfgfast.sample(model, labels, w, steps=32, seed=1, classifier=model.model.log_posterior)
        gaps.append(torch.pdist(torch.stack([x[labels == k].mean(0) for k in range(3)])).min().item())
    assert gaps[1] > gaps[0] + 0.5


@pytest.mark.parametrize(
    "classifier,w,exc,message",
    [
        (lambda z, lam: torch.zeros(z.shape[0]), 1.0, ValueError, r"classifier must return logits of shape \[2, "),
        (lambda z, lam: torch.full((z.shape[0], 3), float("nan")) + z.sum(), 1.0, ValueError,
         "non-finite logits at step 0"),
        (lambda z, lam: torch.zeros(z.shape[0], 1) + z.sum(), 1.0, ValueError, r"labels must lie in \[0, 1\)"),
        ("not callable", 1.0, TypeError, "classifier must be callable"),
        (three_classes().log_posterior, -1.0, ValueError, "w must be >= 0 with a classifier"),
        (lambda z, lam: torch.zeros(z.shape[0], 3), 1.0, ValueError, "logits do not depend on z"),
    ],
)
def test_bad_classifier_input(classifier, w, exc, message):
    with pytest.raises(exc, match=message):
        cfgfast.sample(three_classes(), torch.tensor([0, 2]), w, steps=4, classifier=classifier)


def test_bfloat16_model_with_classifier():
    model = three_classes()

    def bf16_model(z, lam, labels):
        return model(z, lam, labels).to(torch.bfloat16)

    labels = torch.arange(300) % 3
    x = cfgfast.sample(bf16_model, labels, 2.0, steps=64, shape=(2,), classifier=model.log_posterior)
    reference = cfgfast.sample(model, labels, 2.0, steps=64, classifier=model.log_posterior)
    assert x.dtype == torch.float32
    # as for classifier-free guidance with a bfloat16 model (test_sampler): eps rounded to 8 bits a step
    assert (x - reference).abs().median() < 0.05 and (x - reference).abs().max() < 1.0


def test_labels_beyond_the_classifier_are_refused_before_sampling_even_at_w_0():
    model = ConditionalOnly()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        cfgfast.sample(model, torch.tensor([0, 7]), 0.0, steps=4, classifier=model.model.log_posterior)
    assert model.batches == []


def test_labels_beyond_the_model_are_refused_with_a_classifier():
    # a classifier of 20 classes, the bundled U-Net with label rows 0..10 (its null label 10): label 15 would index
    # past the model's embedding (an IndexError on the CPU, a device-side assert on a GPU)
    model = cfgfast.load_pretrained("digits")

    def classifier(z, lam):
        return z.reshape(z.shape[0], -1)[:, :20]

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\] \(the model's label rows\), got values up to 15"):
        cfgfast.sample(model, torch.tensor([0, 15]), 1.0, steps=4, classifier=classifier)
    # a model that names a null label but no label rows may be unconditional: it ignores the labels
    toy = three_classes()

    def unconditional(z, lam, labels):
        return toy(z, lam, torch.full_like(labels, toy.null_label))

    unconditional.null_label = 0
    x = cfgfast.sample(unconditional, torch.tensor([0, 2]), 1.0, steps=4, shape=(2,), classifier=toy.log_posterior)
    assert torch.isfinite(x).all()


def test_classifier_guidance_under_inference_mode():
    model = three_classes()
    with torch.inference_mode():
        x = cfgfast.sample(model, torch.tensor([0, 1]), 2.0, steps=8, classifier=model.log_posterior)
    y = cfgfast.sample(model, torch.tensor([0, 1]), 2.0, steps=8, classifier=model.log_posterior)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
