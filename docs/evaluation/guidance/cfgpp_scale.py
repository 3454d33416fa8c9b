"""CFG++ on its own scale, for docs/evaluation/guidance.md: `cfgfast evaluate --guidance` takes w >= 0 only, which
is CFG++'s lambda = 1 + w >= 1, while the CFG++ paper samples with lambda in [0, 1]. This scores CFG++ at
lambda = 0.2, 0.4, 0.6, 0.8 (w = lambda - 1 < 0) exactly as `cfgfast evaluate` scores (the same feature classifier:
500 steps, seed 0; 500 samples, labels i mod 10; ddim, 50 steps, seed 0; x~ clipped to [-1, 1]). As run, from the
repository root:

    env PYTHONPATH=. OMP_NUM_THREADS=1 python docs/evaluation/guidance/cfgpp_scale.py

It writes cfgpp_scale.json beside itself.
"""

import json
import os
import time

import torch

import cfgfast
from cfgfast.data import load_dataset
from cfgfast.evaluate import feature_classifier, gaussian_fit, score

NUM, STEPS, SEED = 500, 50, 0
LAMBDAS = (0.2, 0.4, 0.6, 0.8)

model = cfgfast.load_pretrained("digits")
data = load_dataset("digits")
clf, train, heldout, _ = feature_classifier(data, seed=SEED)
with torch.no_grad():
    reference = gaussian_fit(clf.features(data.images[train]).numpy())
labels = torch.arange(NUM) % data.num_classes
points = []
for lam in LAMBDAS:
    start = time.perf_counter()
    x = cfgfast.sample(model, labels, lam - 1.0, STEPS, sampler="ddim", guidance="cfgpp", seed=SEED, progress=False)
    point = {"lambda": lam, "w": lam - 1.0, **score(clf, x, labels, reference, len(heldout)),
             "seconds": round(time.perf_counter() - start, 1)}
    points.append(point)
    print(point, flush=True)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cfgpp_scale.json")
with open(path + ".tmp", "w") as f:
    json.dump({"num": NUM, "sampler": "ddim", "steps": STEPS, "seed": SEED, "points": points}, f, indent=1)
os.replace(path + ".tmp", path)
