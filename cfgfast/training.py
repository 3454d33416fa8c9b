"""Training with label dropout: the paper's Algorithm 1. One network learns ε(z, c) and, with the label replaced
by the null label with probability p_uncond, ε(z); λ ~ training_lambdas(u), z = α x + σ ε, loss ||ε_θ − ε||².
AdamW with warm-up, gradient clipping, an EMA of the weights (the one used for sampling), and checkpoints that
hold everything needed to resume exactly: weights, EMA, optimizer, the RNG states (the batches' and noise's
generator, and torch's global one, which dropout draws from), config, step and a fingerprint of the dataset.
Training runs inside torch.random.fork_rng: the caller's global RNG state is left as it was."""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import _checks
from .data import Dataset
from .models import checkpoint
from .models.unet import UNet, UNetConfig
from .schedule import LAMBDA_MAX, LAMBDA_MIN, diffuse, training_lambdas


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    p_uncond: float = 0.1  # the paper's default
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    lambda_min: float = LAMBDA_MIN
    lambda_max: float = LAMBDA_MAX

    def __post_init__(self):
        # the checked values are kept as Python numbers (a NumPy or tensor scalar would reach the checkpoint, which a
        # safe load then refuses, and torch.Generator.manual_seed refuses a NumPy int)
        for name in ("steps", "batch_size", "checkpoint_every"):
            setattr(self, name, _checks.integer(name, getattr(self, name), low=1,
                                                high=_checks.MAX_BATCH if name == "batch_size" else None))
        self.warmup = _checks.integer("warmup", self.warmup)
        self.seed = _checks.integer("seed", self.seed, high=2**64)
        for name in ("lr", "weight_decay", "p_uncond", "ema_decay", "lambda_min", "lambda_max"):
            setattr(self, name, float(_checks.real(name, getattr(self, name))))  # a number, finite
        if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (numbers.Real, torch.Tensor)) or (
                isinstance(self.grad_clip, torch.Tensor) and self.grad_clip.numel() != 1):
            raise TypeError(f"grad_clip must be a real number, got {type(self.grad_clip).__name__}")
        self.grad_clip = float(self.grad_clip)
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1) (1 would never train the conditional model), got "
                             f"{self.p_uncond}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if not self.grad_clip > 0:  # a negative max norm would flip the gradient's sign; inf: no clipping
            raise ValueError(f"grad_clip must be positive (inf for no clipping), got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not self.lambda_min < self.lambda_max:
            raise ValueError(f"lambda_min must be below lambda_max, got {self.lambda_min} and {self.lambda_max}")


def _differ(saved: dict, now: dict) -> str:
    """The entries of two configurations that differ, as "name X there, Y now; ..."."""
    return "; ".join(f"{k} {saved.get(k, 'unset')!r} there, {now.get(k, 'unset')!r} now"
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))


