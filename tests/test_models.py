"""The U-Net, training (Algorithm 1), checkpoints, datasets and the bundled model."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib

import numpy as np
import pytest
import torch

import cfgfast
from cfgfast.cli import main
from cfgfast.data import image_folder, load_dataset, npz_file, to_uint8, to_unit_range
from cfgfast.models import PRESETS, UNet, UNetConfig, checkpoint
from cfgfast.models.unet import lambda_features
from cfgfast.training import TrainConfig, diffusion_loss, train
from cfgfast._images import read_image, save_png

TINY = UNetConfig(image_size=8, in_channels=1, num_classes=3, base_channels=8, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), num_heads=2, groups=4)


def tiny_data(n=24, classes=3, size=8, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, channels, size, size, generator=g) * 2 - 1)
    return cfgfast.data.Dataset(images, torch.arange(n) % classes, classes, [str(k) for k in range(classes)], "tiny")


def test_unet_shapes_and_protocol():
    torch.manual_seed(0)
    model = UNet(TINY)
    assert model.null_label == 3 and model.sample_shape == (1, 8, 8)
    z = torch.randn(5, 1, 8, 8)
    eps = model(z, torch.linspace(-20, 20, 5), torch.tensor([0, 1, 2, 3, 0]))
    assert eps.shape == z.shape
    # zero-initialised output layer: an untrained model predicts eps = 0 exactly
    assert torch.equal(eps, torch.zeros_like(eps))


def test_unet_depends_on_lambda_and_label():
    torch.manual_seed(0)
    model = UNet(TINY)
    for p in model.parameters():  # leave the zero init so the output depends on its inputs
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(1, 1, 8, 8).repeat(3, 1, 1, 1)
    eps = model(z, torch.tensor([-3.0, 3.0, 3.0]), torch.tensor([0, 0, 3]))
    assert not torch.allclose(eps[0], eps[1]) and not torch.allclose(eps[1], eps[2])


def test_lambda_features_span():
    feats = lambda_features(torch.tensor([-20.0, 0.0, 20.0]), 16)
    assert feats.shape == (3, 32)
    assert torch.allclose(feats[1], torch.cat([torch.zeros(16), torch.ones(16)]))
    # the slowest frequency has one period over [-20, 20]: sin at -20 and +20 agree, cos = -1 at the ends
    assert torch.allclose(feats[0, 16], torch.tensor(-1.0), atol=1e-5)


def test_presets_build():
    assert UNet(PRESETS["digits"]).sample_shape == (1, 8, 8)
    big = PRESETS["imagenet64"]
    assert (big.image_size, big.in_channels, big.num_classes) == (64, 3, 1000)


@pytest.mark.parametrize("change, message", [
    (dict(image_size=6, channel_mult=(1, 2, 2)), "cannot be halved"),
    (dict(base_channels=10), "multiple of groups"),
    (dict(num_classes=0), "num_classes"),
    (dict(dropout=1.0), "dropout"),
])
def test_unet_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_unet_wrong_input_shape():
    with pytest.raises(ValueError, match="z must have shape"):
        UNet(TINY)(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("args, error, message", [
    # a lam or labels of another length was broadcast over the batch, silently
    ((torch.zeros(1), torch.tensor([0, 1])), ValueError, r"lam must be a tensor of shape \[2\] on cpu, got \[1\]"),
    ((torch.zeros(2), torch.tensor([0])), ValueError, r"labels must be a tensor of shape \[2\] on cpu, got \[1\]"),
    ((torch.tensor(0.0), torch.tensor([0, 1])), ValueError, r"lam must be a tensor of shape \[2\]"),
    ((torch.zeros(2), torch.zeros(2)), TypeError, "labels must be an integer tensor, got torch.float32"),
    ((torch.zeros(2), torch.tensor([0, 1], device="meta")), ValueError, "labels must be a tensor of shape .* on cpu"),
])
def test_unet_checks_lam_and_labels(args, error, message):
    with pytest.raises(error, match=message):
        UNet(TINY)(torch.zeros(2, 1, 8, 8), *args)
    with pytest.raises(TypeError, match="z must be a floating-point tensor, got torch.int64"):
        UNet(TINY)(torch.zeros(2, 1, 8, 8, dtype=torch.int64), torch.zeros(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_unet_in_another_precision_samples(dtype, atol):
    """.half(), .to(bfloat16) and .double() failed inside the first layer (float32 lambda features)."""
    model = cfgfast.load_pretrained("digits")
    expected = model.sample(torch.arange(4), 1.0, steps=8)
    got = cfgfast.load_pretrained("digits").to(dtype).sample(torch.arange(4), 1.0, steps=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)  # measured: 2e-6, 2e-3, 4e-2


def test_unet_config_overrides_and_wrong_config():
    assert UNet(TINY, image_size=16).sample_shape == (1, 16, 16)  # the keyword was ignored beside a config
    assert TINY.image_size == 8
    with pytest.raises(TypeError, match="config must be a UNetConfig, got dict"):
        UNet({"image_size": 8})
    assert type(UNetConfig(image_size=np.int64(8)).image_size) is int
    with pytest.raises(TypeError, match="UNetConfig.dropout must be a real number, got str"):
        UNetConfig(dropout="0.1")


def test_sampling_refuses_a_model_in_training_mode_with_dropout():
    """Dropout in training mode drew from torch's generator: the same seed gave other samples."""
    model = UNet(dataclasses.replace(TINY, dropout=0.1))  # a fresh module is in training mode
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():  # (the zero-initialised output layer would make eps 0 whatever dropout does)
        p.data = torch.randn(p.shape, generator=generator) * 0.2
    z, lam, labels = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 1])
    assert not torch.equal(model(z, lam, labels), model(z, lam, labels))  # what the refusal is about
    with pytest.raises(ValueError, match=r"model is in training mode, where its .*\(Dropout\) makes the samples "
                                         r"depend on more than the seed: call model.eval\(\) first"):
        cfgfast.sample(model, torch.tensor([0, 1]), 1.0, 4)
    a = cfgfast.sample(model.eval(), torch.tensor([0, 1]), 1.0, 4, clip=1.0)
    assert torch.equal(a, cfgfast.sample(model, torch.tensor([0, 1]), 1.0, 4, clip=1.0))
    cfgfast.sample(UNet(TINY), torch.tensor([0, 1]), 1.0, 4)  # no dropout: training mode changes nothing


