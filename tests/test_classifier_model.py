"""The small CNN classifier: shapes, the noise-conditional protocol of cfgfast.sample(classifier=...), checkpoints
and `cfgfast train-classifier`, bad input."""

from __future__ import annotations

import pytest
import torch

import cfgfast
from cfgfast.cli import main
from cfgfast.models import checkpoint
from cfgfast.models.classifier import Classifier, ClassifierConfig, heldout_split, load_classifier, save_classifier
from cfgfast.models.unet import ResBlock, UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=8, in_channels=1, num_classes=10, base_channels=8, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(), num_heads=1, groups=4)).eval()


def tiny_classifier(noise_conditional: bool = True) -> Classifier:
    torch.manual_seed(1)
    clf = Classifier(ClassifierConfig(width=8, groups=4, noise_conditional=noise_conditional)).eval()
    for block in clf.blocks:  # ResBlocks start as identity (zero last conv), where λ has no effect yet
        if isinstance(block, ResBlock):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    return clf


@pytest.mark.parametrize("noise_conditional", [True, False])
def test_shapes(noise_conditional):
    clf = tiny_classifier(noise_conditional)
    x = torch.randn(5, 1, 8, 8)
    lam = torch.linspace(-5, 5, 5) if noise_conditional else None
    assert clf(x, lam).shape == (5, 10)
    assert clf.features(x, lam).shape == (5, clf.feature_dim) == (5, 16)  # width 8 x channel_mult 2


def test_lambda_changes_the_logits_and_a_number_broadcasts():
    clf = tiny_classifier()
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(clf(x, torch.full((3,), -5.0)), clf(x, torch.full((3,), 5.0)))
    torch.testing.assert_close(clf(x, 2.0), clf(x, torch.full((3,), 2.0)))


def test_noise_conditional_classifier_guides_cfgfast_sample():
    model, clf = tiny_unet(), tiny_classifier()
    labels = torch.arange(6) % 10
    unguided = cfgfast.sample(model, labels, 0.0, steps=6, seed=2, clip=1.0, classifier=clf)
    guided = cfgfast.sample(model, labels, 3.0, steps=6, seed=2, clip=1.0, classifier=clf)
    assert guided.shape == (6, 1, 8, 8) and torch.isfinite(guided).all()
    # w = 0 is the unguided sampler (same seed, same noise); w = 3 moves the samples
    torch.testing.assert_close(unguided, cfgfast.sample(model, labels, 0.0, steps=6, seed=2, clip=1.0))
    assert (guided - unguided).abs().max() > 1e-3


def test_checkpoint_round_trip(tmp_path):
    clf = tiny_classifier()
    path = str(tmp_path / "clf.pt")
    save_classifier(path, clf, dataset="digits")
    loaded = load_classifier(path)
    x, lam = torch.randn(4, 1, 8, 8), torch.zeros(4)
    torch.testing.assert_close(loaded(x, lam), clf(x, lam))
    assert checkpoint.read(path, kind="cfgfast-classifier")["dataset"] == "digits"
    with pytest.raises(ValueError, match="not a cfgfast-unet checkpoint"):
        checkpoint.read(path)  # a classifier is not a model


def test_train_classifier_command_writes_a_small_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "clf.pt"
    assert main(["train-classifier", "--dataset", "digits", "--out", str(out), "--steps", "3", "--width", "8",
                 "--batch-size", "16"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    clf = load_classifier(str(out))
    assert clf.config.noise_conditional and clf.config.width == 8
    assert set(checkpoint.read(str(out), kind="cfgfast-classifier")["heldout_accuracy"]) >= {"0", "20"}
    assert [p.name for p in tmp_path.iterdir()] == ["clf.pt"]  # no temporary file left
    before = out.read_bytes()
    assert main(["train-classifier", "--dataset", "digits", "--out", str(out), "--steps", "1"]) == 2
    assert f"--out {out} exists: add --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("argv, message", [(["--lr", "0"], "--lr must be positive, got 0.0"),
                                           (["--lr", "-1"], "--lr must be positive, got -1.0"),
                                           (["--lr", "nan"], "--lr must be finite"),
                                           (["--seed", "-1"], "--seed must be at least 0"),
                                           (["--seed", str(2**64)], "--seed must be at least 0, below 2^64"),
                                           (["--width", "4"], "--width must be a multiple of 8 (the group norm's "
                                                              "groups), got 4"),
                                           (["--batch-size", str(2**64)], "--batch-size must be at least 1, below "
                                                                          "2147483648")])
def test_train_classifier_command_refuses_bad_settings(tmp_path, capsys, argv, message):
    out = tmp_path / "clf.pt"
    assert main(["train-classifier", "--dataset", "digits", "--out", str(out), "--steps", "1"] + argv) == 2
    assert f"cfgfast: error: {message.replace('2^64', str(2**64))}" in capsys.readouterr().err
    assert not out.exists()


def test_heldout_split_is_class_balanced_and_seeded():
    labels = torch.arange(50) % 5
    train, heldout = heldout_split(labels, 0.2, seed=3)
    assert torch.bincount(labels[heldout]).tolist() == [2] * 5
    assert sorted(torch.cat([train, heldout]).tolist()) == list(range(50))
    assert torch.equal(heldout, heldout_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(heldout, heldout_split(labels, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="class 0 must keep images to train on after holding out 10, got only 10"):
        heldout_split(labels, per_class=10)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\), got 1.0"):
        heldout_split(labels, 1.0)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda c, x: c(x), ValueError, r"lam is required: this classifier is noise-conditional"),
        (lambda c, x: c(x[:, :, :4], torch.zeros(2)), ValueError,
         r"z must have shape \[B, 1, 8, 8\], got \[2, 1, 4, 8\]"),
        (lambda c, x: c(x, torch.zeros(3)), ValueError, r"lam must be a number or a tensor of shape \[2\], got \[3\]"),
        (lambda c, x: tiny_classifier(False)(x, torch.zeros(2)), ValueError, "lam must be None"),
    ],
)
def test_bad_calls(call, exc, message):
    with pytest.raises(exc, match=message):
        call(tiny_classifier(), torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"width": 6, "groups": 4}, r"width 6 \(width x 1\) must be a multiple of groups \(4\)"),
        ({"noise_conditional": 1}, "noise_conditional must be a bool, got 1"),
        ({"image_size": 7, "channel_mult": (1, 2)}, "image_size 7 cannot be halved 1 times"),
        ({"num_classes": 0}, "num_classes must be a positive int, got 0"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**overrides)


def test_bad_checkpoints(tmp_path):
    unet = tmp_path / "unet.pt"
    checkpoint.save(str(unet), {"config": {}, "ema": {}})
    with pytest.raises(ValueError, match="not a cfgfast-classifier checkpoint"):
        load_classifier(str(unet))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier(str(corrupt))
    with pytest.raises(ValueError, match="no such file"):
        load_classifier(str(tmp_path / "missing.pt"))
