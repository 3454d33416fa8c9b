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
quality: each (sampler, steps) pair is a run, and each run is swept over w.

Given guidance methods (SPEC §7: "cfg", guidance rescale, APG, CFG++, dynamic thresholding), the sweep compares
them instead: each method at each w, at one sampler and step count, from the same initial noise."""

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
from ._images import figure, image_grid, matplotlib_agg, save_figure, save_png
from .data import Dataset, to_uint8
from .guidance import APG, check_threshold
from .models.classifier import Classifier, ClassifierConfig, accuracy, heldout_split, train_classifier
from .sampler import sample
from .samplers import SAMPLERS

DEFAULT_WS = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0)
FEATURE_STEPS = 500  # the feature classifier's training steps (batch 128): 99.4% held-out on digits
GUIDANCE_KINDS = ("classifier-free", "classifier")
# The guidance methods a sweep can compare (SPEC §7) and the settings each runs at unless told others: rescale at
# diffusers' recommended phi; APG at its paper's momentum, with a norm threshold that bites early: on digits at w = 3
# (ddim, 50 steps) |x~_c - x~_u| per sample falls from about 2.7 to 0.1 over the run, and is above 1 for about the
# first third of it; dynamic thresholding at Imagen's quantile with M = 1.5 (M = 1 would be clipping to [-1, 1]).
GUIDANCE_METHODS = {
    "cfg": {},
    "rescale": {"guidance_rescale": 0.7},
    "apg": {"eta_parallel": 0.0, "norm_threshold": 1.0, "momentum": -0.5},
    "cfgpp": {},
    "threshold": {"threshold": (0.995, 1.5)},
}


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


def _grid_name(kind: str, w: float, run: tuple[str, int] | None = None, method: str | None = None) -> str:
    """grid_w<w>.png for a sweep of one run; grid_<sampler>_<steps>_w<w>.png for a sweep of several;
    grid_<method>_w<w>.png for a comparison of guidance methods."""
    prefix = f"{method}_" if method is not None else "" if run is None else f"{run[0]}_{run[1]}_"
    return f"grid_{prefix}w{_w_name(w)}{'' if kind == 'classifier-free' else '_classifier'}.png"


def _plot_name(metrics: dict) -> str:
    """fd_is.png (against w) for a sweep of one run; fd_is_evaluations.png (against model evaluations, one line per
    sampler) for a sweep of several; fd_is_methods.png (against w, one line per guidance method) for a comparison
    of guidance methods."""
    if metrics.get("methods"):
        return "fd_is_methods.png"
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


def check_methods(methods, runs: list[tuple[str, int]]) -> dict[str, dict]:
    """The guidance methods to compare as {name: settings}: methods a list of names from GUIDANCE_METHODS (each at
    its settings there), or {name: settings} whose settings replace some of that method's; at one (sampler, steps)
    run, and "cfgpp" only with sampler "ddim"."""
    names = [methods] if isinstance(methods, str) else list(methods)
    if not names or any(name not in GUIDANCE_METHODS for name in names) or len(set(names)) != len(names):
        raise ValueError(f"methods must be distinct names from {list(GUIDANCE_METHODS)}, got {names}")
    if len(runs) != 1:
        raise ValueError(f"samplers must be one sampler at one step count when guidance methods are compared, got "
                         f"{', '.join(f'{sampler} {count}' for sampler, count in runs)}")
    sampler = runs[0][0]
    if "cfgpp" in names and sampler != "ddim":
        others = [name for name in GUIDANCE_METHODS if name != "cfgpp"]
        raise ValueError(f"methods must hold 'cfgpp' (CFG++, a form of ddim) only with sampler 'ddim', got sampler "
                         f"{sampler!r}; with it, choose from {others}")
    given = methods if isinstance(methods, Mapping) else {}
    checked = {}
    for name in names:
        settings = dict(given.get(name) or {})
        unknown = [key for key in settings if key not in GUIDANCE_METHODS[name]]
        if unknown:
            raise ValueError(f"methods[{name!r}] must hold settings from {list(GUIDANCE_METHODS[name])}, got "
                             f"{unknown}")
        checked[name] = {key: _method_setting(name, key, settings.get(key, default))
                         for key, default in GUIDANCE_METHODS[name].items()}
    return checked


def _method_setting(method: str, key: str, value):
    """One setting of a guidance method, checked as sample() and cfgfast.APG check it, named as methods[...][...]."""
    name = f"methods[{method!r}][{key!r}]"
    if key == "guidance_rescale":
        return _checks.unit_interval(name, value)
    if key == "threshold":
        try:
            return list(check_threshold(value, None))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a pair (p, M) with p in (0, 1] and M at least 1, finite in float32, "
                             f"got {value!r}") from None
    try:  # APG's own checks, each setting alone
        return getattr(APG(**{key: value}), key)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace(f"APG {key}", name)) from None


def method_options(name: str, settings: dict) -> dict:
    """sample()'s guidance keywords for a method of check_methods at its settings: the clip of [-1, 1] for all but
    "threshold", which replaces it."""
    return {"guidance": "cfgpp" if name == "cfgpp" else APG(**settings) if name == "apg" else "cfg",
            "guidance_rescale": settings.get("guidance_rescale", 0.0),
            "threshold": None if name != "threshold" else tuple(settings["threshold"]),
            "clip": None if name == "threshold" else 1.0}


def _options_json(options: dict) -> dict:
    """method_options as metrics.json records it."""
    apg = options["guidance"] if isinstance(options["guidance"], APG) else None
    return {"guidance": "apg" if apg else options["guidance"],
            "apg": None if apg is None else {"eta_parallel": apg.eta_parallel, "norm_threshold": apg.norm_threshold,
                                             "momentum": apg.momentum},
            "guidance_rescale": options["guidance_rescale"],
            "threshold": None if options["threshold"] is None else list(options["threshold"]),
            "clip": options["clip"]}


def sweep(model, data: Dataset, out: str, *, ws=DEFAULT_WS, num: int = 1000, steps=256, samplers="ddpm",
          eta: float = 0.0, classifier=None, model_name: str = "model", classifier_name: str | None = None,
          seed: int = 0, batch_size: int = 500, feature_steps: int = FEATURE_STEPS, v: float = 0.3,
          methods=None, command: str | None = None, log=print) -> dict:
    """Score num samples (labels i mod num_classes) at each w in ws, with classifier-free guidance and, given a
    noise-conditional classifier(z, lam), classifier guidance, for each sampler at each step count (steps: an int, a
    list, or {sampler: list}; eta for "ddim", v for "ddpm"); write out/results.md, metrics.json, the plot
    (fd_is.png against w for one run, fd_is_evaluations.png against steps for several) and a sample grid per
    point, rewritten after every point. Returns the metrics dict.

    methods (names from GUIDANCE_METHODS, or {name: settings}; see check_methods): compare those guidance methods
    at each w instead, at one sampler and step count and without a classifier; the plot is fd_is_methods.png and
    the grids grid_<method>_w<w>.png.

    command: the command line that ran the sweep, which results.md quotes with the date and the machine."""
    ws, v, seed, runs, eta = check_options(ws, num, steps, batch_size, feature_steps, v, seed, samplers, eta)
    methods = None if methods is None else check_methods(methods, runs)
    if methods is not None and classifier is not None:
        raise ValueError("classifier must be None when guidance methods are compared (every method is "
                         "classifier-free guidance)")
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
    matplotlib_agg()  # a missing matplotlib is told before sampling, not after it
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
    device = next(model.parameters()).device
    metrics = {
        "model": model_name, "classifier": classifier_name, "dataset": data.name, "num": num,
        "runs": [{"sampler": sampler, "steps": count} for sampler, count in runs], "eta": eta, "v": v,
        "seed": seed, "clip": 1.0, "matched": min(num, len(heldout)),
        **({} if methods is None else {"methods": methods}),
        "feature_classifier": {"steps": feature_steps, "seed": seed, "train_images": len(train),
                               "heldout_images": len(heldout), "heldout_accuracy": heldout_accuracy,
                               "feature_dim": clf.feature_dim},
        "reference": references,
        "ran": _run_facts(device, command),
        "points": [],
    }
    guide = None if classifier is None else classifier.to(device)
    kinds = GUIDANCE_KINDS if classifier is not None else GUIDANCE_KINDS[:1]
    if methods is None:
        plan = [(kind, None, run, w) for kind in kinds for run in runs for w in ws
                if not (kind == "classifier" and w == 0)]
    else:  # by w, the methods side by side: a stopped comparison still compares the methods at its first w
        plan = [("classifier-free", method, runs[0], w) for w in ws for method in methods]
    grid_run = (lambda run: None) if len(runs) == 1 else (lambda run: run)
    # the files are rewritten after every point: until the last, they say how many of the planned points they hold
    metrics.update(planned=len(plan), complete=False)
    labels = torch.arange(num) % data.num_classes
    for i, (kind, method, (sampler, count), w) in enumerate(plan):
        # v and eta go to the sampler that reads them (sample() refuses them elsewhere)
        options = {"v": v} if sampler == "ddpm" else {"eta": eta} if sampler == "ddim" else {}
        guidance = {"clip": 1.0} if method is None else method_options(method, methods[method])
        tic = time.perf_counter()
        x = torch.cat([sample(model, labels[s:s + batch_size].to(device), w, count, sampler=sampler, seed=seed,
                              index_offset=s, classifier=guide if kind == "classifier" else None, **guidance,
                              **options).cpu()
                       for s in range(0, num, batch_size)])
        seconds = time.perf_counter() - tic
        named = {} if method is None else {"method": method, "settings": _options_json(guidance)}
        point = {"guidance": kind, **named, "sampler": sampler, "steps": count, "w": w,
                 **score(clf, x, labels, reference, metrics["matched"]), "seconds": seconds}
        metrics["points"].append(point)
        metrics["complete"] = i + 1 == len(plan)
        save_png(os.path.join(out, _grid_name(kind, w, grid_run((sampler, count)), method)),
                 _sample_grid(x, data.num_classes))
        write_results(out, metrics)
        if i == 0:  # an earlier sweep's files that this one does not make, once its own results replaced that one's
            planned = {_grid_name(kind, w, grid_run(run), method) for kind, method, run, w in plan} \
                | {_plot_name(metrics)}
            prefixes = "|".join([r"[a-z0-9_]+_[0-9]+", *GUIDANCE_METHODS])
            for name in os.listdir(out):
                if (re.fullmatch(rf"grid_(({prefixes})_)?w[0-9.e+-]+(_classifier)?\.png", name)
                        or name in ("fd_is.png", "fd_is_evaluations.png", "fd_is_methods.png")) \
                        and name not in planned:
                    os.remove(os.path.join(out, name))
        log(f"[{i + 1}/{len(plan)}] {kind if method is None else method} {sampler} {count} steps w={_w_name(w)}: "
            f"FD {point['fd']:.3f} (first {metrics['matched']}: {point['fd_matched']:.3f})  IS {point['is']:.3f}  "
            f"accuracy {point['accuracy']:.1%}  ({seconds:.0f} s)")
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


def _run_facts(device: torch.device, command: str | None) -> dict:
    """When and where a sweep ran (its timings and, through the CPU's or GPU's arithmetic, its last digits depend
    on both), and the command line where given."""
    import cfgfast

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cfgfast.build_info()['cpu']}, {torch.get_num_threads()} threads"
    facts = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": where,
             "torch": torch.__version__, "cfgfast": cfgfast.__version__}
    return facts if command is None else {**facts, "command": command}


def _ran_lines(metrics: dict) -> list[str]:
    """results.md's line on when, where and how the sweep ran (a metrics.json written without it: none)."""
    ran = metrics.get("ran")
    if ran is None:
        return []
    line = f"Ran {ran['date']} on {ran['device']} (torch {ran['torch']}, cfgfast {ran['cfgfast']})"
    return [line + (f": `{ran['command']}`." if "command" in ran else ".")]