def test_model_sample_hands_loop_to_cfgfast_sample():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    labels = torch.tensor([0, 1, 2, 0])
    a = model.sample(labels, 2.0, steps=4, seed=3, backend="reference")
    b = cfgfast.sample(model, labels, 2.0, 4, seed=3, backend="reference", clip=1.0)  # images: x~ clipped to [-1, 1]
    assert torch.equal(a, b)
    assert torch.equal(a, cfgfast.sample(model, labels, 2.0, 4, seed=3, backend="reference"))  # data_range 1
    c = model.sample(labels, 2.0, steps=4, seed=3, backend="reference", clip=None)
    assert torch.equal(c, cfgfast.sample(model, labels, 2.0, 4, seed=3, backend="reference", clip=None))
    assert not torch.equal(a, c)


def test_diffuse_is_the_forward_process():
    """z = alpha x + sigma eps per sample, against alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam) in float64."""
    lam = torch.tensor([-20.0, -3.0, 0.0, 1.5, 20.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    z = cfgfast.schedule.diffuse(x, lam, eps)
    for i, value in enumerate(lam.tolist()):
        alpha, sigma = math.sqrt(1 / (1 + math.exp(-value))), math.sqrt(1 / (1 + math.exp(value)))
        expected = alpha * x[i].double() + sigma * eps[i].double()
        assert z.dtype == torch.float32
        # float32: a few ulps of the larger term, where the two terms nearly cancel
        torch.testing.assert_close(z[i].double(), expected, rtol=4e-7, atol=1e-6)


def test_diffusion_loss_is_algorithm_1():
    """Algorithm 1: an oracle that recovers eps from the (z, lam) it is given, eps = (z - alpha x) / sigma with the
    test's own float64 alpha and sigma, has (almost) zero loss, so z was noised at the lam the model sees; those
    lam follow the truncated hyperbolic secant of SPEC §1 (its CDF, written out here); the dropped labels are the
    null label with the requested frequency."""
    n = 4096
    x = torch.rand(n, 1, 2, 2) * 2 - 1
    labels = torch.zeros(n, dtype=torch.int64)
    seen = {}

    def oracle(z, lam, labels):
        seen.update(lam=lam.double(), labels=labels.clone())
        lam = lam.double().view(-1, 1, 1, 1)
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return ((z.double() - alpha * x.double()) / sigma).float()

    config = TrainConfig(p_uncond=0.25)
    loss = diffusion_loss(oracle, x, labels, 7, config, torch.Generator().manual_seed(0)).item()
    # not exactly 0: z is float32 and the model sees lam in float32; 1 / sigma amplifies both at lam near 20
    assert loss < 1e-4, loss
    lam = seen["lam"]
    assert lam.min() >= config.lambda_min and lam.max() <= config.lambda_max
    b = math.atan(math.exp(-config.lambda_max / 2))
    a = math.atan(math.exp(-config.lambda_min / 2)) - b
    for t in (-10.0, -2.0, 0.0, 1.0, 5.0):  # P(lam <= t) = (a + b - atan(e^(-t / 2))) / a
        expected = (a + b - math.atan(math.exp(-t / 2))) / a
        assert abs((lam <= t).double().mean().item() - expected) < 0.03, (t, expected)
    dropped = (seen["labels"] == 7).double().mean().item()
    assert abs(dropped - 0.25) < 0.03 and set(seen["labels"].tolist()) <= {0, 7}


def test_training_lowers_the_loss(tmp_path):
    """A short run learns: the loss on fixed batches falls well below the initial network's, and the returned
    (EMA) weights moved."""
    data = tiny_data(n=48)
    config = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=1, ema_decay=0.0, checkpoint_every=1000)

    def loss_of(model):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return sum(diffusion_loss(model, data.images, data.labels, 3, config, g).item() for _ in range(8)) / 8

    torch.manual_seed(config.seed)
    initial = UNet(TINY)  # the weights train() starts from
    trained = train(TINY, data, str(tmp_path / "a.pt"), config, progress=False, log=lambda *a: None)
    assert any(not torch.equal(p, q) for p, q in zip(initial.state_dict().values(), trained.state_dict().values()))
    before, after = loss_of(initial), loss_of(trained)
    assert after < 0.7 * before, (before, after)  # measured: 0.99 -> 0.41


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_train_writes_checkpoint_and_resumes_exactly(tmp_path, dropout):
    """With dropout too: its masks are drawn from torch's global RNG, whose state the checkpoint keeps; and the
    caller's global RNG is left as it was."""
    data = tiny_data()
    model_config = dataclasses.replace(TINY, dropout=dropout)
    config = TrainConfig(steps=6, batch_size=8, checkpoint_every=3, warmup=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    logged = {"straight": [], "resumed": []}
    straight = train(model_config, data, str(tmp_path / "a.pt"), config, progress=False,
                     log=logged["straight"].append)
    assert torch.equal(torch.get_rng_state(), before)
    # interrupted after the checkpoint at step 3, then resumed (after other draws): the same EMA weights, bit for bit
    train(model_config, data, str(tmp_path / "b.pt"), dataclasses.replace(config, steps=3), progress=False,
          log=lambda *a: None)
    torch.rand(100)
    resumed = train(model_config, data, str(tmp_path / "b.pt"), config, resume=True, progress=False,
                    log=logged["resumed"].append)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    # the logged loss (a moving average) goes on as without the interruption (it restarted from one batch's loss)
    losses = {run: [line.split(" (")[0] for line in lines if line.startswith("step ")] for run, lines in logged.items()}
    assert losses["resumed"] == losses["straight"][3:] and len(losses["resumed"]) == 3
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ckpt["step"] == 6 and {"model", "ema", "optimizer", "config", "rng"} <= set(ckpt)
    loaded = checkpoint.load_model(str(tmp_path / "a.pt"))
    for p, q in zip(straight.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(p, q)
    if dropout:  # the masks matter: another run of dropout draws gives other weights
        torch.save({**torch.load(tmp_path / "b.pt", weights_only=True), "torch_rng": torch.get_rng_state()},
                   tmp_path / "c.pt")
        (tmp_path / "c.pt").replace(tmp_path / "b.pt")
        train(model_config, data, str(tmp_path / "b.pt"), dataclasses.replace(config, steps=9), resume=True,
              progress=False, log=lambda *a: None)
        train(model_config, data, str(tmp_path / "a.pt"), dataclasses.replace(config, steps=9), resume=True,
              progress=False, log=lambda *a: None)
        a, b = (checkpoint.load_model(str(tmp_path / f)) for f in ("a.pt", "b.pt"))
        assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_refuses_other_settings(tmp_path):
    data = tiny_data()
    config = TrainConfig(steps=2, batch_size=4)
    train(TINY, data, str(tmp_path / "a.pt"), config, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"other settings \(lr 0.001 there, 0.0003 now; seed 0 there, 5 now\); resume "
                                         "with the same settings"):  # only what differs, named
        train(TINY, data, str(tmp_path / "a.pt"), dataclasses.replace(config, lr=3e-4, seed=5, steps=9), resume=True,
              progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"another model config \(base_channels 8 there, 16 now\); resume with the "
                                         "same --preset"):  # the field that differs, not both configs
        train(dataclasses.replace(TINY, base_channels=16), data, str(tmp_path / "a.pt"), config, resume=True,
              progress=False, log=lambda *a: None)
    # other data of the same shape and classes: by name, and under the same name by its images or labels
    other = tiny_data(seed=1)
    with pytest.raises(ValueError, match=r"trained on other data: dataset 'tiny' there, 'tiny' now \(the same name, "
                                         r"other images or labels\); resume with the same --dataset"):
        train(TINY, other, str(tmp_path / "a.pt"), config, resume=True, progress=False, log=lambda *a: None)
    relabelled = dataclasses.replace(data, labels=data.labels.roll(1), name="renamed")
    with pytest.raises(ValueError, match=r"dataset 'tiny' there, 'renamed' now; resume"):
        train(TINY, relabelled, str(tmp_path / "a.pt"), config, resume=True, progress=False, log=lambda *a: None)
    # the same data under another name (a moved file) resumes, and checkpoints may come at other intervals
    train(TINY, dataclasses.replace(data, name="moved"), str(tmp_path / "a.pt"),
          dataclasses.replace(config, steps=3, checkpoint_every=7), resume=True, progress=False, log=lambda *a: None)


def test_train_refuses_mismatched_data_and_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        train(TINY, tiny_data(size=4), str(tmp_path / "a.pt"), TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        train(TINY, tiny_data(classes=4), str(tmp_path / "a.pt"), TrainConfig(steps=1), progress=False)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="p_uncond"):
            TrainConfig(p_uncond=p)
    with pytest.raises(ValueError, match="out: folder .* does not exist"):  # before training, not at the first save
        train(TINY, tiny_data(), str(tmp_path / "missing" / "a.pt"), TrainConfig(steps=1), progress=False)


@pytest.mark.parametrize("change, error, message", [
    (dict(grad_clip=-1.0), ValueError, "grad_clip must be positive"),  # would flip the gradient's sign
    (dict(grad_clip=float("nan")), ValueError, r"grad_clip must be positive \(inf for no clipping\), got nan"),
    (dict(grad_clip="1"), TypeError, "grad_clip must be a real number"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(steps=True), TypeError, "steps must be an int"),
    (dict(batch_size=0), ValueError, "batch_size must be at least 1"),
    (dict(warmup=-5), ValueError, "warmup must be at least 0"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(seed=2**64), ValueError, "seed must be at least 0, below"),
    (dict(lr="x"), TypeError, "lr must be a real number"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be at least 0"),
    (dict(lambda_min=5.0, lambda_max=5.0), ValueError, "lambda_min must be below lambda_max"),
])
def test_train_config_checks_its_fields(change, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**change)


def test_train_config_takes_what_torch_takes(tmp_path):
    config = TrainConfig(grad_clip=math.inf, lr=1, seed=np.int64(3), steps=np.int32(2), batch_size=np.int64(4),
                         p_uncond=np.float32(0.25), weight_decay=torch.tensor(0.0))  # inf: clipping off
    # kept as Python numbers: training takes them and the checkpoint loads safely
    assert [type(v) for v in dataclasses.astuple(config)] == [type(v) for v in dataclasses.astuple(TrainConfig())]
    train(TINY, tiny_data(), str(tmp_path / "a.pt"), dataclasses.replace(config, lr=1e-3), progress=False,
          log=lambda *a: None)
    assert checkpoint.load_model(str(tmp_path / "a.pt")).config == TINY


def test_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_model(str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cfgfast-unet checkpoint"):
        checkpoint.load_model(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="no such file"):
        checkpoint.load_model(str(tmp_path / "missing.pt"))
    # a truncated real checkpoint
    checkpoint.save(str(tmp_path / "ok.pt"), {"config": TINY.to_dict(), "ema": UNet(TINY).state_dict()})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_model(str(tmp_path / "cut.pt"))
    # an empty file, and text that the legacy (non-zip) unpickler reads as a KeyError
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"junk\n")
    (tmp_path / "random.pt").write_bytes(bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).tolist()))
    for name in ("empty.pt", "text.pt", "random.pt"):
        with pytest.raises(ValueError, match=r"corrupt or not a torch file \(\w+ while reading it\); was it written by "
                                             "cfgfast") as error:
            checkpoint.load_model(str(tmp_path / name))
        assert "weights_only" not in str(error.value)  # not torch's advice to load it unsafely
    # a whole pickled module: what a safe load refuses, named
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module.pt is corrupt or not a torch file \(it holds a "
                                         r"torch.nn.modules.linear.Linear object, which a safe load refuses\)"):
        checkpoint.load_model(str(tmp_path / "module.pt"))
    # checkpoints that load but do not make a network: each named, before any large allocation
    good = {"config": TINY.to_dict(), "ema": UNet(TINY).state_dict()}
    huge = dataclasses.replace(TINY, base_channels=40000, groups=40000, num_heads=40000).to_dict()  # ~10^11 weights
    state = dict(good["ema"])
    first = next(iter(state))
    for name, payload, message in (
            ("negative.pt", {**good, "config": {**good["config"], "base_channels": -4}},
             "bad model config in checkpoint: UNetConfig.base_channels must be a positive int, got -4"),
            ("list.pt", {**good, "ema": [1, 2]}, r"the 'ema' weights must be a dict of tensors, got list"),
            ("huge.pt", {**good, "config": huge}, rf"weights do not fit the config: {re.escape(first)} is "),
            ("fewer.pt", {**good, "ema": {k: v for k, v in state.items() if k != first}},
             rf"weights do not fit the config: {re.escape(first)} is missing from the weights \(1 such\)"),
            ("extra.pt", {**good, "ema": {**state, "extra": torch.zeros(1)}}, r"weights do not fit the config: extra is not in the network \(1 such\)"),
            ("shape.pt", {**good, "ema": {**state, first: state[first][:1]}},
             rf"weights do not fit the config: {re.escape(first)} is \(1, .*\) there, \(.*\) in the config's network")):
        checkpoint.save(str(tmp_path / name), payload)
        with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / name))}: {message}"):
            checkpoint.load_model(str(tmp_path / name))
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(ValueError, match="folder.pt: a folder, not a file"):
        checkpoint.load_model(str(tmp_path / "folder.pt"))
    with pytest.raises(ValueError, match="name must be one of"):
        cfgfast.load_pretrained("imagenet")
    with pytest.raises(TypeError, match="name must be a str"):
        cfgfast.load_pretrained(["digits"])


