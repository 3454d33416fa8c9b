"""`cfgfast train`: the paper's Algorithm 1 on digits, an image folder or an ADM .npz; checkpoints with --resume."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

from cfgfast.cli.common import writable_path

# the network's checks, told in this command's flags
ERROR_NAMES = {f"UNetConfig.{name}": "--" + name.replace("_", "-")
               for name in ("base_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "groups")}


def run(args) -> int:
    from cfgfast.data import load_dataset
    from cfgfast.models.unet import PRESETS
    from cfgfast.training import TrainConfig, train

    out = writable_path(args.out)
    if args.export is not None:
        writable_path(args.export, "--export")
        if os.path.realpath(args.export) == os.path.realpath(out):
            raise ValueError(f"--export must differ from --out (the slim copy would replace the training checkpoint "
                             f"that --resume needs), got {args.export} for both")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue --out's training, or start over")
    if os.path.exists(out) and not (args.resume or args.overwrite):  # hours of training, replaced at the first save
        raise ValueError(f"--out {args.out} exists: add --resume to continue its training, or --overwrite to start "
                         "over in its place")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                         ema_decay=args.ema_decay, seed=args.seed, checkpoint_every=args.checkpoint_every)
    data = load_dataset(args.dataset)
    overrides = {"image_size": data.images.shape[-1], "in_channels": data.images.shape[1],
                 "num_classes": data.num_classes}
    if data.images.shape[-1] != data.images.shape[-2]:
        raise ValueError(f"--dataset {args.dataset}: images must be square, got {tuple(data.images.shape[-2:])}")
    for name in ("base_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "groups"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    model_config = dataclasses.replace(PRESETS[args.preset], **overrides)
    reached = [model_config.image_size >> level for level in range(len(model_config.channel_mult))]
    unreached = [r for r in args.attention_resolutions or () if r not in reached]
    if unreached:  # the network would silently have no attention there (a preset's own default is left alone)
        raise ValueError(f"--attention-resolutions must be among the resolutions the network works at, {reached} "
                         f"(image_size {model_config.image_size} halved at each of the {len(reached)} levels), got "
                         f"{list(model_config.attention_resolutions)}")
    print(f"cfgfast train: {data.name}, {len(data.labels)} images of shape {tuple(data.images.shape[1:])}, "
          f"{data.num_classes} classes; {config.steps} steps of batch {config.batch_size}, p_uncond {config.p_uncond}")
    start = time.perf_counter()
    def identity(path):  # a save replaces the file (a new inode), and mtimes may be coarse
        return (os.stat(path).st_ino, os.stat(path).st_mtime_ns) if os.path.exists(path) else None

    earlier = identity(out)
    try:
        train(model_config, data, out, config, resume=args.resume, log=functools.partial(print, flush=True))
    except KeyboardInterrupt:
        if os.path.exists(out) and (args.resume or identity(out) != earlier):
            args.interrupt_hint = f"{out} holds the last checkpoint: rerun with --resume to continue from it"
        else:
            args.interrupt_hint = (f"no checkpoint of this run was written yet (every --checkpoint-every "
                                   f"{config.checkpoint_every} steps)")
        raise
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    if args.export is not None:
        from cfgfast.models.checkpoint import export

        export(out, args.export)
        print(f"wrote {args.export} (config and EMA weights only, for sampling and shipping)")
    return 0


def add_parser(sub, name: str) -> None:
    from cfgfast.models.unet import PRESETS
    from cfgfast.training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(name, help="train a class-conditional U-Net with label dropout (Algorithm 1)")
    p.add_argument("--dataset", required=True, help="digits, a folder with one subfolder per class, or FILE.npz")
    p.add_argument("--out", required=True, help="checkpoint to write (rewritten every --checkpoint-every steps)")
    p.add_argument("--export", help="also write a slim copy (config + EMA weights) for sampling, when done")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--overwrite", action="store_true", help="start over where --out exists (without it, an existing "
                                                            "--out is refused unless --resume)")
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="network preset (default digits)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"learning rate, reached after {d.warmup} warm-up steps (default {d.lr:g})")
    p.add_argument("--p-uncond", type=float, default=d.p_uncond,
                   help=f"label dropout probability (default {d.p_uncond:g}, the paper's)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help=f"decay of the weights' moving average that sampling uses (default {d.ema_decay:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"weights, batches, dropout and noise (default {d.seed})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")
    p.add_argument("--base-channels", type=int, help="U-Net width of the first level (default: the preset's)")
    p.add_argument("--num-res-blocks", type=int, help="residual blocks per level (default: the preset's)")
    p.add_argument("--channel-mult", type=int, nargs="+", help="width multiple per level (default: the preset's)")
    p.add_argument("--attention-resolutions", type=int, nargs="*",
                   help="resolutions with self-attention (default: the preset's)")
    p.add_argument("--groups", type=int, help="group norm groups (default: the preset's)")
    p.set_defaults(run=run)