def _scoring_lines(metrics: dict) -> list[str]:
    """How the points are scored, and the note on FD's bias (results.md's opening, after the sampling)."""
    fc, matched = metrics["feature_classifier"], metrics["matched"]
    return [
        f"Features: a small CNN trained on {fc['train_images']} real images ({fc['steps']} steps, seed {fc['seed']}; "
        f"held-out accuracy {fc['heldout_accuracy']:.2%} on {fc['heldout_images']}). FD: Fréchet distance of its "
        f"{fc['feature_dim']}-d penultimate features to those of its training images (lower is closer); IS: "
        "exp E KL(p(y|x) || p(y)) of its softmax (higher is more confident and balanced, at most K); accuracy: "
        "samples assigned to their intended class.",
        f"FD is biased upward at small sample counts: compare the real rows with `FD (first {matched})`, the FD of "
        f"as many samples as they hold. The seen real images belong to the set FD compares with, so their FD is "
        "almost all bias; the held-out ones are new to the feature classifier, as new digits from a model would be.",
    ]


def _incomplete_lines(metrics: dict) -> list[str]:
    if metrics.get("complete", True):
        return []
    return ["", f"**Incomplete: {len(metrics['points'])} of the {metrics['planned']} planned points** (the sweep was "
                "stopped, or is still running)."]


