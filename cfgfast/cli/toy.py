"""`cfgfast toy`: the paper's Figure 2 setting, guided sampling of three 2-D Gaussian classes with their exact
noise predictions, drawn side by side."""

from __future__ import annotations

import time

import numpy as np
import torch

import cfgfast
from cfgfast import _checks
from cfgfast._png import scatter_panel, write_png
from cfgfast.backends import choose
from cfgfast.cli.common import finite_float, writable_path
from cfgfast.toy import three_classes

CLASS_COLORS = np.array([[214, 39, 40], [31, 119, 180], [44, 160, 44]], dtype=np.uint8)


def run(args) -> int:
    out = writable_path(args.out)
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out must name a .png file, got {args.out}")
    for name, value, low in (("--num", args.num, 1), ("--size", args.size, 8)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if args.size > 4096:
        raise ValueError(f"--size must be at most 4096 (pixels a panel), got {args.size}")
    if not 1e-6 <= args.extent <= 1e6:  # (beyond, the plot's arithmetic overflows or underflows: empty panels)
        raise ValueError(f"--extent must lie in [1e-6, 1e6], got {args.extent}")
    if args.num > _checks.MAX_WORD // 3:
        raise ValueError(f"--num must be at most {_checks.MAX_WORD // 3} (3 x num sample indices, 32-bit counter "
                         f"words), got {args.num}")
    _checks.seed(args.seed)  # before the data's generator is seeded with it
    _checks.steps(args.steps)  # the sampling options, before the banner that states them
    _checks.unit_interval("v", args.v)
    backend = choose(args.backend, torch.device("cpu")).name
    model = three_classes()
    labels = torch.arange(3 * args.num) % 3
    data = model.sample_data(labels, torch.Generator().manual_seed(args.seed))  # the classes themselves
    colors = CLASS_COLORS[labels.numpy()]
    panels = [scatter_panel(data.numpy(), colors, args.size, args.extent)]
    print(f"cfgfast {cfgfast.__version__}: three 2-D Gaussian classes, {args.num} samples each, {args.steps} steps, "
          f"v={args.v}, backend {backend}")
    print(f"{'panel':>8} {'min class gap':>14} {'mean spread':>12} {'s':>6}")
    for w in args.w:
        start = time.perf_counter()
        x = cfgfast.sample(model, labels, w, args.steps, v=args.v, seed=args.seed, backend=args.backend,
                           progress=None)
        seconds = time.perf_counter() - start
        means = torch.stack([x[labels == k].mean(0) for k in range(3)])
        spread = torch.stack([x[labels == k].std(0).mean() for k in range(3)]).mean()
        print(f"{'w=' + format(w, 'g'):>8} {torch.pdist(means).min().item():14.3f} {spread.item():12.3f} "
              f"{seconds:6.2f}")
        panels.append(scatter_panel(x.numpy(), colors, args.size, args.extent))
    gap = np.full((args.size, 8, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    write_png(out, np.concatenate(row, axis=1))
    print(f"wrote {out}: panels left to right = the classes themselves, then w = "
          + ", ".join(format(w, "g") for w in args.w))
    return 0


def add_parser(sub, name: str) -> None:
    demo = sub.add_parser(name, help="guided samples of three exact 2-D Gaussian classes, drawn side by side")
    demo.add_argument("--out", default="toy.png", help="PNG to write (default toy.png)")
    demo.add_argument("--w", type=finite_float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance strengths (0 1 3)")
    demo.add_argument("--num", type=int, default=1000, help="samples per class (default 1000)")
    demo.add_argument("--steps", type=int, default=256, help="sampling steps (default 256)")
    demo.add_argument("--v", type=finite_float, default=0.3, help="variance interpolation (default 0.3)")
    demo.add_argument("--seed", type=int, default=0, help="noise and the classes' draw (default 0)")
    demo.add_argument("--backend", default="auto", help="auto, reference or cpu")
    demo.add_argument("--size", type=int, default=320, help="panel size in pixels (default 320)")
    demo.add_argument("--extent", type=float, default=3.0, help="half-width of the plotted square (default 3)")
    demo.set_defaults(run=run)
