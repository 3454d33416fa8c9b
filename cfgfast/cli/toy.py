"""`cfgfast toy`: the paper's Figure 2 setting, guided sampling of three 2-D Gaussian classes with their exact
noise predictions, drawn side by side."""

from __future__ import annotations

import time

import numpy as np
import torch

import cfgfast
from cfgfast import _checks
from cfgfast._images import figure, matplotlib_agg, save_figure
from cfgfast.backends import choose
from cfgfast.cli.common import finite_float, writable_path
from cfgfast.toy import three_classes

CLASS_COLORS = ("#d62728", "#1f77b4", "#2ca02c")
PANEL_INCHES = 3.2  # the layout is fixed in inches (fonts keep their proportions); --size sets the dpi
MAX_WIDTH = 30_000  # pixels: Agg draws at most 2^16 a side, and a wider picture is gigabytes


def run(args) -> int:
    out = writable_path(args.out)
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out must name a .png file, got {args.out}")
    # (a smaller panel draws its labels under 4 pixels high; under 1, matplotlib's font renderer refuses them)
    for name, value, low in (("num", args.num, 1), ("size", args.size, 100)):
        _checks.integer(name, value, low=low)
    if args.size > 4096:
        raise ValueError(f"--size must be at most 4096 (pixels a panel), got {args.size}")
    if (1 + len(args.w)) * args.size > MAX_WIDTH:
        raise ValueError(f"--size {args.size} x {1 + len(args.w)} panels (the classes and each --w) is wider than "
                         f"{MAX_WIDTH} pixels: give a smaller --size or fewer --w")
    if not 1e-6 <= args.extent <= 1e6:  # (beyond, the plot's arithmetic overflows or underflows: empty panels)
        raise ValueError(f"--extent must lie in [1e-6, 1e6], got {args.extent}")
    if args.num > _checks.MAX_WORD // 3:
        raise ValueError(f"--num must be at most {_checks.MAX_WORD // 3} (3 x num sample indices, 32-bit counter "
                         f"words), got {args.num}")
    _checks.seed(args.seed)  # before the data's generator is seeded with it
    _checks.steps(args.steps)  # the sampling options, before the banner that states them
    _checks.unit_interval("v", args.v)
    matplotlib_agg()  # a missing matplotlib is told before sampling, not after it
    backend = choose(args.backend, torch.device("cpu")).name
    model = three_classes()
    labels = torch.arange(3 * args.num) % 3
    data = model.sample_data(labels, torch.Generator().manual_seed(args.seed))  # the classes themselves
    print(f"cfgfast {cfgfast.__version__}: three 2-D Gaussian classes, {args.num} samples each, {args.steps} steps, "
          f"v={args.v}, backend {backend}")
    print(f"{'panel':>8} {'min class gap':>14} {'mean spread':>12} {'s':>6}")
    panels = [("the classes (data)", data)]
    for w in args.w:
        start = time.perf_counter()
        x = cfgfast.sample(model, labels, w, args.steps, v=args.v, seed=args.seed, backend=args.backend,
                           progress=None)
        seconds = time.perf_counter() - start
        means = torch.stack([x[labels == k].mean(0) for k in range(3)])
        spread = torch.stack([x[labels == k].std(0).mean() for k in range(3)]).mean()
        print(f"{'w=' + format(w, 'g'):>8} {torch.pdist(means).min().item():14.3f} {spread.item():12.3f} "
              f"{seconds:6.2f}")
        panels.append((f"guided samples, w = {w:g}", x))
    save_figure(out, _plot(panels, labels.numpy(), args))
    print(f"wrote {out}: panels left to right = the classes themselves, then w = "
          + ", ".join(format(w, "g") for w in args.w))
    return 0


def _plot(panels, labels: np.ndarray, args):
    """One square scatter panel per (title, points [N, 2]), sharing axes, with one legend for the classes."""
    fig = figure(len(panels) * PANEL_INCHES, PANEL_INCHES + 0.9, args.size / PANEL_INCHES, layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    marker = float(np.clip(12_000 / len(labels), 1, 30))  # smaller dots where there are many, so classes stay apart
    for ax, (title, points) in zip(axes, panels):
        points = points.numpy()
        ax.axhline(0, color="0.88", linewidth=0.8, zorder=0)
        ax.axvline(0, color="0.88", linewidth=0.8, zorder=0)
        for k, color in enumerate(CLASS_COLORS):
            ax.scatter(*points[labels == k].T, s=marker, color=color, alpha=0.6, linewidths=0, label=f"class {k}")
        ax.set(title=title, xlim=(-args.extent, args.extent), ylim=(-args.extent, args.extent), aspect="equal",
               xlabel="$x_1$")
    axes[0].set_ylabel("$x_2$")
    fig.get_layout_engine().set(wspace=0.08)  # room between one panel's last tick label and the next one's first
    legend = fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3,
                        markerscale=(40 / marker) ** 0.5, frameon=False)
    for handle in legend.legend_handles:
        handle.set_alpha(1)  # the legend's dots in full colour, not as faint as the overlapping ones
    fig.suptitle(f"Classifier-free guidance on three 2-D Gaussian classes ({args.num} samples each, {args.steps} "
                 f"steps, v = {args.v:g})")
    return fig


def add_parser(sub, name: str) -> None:
    demo = sub.add_parser(name, help="guided samples of three exact 2-D Gaussian classes, drawn side by side")
    demo.add_argument("--out", default="toy.png", help="PNG to write (default toy.png)")
    demo.add_argument("--w", type=finite_float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance strengths (0 1 3)")
    demo.add_argument("--num", type=int, default=1000, help="samples per class (default 1000)")
    demo.add_argument("--steps", type=int, default=256, help="sampling steps (default 256)")
    demo.add_argument("--v", type=finite_float, default=0.3, help="variance interpolation (default 0.3)")
    demo.add_argument("--seed", type=int, default=0, help="noise and the classes' draw (default 0)")
    demo.add_argument("--backend", default="auto", help="auto, reference or cpu")
    demo.add_argument("--size", type=int, default=320, help="panel width in pixels, 100 to 4096 (default 320)")
    demo.add_argument("--extent", type=float, default=3.0, help="half-width of the plotted square (default 3)")
    demo.set_defaults(run=run)