def _real_rows(metrics: dict, blanks: int) -> list[str]:
    """The table rows of the real held-out and seen images, with `blanks` empty cells after the first."""
    return [f"| {name} ({ref['images']} images) |{' |' * blanks} – | {ref['fd']:.3f} | {ref['is']:.3f} | "
            f"{ref['accuracy']:.1%} | – |"
            for name, ref in (("real held-out", metrics["reference"]["heldout"]),
                              ("real, seen by the feature classifier", metrics["reference"]["train"]))]


def results_markdown(metrics: dict) -> str:
    if metrics.get("methods"):
        return _methods_markdown(metrics)
    rows = _rows(metrics)
    matched = metrics["matched"]
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
        *_ran_lines(metrics),
        *_scoring_lines(metrics),
        *_incomplete_lines(metrics),
    ]
    for kind in GUIDANCE_KINDS:
        if not rows[kind]:
            continue
        title = "Classifier-free guidance" if kind == "classifier-free" else \
            f"Classifier guidance (noise-conditional classifier `{metrics['classifier']}`; w = 0 is shared)"
        lines += ["", f"## {title}", "",
                  f"| w | sampler | steps | FD ({metrics['num']} samples) | FD (first {matched}) | IS | accuracy | "
                  "seconds |",
                  "|---:|:---|---:|---:|---:|---:|---:|---:|"]
        lines += _real_rows(metrics, 2)
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
                   + (" (classifier guidance: the columns titled so)" if with_classifier else "")
                   + "; grey dashes: IS of real held-out images.")
    grids = "grid_w<w>" if len(runs) == 1 else "grid_<sampler>_<steps>_w<w>"
    lines += ["", f"![FD and IS]({_plot_name(metrics)})", "",
              f"{caption} Sample grids: `{grids}.png`" + (f" and `{grids}_classifier.png`" if with_classifier else "")
              + " (rows = classes).", ""]
    return "\n".join(lines)


