"""cfgpp_scale.png for docs/evaluation/guidance.md: FD and IS of cfg and CFG++ against the scale each applies to
o_c - o_u (cfg: 1 + w; CFG++: its lambda), from the seed-0 runs beside this script (metrics.json, small_w/,
cfgpp_scale.json). As run, from the repository root: python docs/evaluation/guidance/plot_scale.py"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
points = {"cfg": [], "cfgpp": []}
for name in ("metrics.json", os.path.join("small_w", "metrics.json")):
    with open(os.path.join(here, name)) as f:
        for p in json.load(f)["points"]:
            if p["method"] in points:
                points[p["method"]].append((1.0 + p["w"], p["fd"], p["is"]))
with open(os.path.join(here, "cfgpp_scale.json")) as f:
    points["cfgpp"] += [(p["lambda"], p["fd"], p["is"]) for p in json.load(f)["points"]]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
labels = {"cfg": "cfg: scale 1 + w", "cfgpp": "CFG++: scale λ"}
for method, style in (("cfg", ("C0", "o")), ("cfgpp", ("C3", "D"))):
    scale, fd, score = zip(*sorted(points[method]))
    for ax, values in zip(axes, (fd, score)):
        ax.plot(scale, values, color=style[0], marker=style[1], label=labels[method])
for ax, label in zip(axes, ("FD (500 samples; lower is closer)", "IS (higher is better)")):
    ax.set_xscale("log")
    ax.set_xlabel("scale on o_c − o_u (log)")
    ax.set_ylabel(label)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.grid(alpha=0.3)
axes[0].set_yscale("log")
axes[0].legend()
fig.suptitle("cfg and CFG++ on digits: ddim 50 steps, 500 samples a point, seed 0 (dotted: scale 1)")
out = os.path.join(here, "cfgpp_scale.png")
fig.savefig(out + ".tmp.png", dpi=110)
os.replace(out + ".tmp.png", out)
