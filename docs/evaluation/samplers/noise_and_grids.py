"""The metric's noise and the grid choice for docs/samplers.md, scored exactly as `cfgfast evaluate` scores (the
same feature classifier: 500 steps, seed 0). Writes --out (a JSON file beside this one) after every run. As run,
from the repository root with P="env PYTHONPATH=. OMP_NUM_THREADS=1 python docs/evaluation/samplers/noise_and_grids.py":

    $P --num 250 --w 3 1 --runs 0 1 2 3 4 5
    $P --num 250 --w 3 --runs 6 7 8 9 10 11 12 13 --out seeds.json
    $P --num 250 --w 3 --runs 14 15 16 --out grids10.json
    $P --num 250 --w 3 --runs 17 18 19 20 --out range.json
    $P --num 250 --w 3 --runs 21 22 23 24 --out sde.json

(the first, stopped during w = 1 for time, wrote noise_and_grids.json: its w = 3 points)
"""

import argparse
import json
import os
import time

import torch

import cfgfast
from cfgfast.data import load_dataset
from cfgfast.evaluate import feature_classifier, gaussian_fit, score
from cfgfast.schedule import sampling_lambdas

parser = argparse.ArgumentParser()
parser.add_argument("--num", type=int, default=250)
parser.add_argument("--w", type=float, nargs="+", default=[3.0, 1.0])
parser.add_argument("--runs", type=int, nargs="+", help="indices into RUNS (default: all)")
parser.add_argument("--out", default="noise_and_grids.json", help="file name, beside this script")
args = parser.parse_args()
args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), args.out)

model = cfgfast.load_pretrained("digits")
data = load_dataset("digits")
start = time.perf_counter()
clf, train, heldout, _ = feature_classifier(data, seed=0)
with torch.no_grad():
    reference = gaussian_fit(clf.features(data.images[train]).numpy())
print(f"feature classifier: {time.perf_counter() - start:.0f} s", flush=True)

# (name, sampler, steps, seed, grid): grid None is the sampler's default
RUNS = [("ddpm 256, seed 1", "ddpm", 256, 1, None),
        ("ddpm 256, seed 2", "ddpm", 256, 2, None),
        ("dpmpp_2m 20, uniform [-10, 10]", "dpmpp_2m", 20, 0, ("uniform", -10.0, 10.0)),
        ("dpmpp_2m 20, paper [-20, 20]", "dpmpp_2m", 20, 0, ("paper", -20.0, 20.0)),
        ("ddim 20, uniform [-20, 20]", "ddim", 20, 0, ("uniform", -20.0, 20.0)),
        ("dpmpp_2m 20, uniform [-15, 15]", "dpmpp_2m", 20, 0, ("uniform", -15.0, 15.0)),
        *[(f"{sampler} 20, seed {seed}", sampler, 20, seed, None)
          for sampler in ("dpmpp_2m", "dpmpp_2m_sde", "ddim") for seed in (1, 2)],
        *[(f"dpmpp_2m 20, paper [-20, 20], seed {seed}", "dpmpp_2m", 20, seed, ("paper", -20.0, 20.0))
          for seed in (1, 2)],
        ("dpmpp_2m 10, paper [-20, 20]", "dpmpp_2m", 10, 0, ("paper", -20.0, 20.0)),
        ("dpmpp_2m 10, uniform [-10, 10]", "dpmpp_2m", 10, 0, ("uniform", -10.0, 10.0)),
        ("dpmpp_2m_sde 20, paper [-20, 20]", "dpmpp_2m_sde", 20, 0, ("paper", -20.0, 20.0)),
        *[(f"dpmpp_2m 20, uniform [-10, 10], seed {seed}", "dpmpp_2m", 20, seed, ("uniform", -10.0, 10.0))
          for seed in (1, 2)],
        *[(f"dpmpp_2m_sde {steps}, uniform [-10, 10]", "dpmpp_2m_sde", steps, 0, ("uniform", -10.0, 10.0))
          for steps in (10, 20)],
        *[(f"dpmpp_2m_sde {steps}, uniform [-10, 10], seed {seed}", "dpmpp_2m_sde", steps, seed,
           ("uniform", -10.0, 10.0)) for steps in (10, 20) for seed in (1, 2)]]
labels = torch.arange(args.num) % data.num_classes
results = {"num": args.num, "feature_classifier_steps": 500, "points": [],
           "heldout_fd": score(clf, data.images[heldout], data.labels[heldout], reference)["fd"]}
for w in args.w:
    for name, sampler, steps, seed, grid in (RUNS if args.runs is None else [RUNS[i] for i in args.runs]):
        tic = time.perf_counter()
        lambdas = None if grid is None else sampling_lambdas(steps, grid[1], grid[2], grid[0]).tolist()
        x = cfgfast.sample(model, labels, w, None if lambdas else steps, sampler=sampler, seed=seed,
                           lambdas=lambdas)
        point = {"name": name, "sampler": sampler, "steps": steps, "seed": seed, "grid": grid, "w": w,
                 **score(clf, x, labels, reference), "seconds": time.perf_counter() - tic}
        results["points"].append(point)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"w={w:g} {name}: FD {point['fd']:.4f} IS {point['is']:.3f} acc {point['accuracy']:.3f} "
              f"({point['seconds']:.0f} s)", flush=True)
