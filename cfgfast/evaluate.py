"""The paper's w trade-off (Figure 4, Table 1) at digits scale: sample at each guidance strength w with
classifier-free guidance and, given a noise-conditional classifier, classifier guidance; score the samples in the
feature space of a small classifier trained here on real digits (seeded, with a held-out split):

- FD: Fréchet distance between Gaussian fits of the penultimate features of samples and of the training digits;
- IS: the Inception-style score exp(E_x KL(p(y|x) || p(y))) of its softmax (at most the number of classes);
- accuracy: the fraction of samples it assigns to their intended class.

Two reference rows score real digits the same way: held-out ones (unseen by the feature classifier: what a model
that makes new digits of the data's distribution would score) and as many of its training ones (seen by it: what
a model that copies its training images would score). FD is biased upward at small sample counts, so each point
also reports fd_matched, the FD of its first samples as many as the held-out images, to compare with them.

The same scores at several samplers and step counts (one model evaluation a step) compare the samplers' cost to
quality: each (sampler, steps) pair is a run, and each run is swept over w."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping

import numpy as np
import torch

from . import _checks
from ._io import atomic_open
from ._images import image_grid, save_png
from .data import Dataset, to_uint8
from .models.classifier import Classifier, ClassifierConfig, accuracy, heldout_split, train_classifier
from .sampler import sample
from .samplers import SAMPLERS

DEFAULT_WS = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0)
FEATURE_STEPS = 500  # the feature classifier's training steps (batch 128): 99.4% held-out on digits
GUIDANCE_KINDS = ("classifier-free", "classifier")


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features must be finite, got NaN or infinity")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) in float64.

    tr (cov1 cov2)^(1/2) = tr (s cov2 s)^(1/2) with s = cov1^(1/2): s cov2 s is symmetric, so both roots come
    from eigendecompositions (eigenvalues clipped at 0 against rounding), no scipy needed."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"means and covariances must be [D] and [D, D] alike, got {mu1.shape}, {cov1.shape}, "
                         f"{mu2.shape}, {cov2.shape}")
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ cov2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def inception_score(log_probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x); log_probs [N, K] (log-softmax rows)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[0] < 1:
        raise ValueError(f"log_probs must be [N, K] with N >= 1, got shape {lp.shape}")
    if np.isnan(lp).any() or (lp == np.inf).any():
        raise ValueError("log_probs must be log-probabilities (finite, or -inf for 0), got NaN or +infinity")
    p = np.exp(lp)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_marginal = np.log(p.mean(axis=0))
        # p log(p / marginal), with 0 log 0 = 0: a class of probability 0 adds nothing
        kl = np.where(p > 0, p * (lp - log_marginal), 0.0).sum(axis=1)
    return float(np.exp(kl.mean()))


def feature_classifier(data: Dataset, *, steps: int = FEATURE_STEPS, seed: int = 0, log=None):
    """The clean classifier of the metrics, trained on data less a seeded, class-balanced 20%: (clf, train indices,
    held-out indices, held-out accuracy)."""
    train, heldout = heldout_split(data.labels, 0.2, seed)
    config = ClassifierConfig(image_size=data.images.shape[-1], in_channels=data.images.shape[1],
                              num_classes=data.num_classes, noise_conditional=False)
    clf = train_classifier(config, data.images[train], data.labels[train], steps=steps, seed=seed, log=log)
    return clf, train, heldout, accuracy(clf, data.images[heldout], data.labels[heldout])


@torch.no_grad()
def score(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, reference, matched: int | None = None) -> dict:
    """FD against reference = gaussian_fit of real features, IS and class accuracy of images [N, C, H, W]; with
    matched, also fd_matched: the FD of the first `matched` images alone."""
    features = clf.features(images.float().cpu()).numpy()
    log_probs = torch.log_softmax(clf.out(torch.from_numpy(features)), dim=1)
    result = {"fd": frechet_distance(*gaussian_fit(features), *reference)}
    if matched is not None:
        result["fd_matched"] = frechet_distance(*gaussian_fit(features[:matched]), *reference)
    return {**result, "is": inception_score(log_probs.numpy()),
            "accuracy": (log_probs.argmax(1) == labels.cpu()).float().mean().item()}


def _sample_grid(x: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows = the first 10 classes, columns = up to 10 samples of each (sample i has label i mod num_classes)."""
    rows, cols = min(num_classes, 10), min(10, len(x) // num_classes)
    if cols == 0:  # fewer samples than classes: one row
        rows, cols = 1, min(len(x), 10)
        index = list(range(cols))
    else:
        index = [c * num_classes + r for r in range(rows) for c in range(cols)]
    return image_grid(to_uint8(x[index]), rows, cols, scale=4)


def _w_name(w: float) -> str:
    return format(w, "g")


def _grid_name(kind: str, w: float, run: tuple[str, int] | None = None) -> str:
    """grid_w<w>.png for a sweep of one run; grid_<sampler>_<steps>_w<w>.png for a sweep of several."""
    prefix = "" if run is None else f"{run[0]}_{run[1]}_"
    return f"grid_{prefix}w{_w_name(w)}{'' if kind == 'classifier-free' else '_classifier'}.png"


def _plot_name(metrics: dict) -> str:
    """fd_is.png (against w) for a sweep of one run; fd_is_evaluations.png (against model evaluations, one line per
    sampler) for a sweep of several."""
    return "fd_is.png" if len(metrics["runs"]) == 1 else "fd_is_evaluations.png"


def _runs(samplers, steps) -> list[tuple[str, int]]:
    """The (sampler, steps) runs: samplers a name or a list of names; steps an int, a list of ints (for every sampler)
    or a mapping {sampler: int or list of ints} that names each sampler."""
    samplers = [samplers] if isinstance(samplers, str) else list(samplers)
    unknown = [s for s in samplers if s not in SAMPLERS]
    if not samplers or unknown or len(set(samplers)) != len(samplers):
        raise ValueError(f"samplers must be distinct names from {list(SAMPLERS)}, got {samplers}")
    if isinstance(steps, Mapping):
        missing, extra = [s for s in samplers if s not in steps], [s for s in steps if s not in samplers]
        if missing or extra:
            raise ValueError(f"steps must give step counts for each sampler swept ({samplers}) and no other, got "
                             f"{dict(steps)}")
        per_sampler = {s: steps[s] for s in samplers}
    else:
        per_sampler = dict.fromkeys(samplers, steps)
    runs = []
    for sampler, counts in per_sampler.items():
        counts = [counts] if isinstance(counts, int) else list(counts)
        if not counts or len(set(counts)) != len(counts):
            raise ValueError(f"steps must be distinct step counts for each sampler, got {counts} for {sampler!r}")
        for count in counts:
            if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count < _checks.MAX_WORD:
                raise ValueError(f"steps must be an int of at least 2 and below {_checks.MAX_WORD}, got {count!r}")
            runs.append((sampler, count))
    return runs


def check_options(ws, num, steps, batch_size, feature_steps, v, seed, samplers="ddpm", eta=0.0):
    """The sweep's settings that need no model or data (so the command line checks them before it starts):
    (ws as floats, v, seed, the (sampler, steps) runs, eta)."""
    ws = [float(w) for w in ws]
    if not ws or any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"ws must be non-empty, finite and >= 0, got {ws}")
    runs = _runs(samplers, steps)
    for name, value, low, high in (("num", num, 2, _checks.MAX_WORD + 1),
                                   ("batch_size", batch_size, 1, _checks.MAX_BATCH),
                                   ("feature_steps", feature_steps, 1, None)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value >= high):
            bound = f" and below {high}" if high else ""
            raise ValueError(f"{name} must be an int of at least {low}{bound}, got {value!r}")
    eta = _checks.unit_interval("eta", eta)
    if eta != 0 and not any(sampler == "ddim" for sampler, _ in runs):
        raise ValueError(f"eta must be 0 unless 'ddim' is among the samplers (eta is ddim's setting), got eta={eta} "
                         f"with samplers {list(dict.fromkeys(sampler for sampler, _ in runs))}")
    return ws, _checks.unit_interval("v", v), _checks.seed(seed), runs, eta