def diffusion_loss(model, x: torch.Tensor, labels: torch.Tensor, null_label: int, config: TrainConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1 on one batch: drop labels, draw λ and ε, noise x, regress ε."""
    batch = x.shape[0]
    drop = torch.rand(batch, generator=generator) < config.p_uncond
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    lam = training_lambdas(torch.rand(batch, generator=generator, dtype=torch.float64), config.lambda_min,
                           config.lambda_max)
    eps = torch.randn(x.shape, generator=generator)
    return torch.nn.functional.mse_loss(model(diffuse(x, lam, eps), lam.float(), labels), eps)


def _check_fits(model_config: UNetConfig, data: Dataset) -> None:
    shape = tuple(data.images.shape[1:])
    want = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if shape != want:
        raise ValueError(f"the model config produces images of shape {want} but dataset {data.name} holds {shape}: "
                         f"set image_size/in_channels to match")
    if model_config.num_classes != data.num_classes:
        raise ValueError(f"the model config has num_classes={model_config.num_classes} but dataset {data.name} has "
                         f"{data.num_classes} classes")


def dataset_fingerprint(data: Dataset) -> str:
    """SHA-256 of the images and labels (their shapes and bytes) in training order: what --resume compares."""
    digest = hashlib.sha256()
    for tensor in (data.images, data.labels):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype} {array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def train(model_config: UNetConfig, data: Dataset, out: str, config: TrainConfig, *, resume: bool = False,
          progress: bool | None = None, log=print) -> UNet:
    """Train (or resume) and write checkpoints to `out` every config.checkpoint_every steps and at the end; an
    interrupted run loses at most the steps since the last checkpoint, and a resumed one ends with the weights an
    uninterrupted one would have. Returns the EMA model. torch's global RNG state is left as it was."""
    _check_fits(model_config, data)
    with torch.random.fork_rng(devices=[]):  # the model, the data and the training are on the CPU
        return _train(model_config, data, out, config, resume, progress, log)


def _train(model_config, data, out, config, resume, progress, log) -> UNet:
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):  # found now, not at the first checkpoint
        raise ValueError(f"out: folder {folder} does not exist")
    torch.random.default_generator.manual_seed(config.seed)  # the initial weights (torch.manual_seed: every device's)
    model = UNet(model_config)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    fingerprint = dataset_fingerprint(data)
    step, running = 0, None  # running: the logged loss, a moving average
    if resume and os.path.exists(out):
        ckpt = checkpoint.read(out)
        missing = [k for k in ("model", "ema", "optimizer", "rng", "step") if k not in ckpt]
        if missing:
            raise ValueError(f"--resume: {out} is not a training checkpoint (it has no {', '.join(missing)}: an "
                             f"export for sampling?)")
        # the same images and labels (checkpoints from before the fingerprint: the same dataset name); first, as
        # other data (another number of classes) also makes another model config
        saved_data = ckpt.get("dataset_fingerprint")
        if (saved_data != fingerprint) if saved_data is not None else (ckpt.get("dataset") != data.name):
            same_name = " (the same name, other images or labels)" if ckpt.get("dataset") == data.name else ""
            raise ValueError(f"--resume: {out} was trained on other data: dataset {ckpt.get('dataset')!r} there, "
                             f"{data.name!r} now{same_name}; resume with the same --dataset")
        saved_model = ckpt.get("config")
        if saved_model != model_config.to_dict():
            differ = _differ(saved_model if isinstance(saved_model, dict) else {}, model_config.to_dict())
            raise ValueError(f"--resume: {out} was trained with another model config ({differ}); resume with the "
                             f"same --preset and network flags")
        free = ("steps", "checkpoint_every")  # neither changes the weights of a step
        saved = {k: v for k, v in ckpt.get("train_config", {}).items() if k not in free}
        now = {k: v for k, v in asdict(config).items() if k not in free}
        if saved != now:
            raise ValueError(f"--resume: {out} was trained with other settings ({_differ(saved, now)}); resume with "
                             "the same settings (only --steps and --checkpoint-every may change)")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["rng"])
        if "torch_rng" in ckpt:  # dropout's draws (checkpoints before it was saved resume with fresh ones)
            torch.set_rng_state(ckpt["torch_rng"])
        step = int(ckpt["step"])
        running = ckpt.get("running_loss")  # (the log goes on as without the interruption)
        log(f"resumed {out} at step {step}")
    elif resume:
        log(f"--resume: {out} does not exist yet, starting from step 0")

    def save():
        checkpoint.save(out, {"config": model_config.to_dict(), "train_config": asdict(config), "step": step,
                              "model": model.state_dict(), "ema": ema.state_dict(),
                              "optimizer": optimizer.state_dict(), "rng": generator.get_state(),
                              "torch_rng": torch.get_rng_state(), "dataset": data.name,
                              "dataset_fingerprint": fingerprint, "class_names": list(data.class_names),
                              "running_loss": running})

    if progress is None:
        progress = os.isatty(2)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="cfgfast train", unit="step")
    model.train()
    images, labels = data.images, data.labels
    n = len(labels)
    start = time.perf_counter()
    try:
        while step < config.steps:
            index = torch.randint(0, n, (config.batch_size,), generator=generator)
            for group in optimizer.param_groups:  # linear warm-up, then constant (as in ADM)
                group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
            loss = diffusion_loss(model, images[index], labels[index], model.null_label, config, generator)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            with torch.no_grad():
                # warm the EMA up from the start (decay grows to ema_decay) so short runs still sample well
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
            elif step % max(1, config.steps // 20) == 0:
                log(f"step {step}/{config.steps} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
            if step % config.checkpoint_every == 0 and step < config.steps:
                save()
        save()
    finally:
        if bar is not None:
            bar.close()
    return ema.eval()