def test_digits_dataset():
    pytest.importorskip("sklearn")
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.equal(torch.bincount(data.labels) > 170, torch.ones(10, dtype=torch.bool))


def test_image_folder_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    for i, name in enumerate(["cat", "cat", "dog", "dog"]):
        (tmp_path / "folder" / name).mkdir(parents=True, exist_ok=True)
        save_png(str(tmp_path / "folder" / name / f"{i}.png"), pictures[i])
    data = load_dataset(str(tmp_path / "folder"))
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(to_uint8(data.images), pictures)
    np.savez(tmp_path / "d.npz", arr_0=pictures, arr_1=np.array([1, 0, 1, 2]))
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.num_classes == 3 and np.array_equal(to_uint8(data.images), pictures)


def test_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        image_folder(str(tmp_path / "empty"))
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    save_png(str(tmp_path / "mixed" / "a" / "1.png"), np.zeros((4, 4, 3), np.uint8))
    save_png(str(tmp_path / "mixed" / "a" / "2.png"), np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="mixed sizes"):
        image_folder(str(tmp_path / "mixed"))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32), arr_1=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        npz_file(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(bytes(range(256)) * 12)  # not a zip: numpy would take it for a pickle
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 1), np.uint8))
    np.savez(tmp_path / "objects.npz", arr_0=np.array([None, 1], dtype=object), arr_1=np.zeros(2, np.int64))
    # a compressed archive with a damaged deflate stream: zlib's own error while a member is read
    np.savez_compressed(tmp_path / "z.npz", arr_0=np.arange(4096, dtype=np.uint8).reshape(4, 32, 32, 1) % 7,
                        arr_1=np.zeros(4, np.int64))
    good = (tmp_path / "z.npz").read_bytes()
    for offset in range(40, 160):
        (tmp_path / "deflate.npz").write_bytes(good[:offset] + bytes([good[offset] ^ 0xFF]) + good[offset + 1:])
        try:
            with np.load(tmp_path / "deflate.npz") as f:
                f["arr_0"]
        except zlib.error:
            break
        except Exception:
            pass
    else:
        raise AssertionError("no damaged byte gave a zlib error")
    for name, message in (("deflate.npz", "cannot read it as .npz: Error -3"),
                          ("junk.npz", "cannot read it as .npz: not an .npz archive"),
                          ("one.npy", r"cannot read it as .npz: it holds a single array \(.npy\)"),
                          ("other.npz", r"expected arrays arr_0 \(images\) and arr_1 \(labels\), got \['images'\]"),
                          ("objects.npz", "cannot read it as .npz: Object arrays cannot be loaded")):
        with pytest.raises(ValueError, match=f"--dataset {tmp_path / name}: {message}"):
            npz_file(str(tmp_path / name))
    with pytest.raises(ValueError, match="--dataset must be"):
        load_dataset(str(tmp_path / "nothing.txt"))
    # a label far beyond any class count (the class list and the embedding would be that long), uint64 ones too
    pictures = np.zeros((4, 4, 4, 1), np.uint8)
    for labels in (np.array([0, 1, 2, 10**9]), np.array([0, 1, 2, 2**64 - 1], np.uint64)):
        np.savez(tmp_path / "big.npz", arr_0=pictures, arr_1=labels)
        with pytest.raises(ValueError, match=f"arr_1 must hold class ids 0..K-1 with K at most 100000, got a label "
                                             f"of {int(labels.max())}"):
            npz_file(str(tmp_path / "big.npz"))