def sweep(model, data: Dataset, out: str, *, ws=DEFAULT_WS, num: int = 1000, steps=256, samplers="ddpm",
          eta: float = 0.0, classifier=None, model_name: str = "model", classifier_name: str | None = None,
          seed: int = 0, batch_size: int = 500, feature_steps: int = FEATURE_STEPS, v: float = 0.3,
          log=print) -> dict:
    """Score num samples (labels i mod num_classes) at each w in ws, with classifier-free guidance and, given a
    noise-conditional classifier(z, lam), classifier guidance, for each sampler at each step count (steps: an int, a
    list, or {sampler: list}; eta for "ddim", v for "ddpm"); write out/results.md, metrics.json, the plot
    (fd_is.png against w for one run, fd_is_evaluations.png against steps for several) and a sample grid per
    point, rewritten after every point. Returns the metrics dict."""
    ws, v, seed, runs, eta = check_options(ws, num, steps, batch_size, feature_steps, v, seed, samplers, eta)
    shape = tuple(data.images.shape[1:])
    if tuple(model.sample_shape) != shape or model.null_label != data.num_classes:
        raise ValueError(f"the model samples {tuple(model.sample_shape)} with {model.null_label} classes but dataset "
                         f"{data.name} holds {shape} with {data.num_classes}")
    absent = (torch.bincount(data.labels, minlength=data.num_classes) == 0).nonzero().flatten().tolist()
    if absent:  # samples of every class are scored against the real images of every class
        names = [str(data.class_names[k]) for k in absent]
        raise ValueError(f"data must hold images of each of its {data.num_classes} classes to evaluate on; dataset "
                         f"{data.name} has none of class{'es' if len(names) > 1 else ''} "
                         f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    if classifier is not None:
        config = classifier.config
        if not config.noise_conditional or config.num_classes != data.num_classes \
                or (config.in_channels, config.image_size, config.image_size) != shape:
            raise ValueError(f"classifier must be noise-conditional for {data.num_classes} classes of shape {shape}, "
                             f"got noise_conditional={config.noise_conditional}, {config.num_classes} classes of "
                             f"shape {(config.in_channels, config.image_size, config.image_size)}")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    log(f"training the feature classifier on real {data.name} ({feature_steps} steps, seed {seed}) ...")
    clf, train, heldout, heldout_accuracy = feature_classifier(data, steps=feature_steps, seed=seed)
    with torch.no_grad():
        reference = gaussian_fit(clf.features(data.images[train]).numpy())
    # as many seen images as held-out ones, class-balanced alike, so the two rows share FD's sample-count bias
    seen = train[heldout_split(data.labels[train], seed=seed, per_class=len(heldout) // data.num_classes)[1]]
    references = {name: {"images": len(index), **score(clf, data.images[index], data.labels[index], reference)}
                  for name, index in (("heldout", heldout), ("train", seen))}
    log(f"feature classifier: held-out accuracy {heldout_accuracy:.2%} on {len(heldout)} images "
        f"({time.perf_counter() - start:.0f} s); real digits, held-out: FD {references['heldout']['fd']:.3f} "
        f"IS {references['heldout']['is']:.3f}; seen in training: FD {references['train']['fd']:.3f} "
        f"IS {references['train']['is']:.3f}")
    metrics = {
        "model": model_name, "classifier": classifier_name, "dataset": data.name, "num": num,
        "runs": [{"sampler": sampler, "steps": count} for sampler, count in runs], "eta": eta, "v": v,
        "seed": seed, "clip": 1.0, "matched": min(num, len(heldout)),
        "feature_classifier": {"steps": feature_steps, "seed": seed, "train_images": len(train),
                               "heldout_images": len(heldout), "heldout_accuracy": heldout_accuracy,
                               "feature_dim": clf.feature_dim},
        "reference": references,
        "points": [],
    }
    device = next(model.parameters()).device
    guide = None if classifier is None else classifier.to(device)
    kinds = GUIDANCE_KINDS if classifier is not None else GUIDANCE_KINDS[:1]
    plan = [(kind, run, w) for kind in kinds for run in runs for w in ws if not (kind == "classifier" and w == 0)]
    grid_run = (lambda run: None) if len(runs) == 1 else (lambda run: run)
    # the files are rewritten after every point: until the last, they say how many of the planned points they hold
    metrics.update(planned=len(plan), complete=False)
    labels = torch.arange(num) % data.num_classes
    for i, (kind, (sampler, count), w) in enumerate(plan):
        # v and eta go to the sampler that reads them (sample() refuses them elsewhere)
        options = {"v": v} if sampler == "ddpm" else {"eta": eta} if sampler == "ddim" else {}
        tic = time.perf_counter()
        x = torch.cat([sample(model, labels[s:s + batch_size].to(device), w, count, sampler=sampler, seed=seed,
                              clip=1.0, index_offset=s, classifier=guide if kind == "classifier" else None,
                              **options).cpu()
                       for s in range(0, num, batch_size)])
        seconds = time.perf_counter() - tic
        point = {"guidance": kind, "sampler": sampler, "steps": count, "w": w,
                 **score(clf, x, labels, reference, metrics["matched"]), "seconds": seconds}
        metrics["points"].append(point)
        metrics["complete"] = i + 1 == len(plan)
        save_png(os.path.join(out, _grid_name(kind, w, grid_run((sampler, count)))),
                  _sample_grid(x, data.num_classes))
        write_results(out, metrics)
        if i == 0:  # an earlier sweep's files that this one does not make, once its own results replaced that one's
            planned = {_grid_name(kind, w, grid_run(run)) for kind, run, w in plan} | {_plot_name(metrics)}
            for name in os.listdir(out):
                if (re.fullmatch(r"grid_([a-z0-9_]+_[0-9]+_)?w[0-9.e+-]+(_classifier)?\.png", name)
                        or name in ("fd_is.png", "fd_is_evaluations.png")) and name not in planned:
                    os.remove(os.path.join(out, name))
        log(f"[{i + 1}/{len(plan)}] {kind} {sampler} {count} steps w={_w_name(w)}: FD {point['fd']:.3f} (first "
            f"{metrics['matched']}: {point['fd_matched']:.3f})  IS {point['is']:.3f}  accuracy "
            f"{point['accuracy']:.1%}  ({seconds:.0f} s)")
    return metrics


def _rows(metrics: dict) -> dict:
    """{kind: {(sampler, steps, w): point}}; w = 0 (no guidance, the same sampler for both kinds) is shared."""
    rows = {kind: {} for kind in GUIDANCE_KINDS}
    for p in metrics["points"]:
        rows[p["guidance"]][p["sampler"], p["steps"], p["w"]] = p
    if rows["classifier"]:
        rows["classifier"].update({key: p for key, p in rows["classifier-free"].items() if key[2] == 0})
    return rows


def _sampler_name(sampler: str, eta: float) -> str:
    return f"ddim (η = {eta:g})" if sampler == "ddim" else sampler


def results_markdown(metrics: dict) -> str:
    rows = _rows(metrics)
    fc, matched = metrics["feature_classifier"], metrics["matched"]
    runs = metrics["runs"]
    order = {(run["sampler"], run["steps"]): i for i, run in enumerate(runs)}
    if len(runs) == 1:
        title, sampling = "Guidance strength w", (f"sampler {_sampler_name(runs[0]['sampler'], metrics['eta'])}, "
                                                  f"{runs[0]['steps']} steps")
    else:
        listed = ", ".join(f"{_sampler_name(r['sampler'], metrics['eta'])} at {r['steps']}" for r in runs)
        title, sampling = "Samplers, steps and w", f"samplers at steps (one model evaluation a step): {listed}"
    lines = [
        f"# {title} on {metrics['dataset']}: FD and IS",
        "",
        f"Model `{metrics['model']}`, {metrics['num']} samples per point (labels i mod K), {sampling}; "
        f"v = {metrics['v']} (ddpm), seed {metrics['seed']}, x̃ clipped to [-1, 1]; every point shares the same "
        "initial noise.",
        f"Features: a small CNN trained on {fc['train_images']} real images ({fc['steps']} steps, seed {fc['seed']}; "
        f"held-out accuracy {fc['heldout_accuracy']:.2%} on {fc['heldout_images']}). FD: Fréchet distance of its "
        f"{fc['feature_dim']}-d penultimate features to those of its training images (lower is closer); IS: "
        "exp E KL(p(y|x) || p(y)) of its softmax (higher is more confident and balanced, at most K); accuracy: "
        "samples assigned to their intended class.",
        f"FD is biased upward at small sample counts: compare the real rows with `FD (first {matched})`, the FD of "
        f"as many samples as they hold. The seen real images belong to the set FD compares with, so their FD is "
        "almost all bias; the held-out ones are new to the feature classifier, as new digits from a model would be.",
    ]
    if not metrics.get("complete", True):
        lines += ["", f"**Incomplete: {len(metrics['points'])} of the {metrics['planned']} planned points** (the sweep "
                      "was stopped, or is still running)."]
    for kind in GUIDANCE_KINDS:
        if not rows[kind]:
            continue
        title = "Classifier-free guidance" if kind == "classifier-free" else \
            f"Classifier guidance (noise-conditional classifier `{metrics['classifier']}`; w = 0 is shared)"
        lines += ["", f"## {title}", "",
                  f"| w | sampler | steps | FD ({metrics['num']} samples) | FD (first {matched}) | IS | accuracy | "
                  "seconds |",
                  "|---:|:---|---:|---:|---:|---:|---:|---:|"]
        for name, ref in (("real held-out", metrics["reference"]["heldout"]),
                          ("real, seen by the feature classifier", metrics["reference"]["train"])):
            lines.append(f"| {name} ({ref['images']} images) | | | – | {ref['fd']:.3f} | {ref['is']:.3f} | "
                         f"{ref['accuracy']:.1%} | – |")
        # by w, then in the order the runs were given: each w's samplers side by side
        for (sampler, count, w), p in sorted(rows[kind].items(), key=lambda kv: (kv[0][2], order[kv[0][:2]])):
            lines.append(f"| {_w_name(w)} | {_sampler_name(sampler, metrics['eta'])} | {count} | {p['fd']:.3f} | "
                         f"{p['fd_matched']:.3f} | {p['is']:.3f} | {p['accuracy']:.1%} | {p['seconds']:.0f} |")
    with_classifier = bool(rows["classifier"])
    if len(runs) == 1:
        caption = (f"FD ({metrics['num']} samples) and IS against w. Blue: classifier-free guidance"
                   + ("; orange: classifier guidance" if with_classifier else "")
                   + "; grey dashes: IS of real held-out images.")
    else:
        caption = (f"FD ({metrics['num']} samples, top) and IS (bottom) against model evaluations (steps, log "
                   "scale), one line per sampler, one column per w"
                   + (" (classifier guidance: the columns marked C)" if with_classifier else "")
                   + "; grey dashes: IS of real held-out images.")
    grids = "grid_w<w>" if len(runs) == 1 else "grid_<sampler>_<steps>_w<w>"
    lines += ["", f"![FD and IS]({_plot_name(metrics)})", "",
              f"{caption} Sample grids: `{grids}.png`" + (f" and `{grids}_classifier.png`" if with_classifier else "")
              + " (rows = classes).", ""]
    return "\n".join(lines)


def write_results(out: str, metrics: dict) -> None:
    """results.md, metrics.json and the plot in out, each written atomically."""
    with atomic_open(os.path.join(out, "metrics.json")) as f:
        f.write((json.dumps(metrics, indent=2) + "\n").encode())
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(results_markdown(metrics).encode())
    rows = _rows(metrics)
    real_is = metrics["reference"]["heldout"]["is"]
    # no real line in the FD panels: the held-out FD holds fewer images than the samples, so it is not comparable
    if len(metrics["runs"]) == 1:
        panels = [[plot_panel(key.upper(), {kind: sorted((w, p[key]) for (_, _, w), p in rows[kind].items())
                                            for kind in rows}, floor)
                   for key, floor in (("fd", None), ("is", real_is))]]
    else:
        samplers = list(dict.fromkeys(run["sampler"] for run in metrics["runs"]))
        columns = sorted({(kind, w) for kind in rows for (_, _, w) in rows[kind]},
                         key=lambda c: (GUIDANCE_KINDS.index(c[0]), c[1]))
        panels = [[plot_panel(f"{key.upper()} W={_w_name(w)}{'' if kind == 'classifier-free' else ' C'}",
                              {s: sorted((n, p[key]) for (s2, n, w2), p in rows[kind].items() if s2 == s and w2 == w)
                               for s in samplers}, floor, colors=SAMPLER_COLORS, x_label="MODEL EVALUATIONS",
                              log_x=True)
                   for kind, w in columns] for key, floor in (("fd", None), ("is", real_is))]
    save_png(os.path.join(out, _plot_name(metrics)), _tile(panels))


def _tile(panels: list[list[np.ndarray]]) -> np.ndarray:
    """Rows of equal-sized panels, 12 white pixels between them."""
    height, width = panels[0][0].shape[:2]
    gap_x = np.full((height, 12, 3), 255, dtype=np.uint8)
    rows = [np.concatenate([part for panel in row for part in (panel, gap_x)][:-1], axis=1) for row in panels]
    gap_y = np.full((12, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap_y)][:-1], axis=0)


# --- the plot: drawn with numpy (no matplotlib), text in a 3x5 bitmap font --------------------------------------

GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "A": "010101111101101", "C": "111100100100111", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "I": "111010010010111", "L": "100100100100111",
    "R": "110101110101101", "S": "011100010001110", "W": "101101101111101", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "_": "000000000000111", "=": "000111000111000",
}
COLORS = {"classifier-free": (31, 119, 180), "classifier": (255, 127, 14)}
SAMPLER_COLORS = {"ddpm": (31, 119, 180), "ddim": (255, 127, 14), "dpmpp_2m": (44, 160, 44),
                  "dpmpp_2m_sde": (214, 39, 40)}
GREY, INK = (150, 150, 150), (0, 0, 0)


def draw_text(canvas: np.ndarray, text: str, x: int, y: int, scale: int = 2, color=INK) -> int:
    """Draw text with its top-left corner at (x, y); returns the x after it."""
    for ch in text.upper():
        glyph = np.array([int(b) for b in GLYPHS[ch]], dtype=bool).reshape(5, 3)
        block = glyph.repeat(scale, 0).repeat(scale, 1)
        region = canvas[y:y + 5 * scale, x:x + 3 * scale]
        region[block[:region.shape[0], :region.shape[1]]] = color
        x += 4 * scale
    return x


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round-numbered ticks covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    raw = (hi - lo) / count
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
               if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.floor(lo / step)
    return [round(k * step, 10) for k in range(first, math.ceil(hi / step) + 1)]


def _number(t: float) -> str:
    """A tick label without exponent (the bitmap font has no 'e' or '+')."""
    text = f"{t:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _line(canvas: np.ndarray, p: tuple, q: tuple, color, dashed: bool = False) -> None:
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 1
    for t in range(n):
        if dashed and (t // 6) % 2:
            continue
        x = round(p[0] + (q[0] - p[0]) * t / max(n - 1, 1))
        y = round(p[1] + (q[1] - p[1]) * t / max(n - 1, 1))
        canvas[y:y + 2, x:x + 2] = color


def plot_panel(title: str, series: dict, floor: float | None, width: int = 420, height: int = 300, *,
               colors=COLORS, x_label: str = "W", log_x: bool = False) -> np.ndarray:
    """One panel: series {name: [(x, value), ...]} as lines with markers (colors[name]) against x; floor (real
    held-out images), if given, as a grey dashed line where it falls inside the series' range, and its value in the
    legend. log_x: x on a log scale, ticked at the series' x values."""
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    legend = [(name, colors[name]) for name in colors if series.get(name)]
    legend += [] if floor is None else [(f"real {floor:.3f}", GREY)]
    legend_lines, x = [[]], 8
    for text, color in legend:  # wrapped to the panel's width
        item = 12 + 8 * len(text) + 14
        if legend_lines[-1] and x + item > width:
            legend_lines.append([])
            x = 8
        legend_lines[-1].append((text, color))
        x += item
    left, right, top, bottom = 56, width - 16, 30, height - 46 - 12 * len(legend_lines)
    series = {name: [(a, val) for a, val in pts if math.isfinite(val)] for name, pts in series.items()}
    points = [pt for pts in series.values() for pt in pts] or [(1.0, 0.0), (2.0, 1.0)]
    xs, values = [a for a, _ in points], [val for _, val in points]
    if log_x:
        at = sorted(set(xs))
        lo, hi = math.log10(at[0]), math.log10(at[-1])
        pad = 0.08 * (hi - lo) or 0.3
        x_ticks, x_range = [(math.log10(a), _number(a)) for a in at], (lo - pad, hi + pad)
    else:
        ticks = _ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
        x_ticks, x_range = [(t, _number(t)) for t in ticks], (ticks[0], ticks[-1])
    # the axis spans the series, not zero: the trend is the point, and the tick labels give the scale
    pad = 0.1 * (max(values) - min(values)) or 0.1 * max(abs(max(values)), 1e-3)
    y_ticks = _ticks(min(values) - pad, max(values) + pad)

    def px(a, val):
        a = math.log10(a) if log_x else a
        return (left + (a - x_range[0]) / (x_range[1] - x_range[0]) * (right - left),
                bottom - (val - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top))

    for t, label in x_ticks:
        x = round(left + (t - x_range[0]) / (x_range[1] - x_range[0]) * (right - left))
        canvas[bottom:bottom + 5, x] = INK
        draw_text(canvas, label, x - 4 * len(label) + 1, bottom + 8)
    for t in y_ticks:
        y = round(px(1.0, t)[1])
        canvas[y, left - 5:left] = INK
        canvas[y, left + 1:right:4] = (225, 225, 225)  # light grid line
        label = _number(t)
        draw_text(canvas, label, max(0, left - 8 - 8 * len(label)), y - 5)
    canvas[top:bottom + 1, left] = canvas[bottom, left:right + 1] = INK
    draw_text(canvas, title, (left + right) // 2 - 8 * len(title) // 2, 8)
    draw_text(canvas, x_label, right + 2 - 8 * len(x_label), bottom + 24)
    if floor is not None and y_ticks[0] <= floor <= y_ticks[-1]:
        y_floor = px(1.0, floor)[1]
        _line(canvas, (left, y_floor), (right, y_floor), GREY, dashed=True)
    names = [name for name, _ in legend if name in colors]
    for i in reversed(range(len(names))):  # the first series on top, with the smallest marker: all stay visible
        pts = series[names[i]]
        for a, b in zip(pts, pts[1:]):
            _line(canvas, px(*a), px(*b), colors[names[i]])
        half = 3 + i
        for pt in pts:
            x, y = (round(c) for c in px(*pt))
            canvas[max(y - half, 0):y + half + 1, max(x - half, 0):x + half + 1] = colors[names[i]]
    for row, items in enumerate(legend_lines):  # under the axis
        x, y = 8, height - 21 - 12 * (len(legend_lines) - 1 - row)
        for text, color in items:
            canvas[y + 1:y + 9, x:x + 8] = color
            x = draw_text(canvas, text, x + 12, y) + 14
    return canvas
