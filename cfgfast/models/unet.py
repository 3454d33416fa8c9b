"""A class-conditional U-Net in the style the paper used (ADM, Dhariwal & Nichol 2021): residual blocks with
group norm and scale-shift conditioning, self-attention at low resolutions, conditioned on the log-SNR λ
itself (Fourier features of λ, as in the paper's continuous-time setting) and on a class embedding whose
last row is the null label of classifier-free guidance."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..schedule import LAMBDA_MAX, LAMBDA_MIN


@dataclass
class UNetConfig:
    """Everything that defines the network (saved in checkpoints; weights alone are not enough)."""

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    base_channels: int = 64
    channel_mult: tuple = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4,)  # resolutions (in pixels) that get self-attention
    num_heads: int = 4
    groups: int = 16  # group norm groups; every width must be a multiple
    dropout: float = 0.0
    fourier_features: int = 32  # sin/cos pairs of λ

    def __post_init__(self):
        # whole numbers (a 1.5 would be cut to 1 by int())
        for name in ("channel_mult", "attention_resolutions"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                raise TypeError(f"UNetConfig.{name} must be a sequence of ints, got {type(values).__name__}")
            setattr(self, name, tuple(_checks.integer(f"UNetConfig.{name}", v, low=1) for v in values))
        for name in ("image_size", "in_channels", "num_classes", "base_channels", "num_res_blocks", "num_heads",
                     "groups", "fourier_features"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # (a NumPy int would reach the checkpoint, which a safe load refuses)
        self.dropout = _checks.real("UNetConfig.dropout", self.dropout)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult}")
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)):
            # (worded by the setting a user chooses: the command line tells it as --channel-mult)
            raise ValueError(f"UNetConfig.channel_mult must have no more levels than image_size can be halved "
                             f"between: image_size {self.image_size} cannot be halved {levels - 1} times "
                             f"({levels} levels); use fewer levels or a size divisible by {2 ** (levels - 1)}")
        for m in self.channel_mult:
            width = self.base_channels * m
            if width % self.groups or width % self.num_heads:
                raise ValueError(f"UNetConfig.base_channels must make every level's width a multiple of groups "
                                 f"({self.groups}) and num_heads ({self.num_heads}), got width {width} "
                                 f"(base_channels {self.base_channels} x {m})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must lie in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS = {
    # the bundled model: scikit-learn's 8x8 digits, 10 classes
    "digits": UNetConfig(image_size=8, in_channels=1, num_classes=10, base_channels=32, channel_mult=(1, 2),
                         num_res_blocks=1, attention_resolutions=(4,), num_heads=4, groups=8),
    # ImageNet 64x64 in the paper's (ADM's) layout, smaller: defined, not trained here
    "imagenet64": UNetConfig(image_size=64, in_channels=3, num_classes=1000, base_channels=128,
                             channel_mult=(1, 2, 3, 4), num_res_blocks=2, attention_resolutions=(32, 16, 8),
                             num_heads=4, groups=32, dropout=0.1),
}


def lambda_features(lam: torch.Tensor, pairs: int) -> torch.Tensor:
    """[B] -> [B, 2 * pairs]: sin/cos of λ at geometric frequencies, the slowest with one period across
    [λ_min, λ_max] and the fastest resolving steps of about 0.05 in λ."""
    span = LAMBDA_MAX - LAMBDA_MIN
    freqs = torch.exp(torch.linspace(math.log(2 * math.pi / span), math.log(2 * math.pi / 0.05 / 4), pairs,
                                     device=lam.device))
    angles = lam.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _config(kind, config, overrides: dict):
    """The network's config: `config`, with any keyword overrides replacing its fields, or kind(**overrides)."""
    if config is None:
        return kind(**overrides)
    if not isinstance(config, kind):
        raise TypeError(f"config must be a {kind.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN with the embedding's scale and shift (ADM's scale-shift norm), SiLU, conv."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))  # each block starts as identity
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of one resolution."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class UNet(nn.Module):
    """eps = model(z, lam, labels): z [B, C, H, W], lam float [B] (log-SNR), labels int64 [B] in
    [0, num_classes], where num_classes is the null label ("no class")."""

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        self.config = config = _config(UNetConfig, config, overrides)
        self.null_label = config.num_classes
        self.num_labels = config.num_classes + 1  # rows of the class embedding, the null label's last
        self.sample_shape = (config.in_channels, config.image_size, config.image_size)
        self.data_range = 1.0  # images in [-1, 1]: cfgfast.sample clips x~ to it by default
        ch, groups = config.base_channels, config.groups
        emb_dim = 4 * ch
        self.lambda_embed = nn.Sequential(nn.Linear(2 * config.fourier_features, emb_dim), nn.SiLU(),
                                          nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)  # last row: the null label
        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def block(cin, cout, res):
            layers = nn.ModuleList([ResBlock(cin, cout, emb_dim, groups, config.dropout)])
            if res in config.attention_resolutions:
                layers.append(Attention(cout, config.num_heads, groups))
            return layers

        self.down = nn.ModuleList()
        skips, width, res = [ch], ch, config.image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(block(width, ch * mult, res))
                width = ch * mult
                skips.append(width)
            if level < len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skips.append(width)
                res //= 2
        self.middle = nn.ModuleList([ResBlock(width, width, emb_dim, groups, config.dropout),
                                     Attention(width, config.num_heads, groups),
                                     ResBlock(width, width, emb_dim, groups, config.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = block(width + skips.pop(), ch * mult, res)
                width = ch * mult
                if level > 0 and i == config.num_res_blocks:
                    layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    layers.append(nn.Conv2d(width, width, 3, padding=1))
                    res *= 2
                self.up.append(layers)
        self.head = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(),
                                  zero_init(nn.Conv2d(width, config.in_channels, 3, padding=1)))

    def forward(self, z: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {getattr(z, 'dtype', type(z).__name__)}")
        if z.dim() != 4 or tuple(z.shape[1:]) != self.sample_shape:
            raise ValueError(f"z must have shape [B, {', '.join(map(str, self.sample_shape))}], got {list(z.shape)}")
        batch = z.shape[0]
        for name, t in (("lam", lam), ("labels", labels)):  # (no check of their values: that would synchronise a GPU)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch,) or t.device != z.device:
                raise ValueError(f"{name} must be a tensor of shape [{batch}] on {z.device}, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                                 f"{' on ' + str(t.device) if isinstance(t, torch.Tensor) else ''}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        dtype = self.stem.weight.dtype  # the model's own (float32, or after .half() / .double())
        features = lambda_features(lam, self.config.fourier_features).to(dtype)
        emb = self.lambda_embed(features) + self.class_embed(labels)
        h = self.stem(z.to(dtype))
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layers in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.head(h)

    @torch.no_grad()
    def sample(self, labels, w, steps: int = 256, **kwargs) -> torch.Tensor:
        """Guided samples x [B, C, H, W] in [-1, 1]: the whole loop is cfgfast.sample's (SPEC §4, §6). x~ is
        clipped to the data range [-1, 1] by default (data_range; clip=None turns it off): at λ near λ_min,
        x~ = (z - σ ε)/α divides the model's error by α ≈ e^-10, and clipping keeps that from reaching the sample,
        as ADM's and diffusers' image samplers do (clip_sample)."""
        from ..sampler import sample

        return sample(self, labels, w, steps, **kwargs)