def test_sixteen_bit_greyscale_pngs_are_rescaled(tmp_path):
    """Scaled to 0..255, not saturated at 255."""
    from PIL import Image

    wide = np.array([[0, 128, 257, 32768], [40000, 63000, 65278, 65535]], np.uint16)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(wide).save(tmp_path / name / "1.png")
    with Image.open(tmp_path / "a" / "1.png") as im:
        assert im.mode.startswith("I")  # 16 bits a pixel as Pillow reads it
    data = image_folder(str(tmp_path))
    assert to_uint8(data.images)[0, :, :, 0].tolist() == [[0, 0, 1, 128], [156, 245, 254, 255]]


def test_image_kinds_read_as_grey_or_rgb(tmp_path):
    from PIL import Image

    rgba = np.random.default_rng(2).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    palette = Image.fromarray(rgba[..., :3]).quantize(4)
    kinds = {"rgba.png": (Image.fromarray(rgba), rgba[..., :3]),  # alpha dropped
             "grey_alpha.png": (Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 1])]),
                                rgba[..., :1]),
             "palette.png": (palette, np.asarray(palette.convert("RGB")))}
    for name, (image, expected) in kinds.items():
        image.save(tmp_path / name)
        array = read_image(str(tmp_path / name))
        assert array.dtype == np.uint8 and np.array_equal(array, expected), name


