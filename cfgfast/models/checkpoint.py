"""Checkpoints: plain dicts of tensors and numbers (loadable with torch.load(weights_only=True)) holding the model
config beside the weights, so a file alone rebuilds the network. Written atomically (cfgfast._io)."""

from __future__ import annotations

import os
import re

import torch

from .._io import atomic_open
from .unet import UNet, UNetConfig

FORMAT = "cfgfast-unet"
VERSION = 1
PRETRAINED = {"digits": "digits.pt"}  # name -> file in cfgfast/models/weights/


def save(path: str, payload: dict, kind: str = FORMAT) -> None:
    """Write a checkpoint dict atomically, tagged with its format `kind` (what read() checks)."""
    with atomic_open(path) as f:
        torch.save({**payload, "format": kind, "version": VERSION}, f)


def read(path: str, kind: str = FORMAT) -> dict:
    """The checkpoint dict at path, with a clear error for a file that is missing, corrupt or not ours."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # arbitrary bytes fail anywhere in the unpickler: KeyError, IndexError, EOFError, ...
        # (not torch's text for a refused pickle, which suggests weights_only=False, an unsafe load; for arbitrary
        # bytes it is a bare key such as "101": the exception's type, and the object refused where torch names one)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f"it holds a {refused.group(1)} object, which a safe load refuses" if refused else \
            f"{type(exc).__name__} while reading it"
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file ({detail}); was it written by "
                         "cfgfast?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != kind:
        raise ValueError(f"checkpoint {path} is not a {kind} checkpoint (no format tag {kind!r}); "
                         f"was it written by cfgfast?")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')}, this cfgfast reads {VERSION}")
    return ckpt


def build(ckpt: dict, weights: str = "ema", path: str = "checkpoint") -> UNet:
    """The network of a checkpoint dict, in eval mode, with its EMA weights (or 'model')."""
    try:
        config = UNetConfig(**ckpt["config"])
        with torch.device("meta"):  # the network's shapes, allocating nothing (a config may ask for any size)
            shapes = {name: tuple(t.shape) for name, t in UNet(config).state_dict().items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad model config in checkpoint: {exc}") from None
    state = ckpt.get(weights)
    if state is None:
        raise ValueError(f"{path}: checkpoint has no {weights!r} weights (has {sorted(k for k in ckpt if k in ('model', 'ema'))})")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: the {weights!r} weights must be a dict of tensors, got {type(state).__name__}")
    # the weights fit the config before the network is built: then it takes no more memory than they already do
    wrong = sorted(set(shapes) ^ set(state)) or [name for name in shapes if tuple(state[name].shape) != shapes[name]]
    if wrong:
        name = wrong[0]
        detail = (f"{name} is {tuple(state[name].shape)} there, {shapes[name]} in the config's network"
                  if name in shapes and name in state else
                  f"{name} is {'missing from the weights' if name in shapes else 'not in the network'}")
        raise ValueError(f"{path}: weights do not fit the config: {detail} ({len(wrong)} such)")
    model = UNet(config)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def export(path: str, out: str) -> None:
    """A slim copy of a training checkpoint for shipping and sampling: config and EMA weights only."""
    ckpt = read(path)
    save(out, {k: ckpt[k] for k in ("config", "ema", "train_config", "step", "dataset", "class_names") if k in ckpt})


def pretrained_path(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {sorted(PRETRAINED)}, got {type(name).__name__}")
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)} (the models shipped with cfgfast), got {name!r}")
    return os.path.join(os.path.dirname(__file__), "weights", PRETRAINED[name])


def load_pretrained(name: str = "digits") -> UNet:
    """A model shipped inside the package, ready for cfgfast.sample (EMA weights, eval mode, CPU)."""
    path = pretrained_path(name)
    if not os.path.isfile(path):
        raise ValueError(f"the pretrained {name!r} model is missing from this installation ({path}); reinstall cfgfast")
    return build(read(path), "ema", path)


def load_model(spec: str, weights: str = "ema") -> UNet:
    """A shipped model by name ('digits') or a checkpoint file written by `cfgfast train`."""
    if spec in PRETRAINED:
        return load_pretrained(spec)
    return build(read(spec), weights, spec)