def _method_settings(name: str, settings: dict) -> str:
    """A method's sample() keywords, as results.md lists them."""
    options = method_options(name, settings)
    given = [f"guidance={options['guidance']!r}" if name != "apg" else
             "guidance=cfgfast.APG(" + ", ".join(f"{key}={value:g}" for key, value in settings.items()) + ")"]
    if options["guidance_rescale"]:
        given.append(f"guidance_rescale={options['guidance_rescale']:g}")
    if options["threshold"] is not None:
        given.append(f"threshold=({', '.join(format(t, 'g') for t in options['threshold'])}), clip=None")
    return ", ".join(given)


METHOD_NOTES = {
    "cfg": "the paper's: x̃ from g = (1 + w) ε_c − w ε_u",
    "rescale": "g scaled per sample towards the standard deviation of ε_c (Lin et al. 2023; diffusers' "
               "rescale_noise_cfg)",
    "apg": "adaptive projected guidance (Sadat et al. 2024) on x̃_c − x̃_u: running value, norm limit, the part "
           "along x̃_c dropped",
    "cfgpp": "CFG++ (Chung et al. 2024): cfg's x̃, ddim's direction term from ε_u; its λ is 1 + w (the paper's "
             "range: λ in [0, 1])",
    "threshold": "dynamic thresholding (Imagen): x̃ clamped to [−s, s] and divided by s, s the p-quantile of "
                 "abs(x̃) clamped to [1, M] per sample, instead of the clip",
}