def test_damaged_and_oversized_images_are_named(tmp_path, monkeypatch):
    from PIL import Image

    picture = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    save_png(str(tmp_path / "whole.png"), picture)
    assert np.array_equal(read_image(str(tmp_path / "whole.png")), picture)
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'cut.png'))}: .*truncated"):
        read_image(str(tmp_path / "cut.png"))
    # Pillow's decompression-bomb limit: over it a warning from Pillow (refused here), over twice it an error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    for pixels in (256, 1024):
        side = int(pixels ** 0.5)
        save_png(str(tmp_path / "big.png"), np.zeros((side, side, 3), np.uint8))
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'big.png'))}: Image size \\({pixels} "
                                             "pixels\\) exceeds limit of .* decompression bomb"):
            read_image(str(tmp_path / "big.png"))
    monkeypatch.undo()
    # in a dataset folder: named by its path
    (tmp_path / "folder" / "a").mkdir(parents=True)
    (tmp_path / "folder" / "a" / "1.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(os.path.join('a', '1.png'))}: .*truncated"):
        image_folder(str(tmp_path / "folder"))


def test_images_pillow_cannot_read_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"cannot identify image file '{re.escape(str(tmp_path / 'a' / '1.jpg'))}'"):
        image_folder(str(tmp_path))


