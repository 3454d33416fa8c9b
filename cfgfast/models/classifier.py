"""A small CNN classifier for 8x8-ish images, built from the U-Net's own parts (ResBlock with scale-shift norm,
lambda_features), in two roles:

- noise-conditional, p_φ(c | z_λ) of classifier guidance (Dhariwal & Nichol): `clf(z, lam) -> logits`, the
  protocol of `cfgfast.sample(classifier=...)`, trained on z_λ = α x + σ ε with λ from `training_lambdas`;
- clean: `clf(x) -> logits` and `clf.features(x)` (the penultimate layer), the feature space in which
  `cfgfast evaluate` measures its Fréchet distance and Inception-style score.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..schedule import diffuse, training_lambdas
from . import checkpoint
from .unet import ResBlock, _config, lambda_features

FORMAT = "cfgfast-classifier"
PRETRAINED = {"digits": "digits_classifier.pt"}  # name -> file in cfgfast/models/weights/


@dataclass
class ClassifierConfig:
    """Everything that defines the network (saved in checkpoints beside the weights)."""

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    noise_conditional: bool = True
    channel_mult: tuple = (1, 2)  # one ResBlock per level, halving the resolution between levels
    groups: int = 8  # group norm groups; every width must be a multiple
    fourier_features: int = 16  # sin/cos pairs of λ (noise-conditional only)

    def __post_init__(self):
        if isinstance(self.channel_mult, (str, bytes)) or not hasattr(self.channel_mult, "__iter__"):
            raise TypeError(f"ClassifierConfig.channel_mult must be a sequence of ints, got "
                            f"{type(self.channel_mult).__name__}")
        self.channel_mult = tuple(_checks.integer("ClassifierConfig.channel_mult", m, low=1) for m in self.channel_mult)
        for name in ("image_size", "in_channels", "num_classes", "width", "groups", "fourier_features"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # (a NumPy int would reach the checkpoint, which a safe load refuses)
        if not isinstance(self.noise_conditional, bool):
            raise ValueError(f"ClassifierConfig.noise_conditional must be a bool, got {self.noise_conditional!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"ClassifierConfig.channel_mult must be positive ints, got {self.channel_mult}")
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)):
            raise ValueError(f"ClassifierConfig: image_size {self.image_size} cannot be halved {levels - 1} times "
                             f"(channel_mult has {levels} levels)")
        for m in self.channel_mult:
            if (self.width * m) % self.groups:
                raise ValueError(f"ClassifierConfig: width {self.width * m} (width x {m}) must be a multiple of "
                                 f"groups ({self.groups})")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class Classifier(nn.Module):
    """logits = clf(z, lam) (noise-conditional) or clf(x) (clean): z/x [B, C, H, W], lam float [B] (log-SNR)."""

    def __init__(self, config: ClassifierConfig | None = None, **overrides):
        super().__init__()
        self.config = config = _config(ClassifierConfig, config, overrides)
        self.input_shape = (config.in_channels, config.image_size, config.image_size)
        emb_dim = 4 * config.width
        if config.noise_conditional:
            self.lambda_embed = nn.Sequential(nn.Linear(2 * config.fourier_features, emb_dim), nn.SiLU(),
                                              nn.Linear(emb_dim, emb_dim))
        else:
            # no λ: the blocks' scale-shift input is one learned vector
            self.constant_embed = nn.Parameter(torch.zeros(emb_dim))
        self.stem = nn.Conv2d(config.in_channels, config.width, 3, padding=1)
        self.blocks = nn.ModuleList()
        width = config.width
        for level, mult in enumerate(config.channel_mult):
            self.blocks.append(ResBlock(width, config.width * mult, emb_dim, config.groups, 0.0))
            width = config.width * mult
            if level < len(config.channel_mult) - 1:
                self.blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.feature_dim = width
        self.head_norm = nn.GroupNorm(config.groups, width)
        self.out = nn.Linear(width, config.num_classes)

    def _embedding(self, z: torch.Tensor, lam) -> torch.Tensor:
        if z.dim() != 4 or tuple(z.shape[1:]) != self.input_shape:
            raise ValueError(f"z must have shape [B, {', '.join(map(str, self.input_shape))}], got {list(z.shape)}")
        batch = z.shape[0]
        if not self.config.noise_conditional:
            if lam is not None:
                raise ValueError("lam must be None: this classifier sees clean images (noise_conditional=False)")
            return self.constant_embed.expand(batch, -1)
        if lam is None:
            raise ValueError("lam is required: this classifier is noise-conditional, call it as clf(z, lam)")
        lam = torch.as_tensor(lam, dtype=torch.float32, device=z.device)
        if lam.dim() == 0:
            lam = lam.expand(batch)
        if tuple(lam.shape) != (batch,):
            raise ValueError(f"lam must be a number or a tensor of shape [{batch}], got {list(lam.shape)}")
        features = lambda_features(lam, self.config.fourier_features).to(self.stem.weight.dtype)
        return self.lambda_embed(features)

    def features(self, z: torch.Tensor, lam=None) -> torch.Tensor:
        """[B, feature_dim]: the penultimate layer (global average of the last block's activations), in the module's
        precision (float32, or after .half() / .double())."""
        emb = self._embedding(z, lam)
        h = self.stem(z.to(self.stem.weight.dtype))
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return F.silu(self.head_norm(h)).mean(dim=(2, 3))

    def forward(self, z: torch.Tensor, lam=None) -> torch.Tensor:
        return self.out(self.features(z, lam))


def heldout_split(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0, *,
                  per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices, the held-out part class-balanced: per_class images of each class (default
    round(fraction * N / classes)), picked by a seeded permutation. Balanced like samples with labels i mod K, so
    class proportions do not move the means that FD compares."""
    classes = torch.unique(labels)
    if per_class is None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        per_class = max(1, round(fraction * len(labels) / len(classes)))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    picked = []
    for c in classes.tolist():
        members = order[labels[order] == c]
        if len(members) <= per_class:
            raise ValueError(f"class {c} must keep images to train on after holding out {per_class}, got only "
                             f"{len(members)} images of it")
        picked.append(members[:per_class])
    heldout = torch.cat(picked).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[heldout] = False
    return keep.nonzero().flatten(), heldout


def train_classifier(config: ClassifierConfig, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 2000,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, log=None) -> Classifier:
    """Cross-entropy with AdamW and a cosine learning-rate decay; a noise-conditional classifier sees z_λ with λ
    from training_lambdas (Algorithm 1's distribution). The same seed gives the same classifier. Eval mode."""
    steps = _checks.integer("steps", steps, low=1)
    batch_size = _checks.integer("batch_size", batch_size, low=1, high=_checks.MAX_BATCH)
    lr = _checks.real("lr", lr)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    seed = _checks.seed(seed)
    if tuple(images.shape[1:]) != (config.in_channels, config.image_size, config.image_size):
        raise ValueError(f"images must have shape [N, {config.in_channels}, {config.image_size}, {config.image_size}] "
                         f"for this config, got {list(images.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
        raise ValueError(f"labels must lie in [0, {config.num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.random.default_generator.manual_seed(seed)  # the CPU's alone, which fork_rng restores
        clf = Classifier(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    clf.train()
    threads = torch.get_num_threads()
    # convolutions this small gain nothing from a second thread, and on a busy machine its waits cost up to 10x
    torch.set_num_threads(1)
    try:
        _fit(clf, images, labels, optimizer, generator, steps, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)
    return clf.eval()


def _fit(clf, images, labels, optimizer, generator, steps, batch_size, lr, log) -> None:
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        x, y = images[index], labels[index]
        if clf.config.noise_conditional:
            lam = training_lambdas(torch.rand(batch_size, generator=generator, dtype=torch.float64))
            logits = clf(diffuse(x, lam, torch.randn(x.shape, generator=generator)), lam.float())
        else:
            logits = clf(x)
        loss = F.cross_entropy(logits, y)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"classifier training diverged at step {step} (loss {loss.item()}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        optimizer.step()
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f}")


@torch.no_grad()
def accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, lam: float | None = None,
             seed: int = 0) -> float:
    """Fraction of images classified as their label; with lam, of their z_λ (noise drawn from seed)."""
    if lam is None:
        logits = clf(images)
    else:
        lam_b = torch.full((len(labels),), float(lam), dtype=torch.float64)
        eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        logits = clf(diffuse(images, lam_b, eps), lam_b.float())
    return (logits.argmax(1) == labels).float().mean().item()


def save_classifier(path: str, clf: Classifier, **info) -> None:
    """Write config and weights (plus info: dataset, step, accuracies) atomically, tagged FORMAT."""
    checkpoint.save(path, {"config": clf.config.to_dict(), "weights": clf.state_dict(), **info}, kind=FORMAT)


def load_classifier(spec: str) -> Classifier:
    """A shipped classifier by name ('digits': noise-conditional, for classifier guidance) or a file written by
    `cfgfast train-classifier`; eval mode, weights frozen (guidance differentiates through z only)."""
    if spec in PRETRAINED:
        path = os.path.join(os.path.dirname(__file__), "weights", PRETRAINED[spec])
        if not os.path.isfile(path):
            raise ValueError(f"the pretrained {spec!r} classifier is missing from this installation ({path}); "
                             "reinstall cfgfast")
    else:
        path = spec
    ckpt = checkpoint.read(path, kind=FORMAT)
    try:
        clf = Classifier(ClassifierConfig(**ckpt["config"]))
        clf.load_state_dict(ckpt["weights"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: bad classifier config in checkpoint: {exc}") from None
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the config: {str(exc).splitlines()[0]}") from None
    return clf.eval().requires_grad_(False)