def _methods_markdown(metrics: dict) -> str:
    """results.md of a comparison of guidance methods: the methods' settings, then a row per (w, method)."""
    matched, run = metrics["matched"], metrics["runs"][0]
    methods = metrics["methods"]
    order = {name: i for i, name in enumerate(methods)}
    lines = [
        f"# Guidance methods against w on {metrics['dataset']}: FD, IS and accuracy",
        "",
        f"Model `{metrics['model']}`, {metrics['num']} samples per point (labels i mod K), sampler "
        f"{_sampler_name(run['sampler'], metrics['eta'])}, {run['steps']} steps"
        + (f", v = {metrics['v']}" if run["sampler"] == "ddpm" else "")
        + f", seed {metrics['seed']}; x̃ clipped to [-1, 1]"
        + (" but by `threshold`, which replaces the clip" if "threshold" in methods else "")
        + "; every point shares the same initial noise.",
        *_ran_lines(metrics),
        *_scoring_lines(metrics),
        *_incomplete_lines(metrics),
        "",
        "## The methods",
        "",
        "| method | `cfgfast.sample` settings | what it does |",
        "|:---|:---|:---|",
        *(f"| {name} | `{_method_settings(name, settings)}` | {METHOD_NOTES[name]} |"
          for name, settings in methods.items()),
        "",
        "## Scores",
        "",
        f"| w | method | FD ({metrics['num']} samples) | FD (first {matched}) | IS | accuracy | seconds |",
        "|---:|:---|---:|---:|---:|---:|---:|",
        *_real_rows(metrics, 1),
    ]
    # by w, then in the order the methods were given: each w's methods side by side
    for p in sorted(metrics["points"], key=lambda p: (p["w"], order[p["method"]])):
        lines.append(f"| {_w_name(p['w'])} | {p['method']} | {p['fd']:.3f} | {p['fd_matched']:.3f} | "
                     f"{p['is']:.3f} | {p['accuracy']:.1%} | {p['seconds']:.0f} |")
    lines += ["", f"![FD, IS and accuracy]({_plot_name(metrics)})", "",
              f"FD ({metrics['num']} samples), IS and accuracy against w, one line per method; grey dashes: real "
              "held-out images. Sample grids: `grid_<method>_w<w>.png` (rows = classes).", ""]
    return "\n".join(lines)


def write_results(out: str, metrics: dict) -> None:
    """results.md, metrics.json and the plot in out, each written atomically."""
    with atomic_open(os.path.join(out, "metrics.json")) as f:
        f.write((json.dumps(metrics, indent=2) + "\n").encode())
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(results_markdown(metrics).encode())
    plot_metrics(metrics, out)


# --- the plot ---------------------------------------------------------------------------------------------------

GUIDANCE_STYLE = {"classifier-free": ("C0", "o"), "classifier": ("C1", "s")}
SAMPLER_STYLE = {"ddpm": ("C0", "o"), "ddim": ("C1", "s"), "dpmpp_2m": ("C2", "^"), "dpmpp_2m_sde": ("C3", "D")}
METHOD_STYLE = {"cfg": ("C0", "o"), "rescale": ("C1", "s"), "apg": ("C2", "^"), "cfgpp": ("C3", "D"),
                "threshold": ("C4", "v")}