def test_unit_range_round_trip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.array_equal(to_uint8(to_unit_range(pixels)), pixels)


def test_cli_train_then_sample_the_checkpoint(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8),
             arr_1=np.arange(12) % 3)
    out = tmp_path / "m.pt"
    args = ["train", "--dataset", str(tmp_path / "d.npz"), "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--base-channels", "8", "--groups", "4", "--channel-mult", "1", "--attention-resolutions",
            "--export", str(tmp_path / "slim.pt")]
    assert main(args) == 0
    slim = checkpoint.read(str(tmp_path / "slim.pt"))
    assert "optimizer" not in slim and slim["step"] == 3
    model = checkpoint.load_model(str(tmp_path / "slim.pt"))
    assert model.sample(torch.tensor([0, 1, 2]), 1.0, steps=3, backend="reference").shape == (3, 1, 8, 8)
    assert main(["train", "--dataset", str(tmp_path / "d.npz"), "--out", str(out), "--p-uncond", "1",
                 "--overwrite"]) == 2
    assert "cfgfast: error: --p-uncond must lie in [0, 1)" in capsys.readouterr().err  # the flag, not p_uncond
    # an existing checkpoint is not replaced without --resume or --overwrite
    before = out.read_bytes()
    assert main(args[:-2]) == 2
    assert f"--out {out} exists: add --resume to continue its training, or --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(args[:-2] + ["--overwrite", "--resume"]) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err and out.read_bytes() == before
    assert main(args[:-2] + ["--overwrite", "--seed", "1"]) == 0 and out.read_bytes() != before
    # the slim export is no training checkpoint: resuming from it is refused by name
    assert main(args[:4] + [str(tmp_path / "slim.pt")] + args[5:-2] + ["--resume"]) == 2
    assert "slim.pt is not a training checkpoint (it has no model, optimizer, rng" in capsys.readouterr().err
    # nor may the export replace the training checkpoint
    before = out.read_bytes()
    assert main(args[:-1] + [str(out)]) == 2
    assert "--export must differ from --out" in capsys.readouterr().err and out.read_bytes() == before
    assert not any(f.name.startswith(".tmp-") for f in tmp_path.iterdir())  # no partial files left


