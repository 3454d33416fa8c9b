"""`cfgfast demo`: the main job for a new user. The bundled digits model (trained with label dropout, Algorithm 1)
sampled with classifier-free guidance (Algorithm 2) for every class at several w, drawn as one picture:
rows are the 10 classes, column blocks are w = 0, 0.3, 1, 3 (left to right). Offline, seconds on a laptop CPU."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from cfgfast.cli.common import finite_float, writable_path

DEMO_W = (0.0, 0.3, 1.0, 3.0)


def run(args) -> int:
    import cfgfast
    from cfgfast import _checks
    from cfgfast._images import image_grid, matplotlib_agg, save_figure
    from cfgfast.backends import choose
    from cfgfast.data import to_uint8

    if not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} " + ("is not a folder" if os.path.exists(args.out) else
                                                   "does not exist (a folder for cfg_demo.png)"))
    out = writable_path(os.path.join(args.out, "cfg_demo.png"))
    if not 1 <= args.per_cell <= 1000:
        raise ValueError(f"--per-cell must be in [1, 1000] (samples per class and w), got {args.per_cell}")
    _checks.steps(args.steps)  # the sampling options, before the banner that states them
    _checks.unit_interval("v", args.v)
    _checks.seed(args.seed)
    if not 1 <= args.scale <= 64:
        raise ValueError(f"--scale must be in [1, 64] (pixels per image pixel), got {args.scale}")
    matplotlib_agg()  # a missing matplotlib is told before sampling, not after it
    model = cfgfast.load_pretrained("digits")
    classes, k, ws = model.config.num_classes, args.per_cell, args.w
    # one batch in picture order: class-major rows, then w blocks, then k samples per cell
    labels = torch.arange(classes).repeat_interleave(len(ws) * k)
    w = torch.tensor(ws, dtype=torch.float32).repeat_interleave(k).repeat(classes)
    backend = choose(args.backend, torch.device("cpu")).name
    print(f"cfgfast {cfgfast.__version__}: bundled digits model, {len(labels)} samples ({classes} classes x "
          f"w = {', '.join(format(x, 'g') for x in ws)} x {k}), {args.steps} steps, v = {args.v}, backend {backend}")
    start = time.perf_counter()
    x = cfgfast.sample(model, labels, w, args.steps, v=args.v, seed=args.seed, clip=1.0, backend=args.backend)
    seconds = time.perf_counter() - start
    images = to_uint8(x)  # [N, 8, 8, 1]
    n, h, wd, c = images.shape
    # a blank image between w blocks
    blocks = images.reshape(classes, len(ws), k, h, wd, c)
    blank = np.full((classes, len(ws), 1, h, wd, c), 255, dtype=np.uint8)
    cols = len(ws) * (k + 1) - 1
    cells = np.concatenate([blocks, blank], axis=2).reshape(classes, cols + 1, h, wd, c)[:, :cols]
    grid = image_grid(cells.reshape(-1, h, wd, c), classes, cols, scale=args.scale, pad=1)
    save_figure(out, _labelled(grid, ws, k, wd * args.scale + 1, h * args.scale + 1))
    print(f"sampled in {seconds:.1f} s ({seconds / args.steps * 1e3:.0f} ms per step of batch {2 * len(labels)})")
    print(f"wrote {out}: rows = classes 0-9, column blocks = w " + ", ".join(format(x, "g") for x in ws))
    return 0


def _labelled(grid: np.ndarray, ws, k: int, cell_width: int, cell_height: int):
    """The grid drawn pixel for pixel (matplotlib's figimage: no resampling), a class number left of each row and
    a "w = ..." title over each block of k columns."""
    from cfgfast._images import figure

    dpi = 100
    font = float(np.clip(0.45 * cell_height, 9, 20))  # text height in pixels, following the images' size
    titles = [f"w = {w:g}" for w in ws]
    # a title wider than its block and the blank beside it would run into the next one: stood on end instead
    upright = (k + 1) * cell_width >= 0.65 * font * max(map(len, titles))
    top = round(2.4 * font) if upright else round(0.65 * font * max(map(len, titles)) + font)
    left, bottom, right = round(4.5 * font), round(0.6 * font), round(0.6 * font)
    height, width = grid.shape[:2]
    fig_width, fig_height = left + width + right, top + height + bottom
    fig = figure(fig_width / dpi, fig_height / dpi, dpi)
    fig.figimage(grid, xo=left, yo=bottom, origin="upper")
    points = font * 72 / dpi

    def text(x, y, label, **options):  # x, y: pixels from the top left
        fig.text(x / fig_width, 1 - y / fig_height, label, fontsize=points, **options)

    for row in range(height // cell_height):
        text(left - 0.4 * font, top + (row + 0.5) * cell_height, str(row), ha="right", va="center")
    text(1.2 * font, top + height / 2, "class", rotation=90, ha="center", va="center")
    for block, title in enumerate(titles):
        centre = left + (block * (k + 1) + k / 2) * cell_width
        text(centre, top - 0.5 * font, title, ha="center", va="bottom", rotation=0 if upright else 90)
    return fig


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="sample the bundled digits model at several w and draw one picture (offline)")
    p.add_argument("--out", default=".", help="folder for cfg_demo.png (default: the current folder)")
    p.add_argument("--w", type=finite_float, nargs="+", default=list(DEMO_W), help="guidance strengths (0 0.3 1 3)")
    p.add_argument("--per-cell", type=int, default=3, help="samples per class and w, 1 to 1000 (default 3)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps (default 256, the paper's)")
    p.add_argument("--v", type=finite_float, default=0.3, help="variance interpolation (default 0.3, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed (default 0)")
    p.add_argument("--scale", type=int, default=4, help="pixels per image pixel (default 4)")
    p.add_argument("--backend", default="auto", help="auto, cpu or reference")
    p.set_defaults(run=run)