def plot_metrics(metrics: dict, out_folder: str) -> str:
    """Draw a sweep's metrics (metrics.json's dict) into out_folder: fd_is.png (FD and IS against w) for a sweep of
    one run, fd_is_evaluations.png (against model evaluations, one line per sampler, one column per w) for several,
    fd_is_methods.png (FD, IS and accuracy against w, one line per guidance method) for a comparison of methods.
    Written atomically; returns the path."""
    if "runs" not in metrics:
        # a single-run metrics.json may name its steps at the top and its points without sampler or steps
        metrics = {"eta": 0.0, **metrics, "runs": [{"sampler": "ddpm", "steps": metrics["steps"]}],
                   "points": [{"sampler": "ddpm", "steps": metrics["steps"], **p} for p in metrics["points"]]}
    if metrics.get("methods"):
        fig = _plot_methods(metrics)
    else:
        fig = _plot_w(metrics) if len(metrics["runs"]) == 1 else _plot_evaluations(metrics)
    path = os.path.join(out_folder, _plot_name(metrics))
    save_figure(path, fig)
    return path


def _plot_w(metrics: dict):
    """FD and IS against w side by side, a line per guidance kind."""
    rows = _rows(metrics)
    run = metrics["runs"][0]
    fig = figure(10, 4.2, 110, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("fd", "is")):
        for i, (kind, (color, marker)) in enumerate(GUIDANCE_STYLE.items()):
            points = sorted((w, p[key]) for (_, _, w), p in rows[kind].items())
            if points:  # the shared w = 0 point: classifier-free on top, smaller, so both show
                ax.plot(*zip(*points), color=color, marker=marker, markersize=5 + 1.5 * i, zorder=3 - i,
                        label=f"{kind} guidance")
        ax.set(xlabel="guidance strength w", ylabel=_y_label(metrics, key), title=key.upper())
        ax.grid(color="0.92")
    _real_is_line(axes[1], metrics)
    fig.legend(*_legend_entries(axes), loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"FD and IS against w on {metrics['dataset']}: model {metrics['model']}, "
                 f"{_sampler_name(run['sampler'], metrics['eta'])} {run['steps']} steps, "
                 f"{metrics['num']} samples per point, seed {metrics['seed']}")
    return fig


def _plot_evaluations(metrics: dict):
    """FD (top row) and IS (bottom row) against model evaluations on a log axis, a line per sampler, a column per
    (guidance kind, w)."""
    rows = _rows(metrics)
    samplers = list(dict.fromkeys(run["sampler"] for run in metrics["runs"]))
    # classifier guidance at w = 0 is classifier-free's w = 0 column over again
    columns = sorted({(kind, w) for kind in rows for (_, _, w) in rows[kind] if kind == "classifier-free" or w},
                     key=lambda c: (GUIDANCE_KINDS.index(c[0]), c[1]))
    steps = sorted({run["steps"] for run in metrics["runs"]})
    fig = figure(max(6.5, 1.2 + 3.3 * len(columns)), 7.5, 110, layout="constrained")
    axes = fig.subplots(2, len(columns), sharex=True, sharey="row", squeeze=False)  # columns compared at a glance
    for row, key in enumerate(("fd", "is")):
        for col, (kind, w) in enumerate(columns):
            ax = axes[row, col]
            # the first sampler drawn on top with the smallest marker, so coinciding points all stay visible
            for i, sampler in enumerate(samplers):
                points = sorted((n, p[key]) for (s, n, w2), p in rows[kind].items() if s == sampler and w2 == w)
                color, marker = SAMPLER_STYLE.get(sampler, (f"C{i}", "o"))
                if points:
                    ax.plot(*zip(*points), color=color, marker=marker, markersize=5 + 1.5 * i,
                            zorder=3 + len(samplers) - i, label=_sampler_name(sampler, metrics["eta"]))
            ax.set_xscale("log")
            ax.set_xticks(steps, [str(n) for n in steps])
            ax.minorticks_off()  # ticked at the step counts swept alone
            ax.grid(color="0.92")
            if row == 0:
                ax.set_title(f"w = {_w_name(w)}" + ("" if kind == "classifier-free" else ", classifier guidance"))
            else:
                ax.set_xlabel("model evaluations (steps)")
            if col == 0:
                ax.set_ylabel(_y_label(metrics, key))
    for ax in axes[1]:
        _real_is_line(ax, metrics)
    handles, labels = _legend_entries(axes.flat)
    fig.legend(handles, labels, loc="outside lower center", ncols=2 if len(columns) == 1 else len(labels),
               frameon=False)
    fig.suptitle(f"FD and IS against model evaluations on {metrics['dataset']}\nmodel {metrics['model']}, "
                 f"{metrics['num']} samples per point, seed {metrics['seed']}")
    return fig