def test_cli_train_network_checks_name_flags_and_ctrl_c_says_what_to_do(tmp_path, capsys, monkeypatch):
    import cfgfast.training

    out = tmp_path / "m.pt"
    base = ["train", "--dataset", "digits", "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--base-channels", "8", "--groups", "4", "--checkpoint-every", "2"]
    for extra, message in (
            (["--groups", "0"], "--groups must be a positive int, got 0"),
            (["--channel-mult", "1", "0"], "--channel-mult must be at least 1, got 0"),
            (["--channel-mult", "1", "2", "2", "2", "2"],
             r"--channel-mult must have no more levels than image_size can be halved between: image_size 8 cannot be "
             r"halved 4 times"),
            (["--base-channels", "6"], r"--base-channels must make every level's width a multiple of groups \(4\) "
                                       r"and num_heads \(4\), got width 6 \(base_channels 6 x 1\)"),
            (["--attention-resolutions", "3"], r"--attention-resolutions must be among the resolutions the network "
                                               r"works at, \[8, 4\] .* got \[3\]")):
        assert main(base + extra) == 2
        assert re.search("cfgfast: error: " + message, capsys.readouterr().err)
    assert not out.exists()
    # a preset's own attention resolutions are its business: digits' (4,) on 16 x 16 images trains, as before
    np.savez(tmp_path / "d16.npz", arr_0=np.zeros((8, 16, 16, 1), np.uint8), arr_1=np.arange(8) % 2)
    assert main(["train", "--dataset", str(tmp_path / "d16.npz"), "--out", str(tmp_path / "d16.pt"), "--steps", "1",
                 "--batch-size", "2", "--base-channels", "8", "--groups", "4"]) == 0
    with pytest.raises(TypeError, match="UNetConfig.channel_mult must be an int, got float"):
        UNetConfig(channel_mult=(1, 1.5))
    # Ctrl-C: after a checkpoint, resume from it; before any (even over an earlier --out), there is none of this run
    real_step, calls = torch.optim.AdamW.step, []

    def interrupted_at(n):
        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_step(self, *args, **kwargs)
        return step

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_at(3))
    assert main(base) == 130
    assert f"interrupted; {out} holds the last checkpoint: rerun with --resume" in capsys.readouterr().err
    assert checkpoint.read(str(out))["step"] == 2
    calls.clear()
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_at(1))
    assert main(base + ["--overwrite"]) == 130
    assert "interrupted; no checkpoint of this run was written yet (every --checkpoint-every 2 steps)" \
        in capsys.readouterr().err
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert main(base + ["--resume"]) == 0 and checkpoint.read(str(out))["step"] == 4


BUNDLED = os.path.join(os.path.dirname(cfgfast.__file__), "models", "weights", "digits.pt")


def test_bundled_model_loads_small_and_samples():
    assert os.path.getsize(BUNDLED) <= 5 * 2**20
    model = cfgfast.load_pretrained("digits")
    assert model.null_label == 10 and model.sample_shape == (1, 8, 8)
    x = model.sample(torch.arange(10), 3.0, steps=16, clip=1.0)
    assert x.shape == (10, 1, 8, 8) and x.abs().max() <= 1


def test_demo_writes_picture(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "8", "--per-cell", "1"]) == 0
    picture = read_image(str(tmp_path / "cfg_demo.png"))
    # 10 rows of 8x8 images at scale 4 with 1-pixel gaps; 4 w blocks of 1 image with a blank between; then the
    # labels' margins
    assert picture.shape[2] == 3 and picture.shape[0] > 10 * 33 + 1 and picture.shape[1] > 7 * 33 + 1
    assert "backend" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    before = (tmp_path / "cfg_demo.png").read_bytes()
    for scale in ("0", "-2", "100000"):  # refused before sampling: no empty or enormous picture
        assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--per-cell", "1", "--scale", scale]) == 2
        assert "--scale must be in [1, 64]" in capsys.readouterr().err
    assert (tmp_path / "cfg_demo.png").read_bytes() == before


def test_bundled_model_samples_are_their_class_at_w3():
    """The bundled model's bar: at w = 3 a classifier trained on real digits recognises >= 90% of its samples
    as their intended class (the full evaluation, 1000 samples and 128 steps, measured 100%)."""
    pytest.importorskip("sklearn")
    from cfgfast.evaluate import feature_classifier

    clf, _, _, heldout_accuracy = feature_classifier(load_dataset("digits"), steps=300, seed=0)
    assert heldout_accuracy > 0.97
    labels = torch.arange(100) % 10
    x = cfgfast.load_pretrained("digits").sample(labels, 3.0, steps=64, seed=1)
    with torch.no_grad():
        recognised = (clf(x).argmax(1) == labels).float().mean().item()
    assert recognised >= 0.9, f"only {recognised:.0%} of the w = 3 samples are recognised as their class"


def test_atomic_open_names_the_file_asked_for(tmp_path):
    from cfgfast._io import atomic_open

    target = tmp_path / "missing" / "x.npz"  # its folder does not exist: no temporary file can be made
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(target))}"):
        with atomic_open(str(target)) as f:
            f.write(b"x")
    with pytest.raises(RuntimeError, match="stopped"):  # a failed write leaves neither the file nor a temporary
        with atomic_open(str(tmp_path / "y.npz")) as f:
            f.write(b"partial")
            raise RuntimeError("stopped")
    assert list(tmp_path.iterdir()) == []
    # a write that fails (disk full) and a folder where the file should go: named by the file asked for, and an
    # existing file is left as it was
    import errno

    (tmp_path / "z.npz").write_bytes(b"good")
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(tmp_path / 'z.npz'))}: No space left on device"):
        with atomic_open(str(tmp_path / "z.npz")) as f:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(tmp_path / 'folder.png'))}: Is a directory"):
        save_png(str(tmp_path / "folder.png"), np.zeros((2, 2, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "z.npz"]
    assert (tmp_path / "z.npz").read_bytes() == b"good"