def _plot_methods(metrics: dict):
    """FD, IS and accuracy against w side by side, a line per guidance method."""
    run = metrics["runs"][0]
    methods = list(metrics["methods"])
    fig = figure(14, 4.4, 110, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("fd", "is", "accuracy")):
        # the first method drawn on top with the smallest marker, so coinciding points all stay visible
        for i, method in enumerate(methods):
            points = sorted((p["w"], 100 * p[key] if key == "accuracy" else p[key])
                            for p in metrics["points"] if p["method"] == method)
            color, marker = METHOD_STYLE.get(method, (f"C{i}", "o"))
            if points:
                ax.plot(*zip(*points), color=color, marker=marker, markersize=5 + 1.5 * i,
                        zorder=3 + len(methods) - i, label=method)
        ax.set(xlabel="guidance strength w", ylabel=_y_label(metrics, key),
               title="accuracy" if key == "accuracy" else key.upper())
        ax.set_xticks(sorted({p["w"] for p in metrics["points"]}))
        ax.grid(color="0.92")
    _real_is_line(axes[1], metrics)
    _real_accuracy_line(axes[2], metrics)
    fig.legend(*_legend_entries(axes), loc="outside lower center", ncols=len(methods) + 2, frameon=False)
    fig.suptitle(f"Guidance methods: FD, IS and accuracy against w on {metrics['dataset']}: model {metrics['model']}, "
                 f"{_sampler_name(run['sampler'], metrics['eta'])} {run['steps']} steps, {metrics['num']} samples "
                 f"per point, seed {metrics['seed']}")
    return fig


def _real_accuracy_line(ax, metrics: dict) -> None:
    """The accuracy of the real held-out images as a grey dashed line (the feature classifier's own held-out
    accuracy), the axis kept to the samples' range as _real_is_line keeps IS's."""
    real = 100 * metrics["reference"]["heldout"]["accuracy"]
    low, high = ax.get_ylim()
    where = "" if low <= real <= high else " (below the axis)" if real < low else " (above the axis)"
    ax.axhline(real, color="0.5", linestyle="--", linewidth=1.2,
               label=f"real held-out images: accuracy {real:.1f}%{where}")
    ax.set_ylim(low, high)


def _y_label(metrics: dict, key: str) -> str:
    if key == "accuracy":
        return "accuracy, % (samples of their intended class)"
    return f"FD ({metrics['num']} samples; lower is closer)" if key == "fd" else "IS (higher is better)"


def _real_is_line(ax, metrics: dict) -> None:
    """The IS of the real held-out images as a grey dashed line; the axis keeps to the samples' range, so a line
    outside it is said so in its legend entry. (No such line in the FD panels: the held-out FD holds fewer images
    than the samples, so the two are not comparable.)"""
    real = metrics["reference"]["heldout"]
    low, high = ax.get_ylim()
    where = "" if low <= real["is"] <= high else " (below the axis)" if real["is"] < low else " (above the axis)"
    ax.axhline(real["is"], color="0.5", linestyle="--", linewidth=1.2,
               label=f"real held-out images: IS {real['is']:.3f}{where}")
    ax.set_ylim(low, high)


def _legend_entries(axes) -> tuple[list, list]:
    """Each label once, over all the axes."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries.keys())
