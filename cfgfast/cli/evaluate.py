"""`cfgfast evaluate`: the w sweep (the paper's Figure 4 and Table 1 at digits scale). FD, IS and class accuracy
of guided samples, in the feature space of a classifier trained here on real images, for classifier-free guidance
and (with a noise-conditional classifier) classifier guidance, for each sampler at each step count; writes
results.md, metrics.json, the plot (fd_is.png against w, or fd_is_evaluations.png against steps when several
samplers or step counts are swept) and a sample grid per point into --out. With --guidance, the guidance methods
named there are compared instead, each at each w (fd_is_methods.png: FD, IS and accuracy against w)."""

from __future__ import annotations

import argparse
import os
import shlex

from cfgfast.cli.common import finite_float
from cfgfast.evaluate import DEFAULT_WS, FEATURE_STEPS, GUIDANCE_METHODS
from cfgfast.samplers import SAMPLERS


# names in the library's errors that differ from this command's flags
ERROR_NAMES = {"ws": "--w", "data": "--dataset", "samplers": "--sampler", "methods": "--guidance",
               "methods['rescale']['guidance_rescale']": "--guidance-rescale",
               "methods['threshold']['threshold']": "--threshold",
               **{f"methods['apg'][{key!r}]": "--apg-" + key.replace("_", "-") for key in GUIDANCE_METHODS["apg"]}}
# each method setting's flag: (the method it sets, the setting's name there)
METHOD_FLAGS = {"guidance_rescale": ("rescale", "guidance_rescale"), "threshold": ("threshold", "threshold"),
                **{f"apg_{key}": ("apg", key) for key in GUIDANCE_METHODS["apg"]}}


def sampler_list(text: str) -> list[str]:
    """An argparse type: comma-separated sampler names, each one of cfgfast's."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {', '.join(SAMPLERS)}, got "
                                         f"{', '.join(map(repr, unknown))}")
    return names


def method_list(text: str) -> list[str]:
    """An argparse type: comma-separated guidance method names, each one of GUIDANCE_METHODS, each once."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in GUIDANCE_METHODS]
    repeated = list(dict.fromkeys(name for name in names if names.count(name) > 1))
    if unknown or repeated:
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated names from {', '.join(GUIDANCE_METHODS)}, "
                                         f"got {', '.join(map(repr, unknown))}{' and ' if unknown and repeated else ''}"
                                         + "".join(f"{name!r} {names.count(name)} times" for name in repeated[:1]))
    return names


def methods_with_settings(args) -> dict[str, dict] | None:
    """--guidance's methods as {name: settings given by flags} (None without --guidance); a flag of a method that
    --guidance does not name is refused."""
    for flag, (method, _) in METHOD_FLAGS.items():
        if getattr(args, flag) is not None and method not in (args.guidance or []):
            option = "--" + flag.replace("_", "-")
            raise ValueError(f"{option} is a setting of the {method} method: give --guidance with {method} among its "
                             f"methods, got --guidance {','.join(args.guidance) if args.guidance else '(none)'}")
    if args.guidance is None:
        return None
    if "cfgpp" in args.guidance and args.sampler != ["ddim"]:
        others = [name for name in args.guidance if name != "cfgpp"] or ["cfg"]
        raise ValueError(f"--guidance cfgpp (CFG++) is a form of --sampler ddim only, got --sampler "
                         f"{','.join(args.sampler)}: give --sampler ddim, or --guidance {','.join(others)}")
    if args.classifier not in (None, "none"):
        raise ValueError(f"--classifier must be none with --guidance (the methods compared are all classifier-free "
                         f"guidance), got {args.classifier}")
    methods = {name: {} for name in args.guidance}
    for flag, (method, key) in METHOD_FLAGS.items():
        if getattr(args, flag) is not None:
            methods[method][key] = getattr(args, flag)
    return methods


def step_counts(text: str) -> tuple[str | None, list[int]]:
    """An argparse type: "10,20,50" (for every sampler) or "SAMPLER=10,20,50" (for that one): (sampler, counts)."""
    sampler, _, counts = text.rpartition("=")
    try:
        values = [int(c) for c in counts.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated step counts, optionally after SAMPLER=, such as "
                                         f"10,20,50 or ddpm=256, got {text!r}") from None
    if sampler and sampler not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"must name a sampler from {', '.join(SAMPLERS)} before '=', got "
                                         f"{sampler!r}")
    return sampler or None, values


def steps_by_sampler(samplers: list[str], items: list[tuple[str | None, list[int]]]) -> dict[str, list[int]]:
    """--steps' items as {sampler: counts}: a SAMPLER= item for that sampler, the bare list for the others."""
    bare = [counts for sampler, counts in items if sampler is None]
    named = {sampler: counts for sampler, counts in items if sampler is not None}
    if len(bare) > 1 or len(named) + len(bare) != len(items):
        raise ValueError("--steps must give one list for all samplers and at most one SAMPLER=list for each, got "
                         f"{len(bare)} lists and {len(items) - len(bare)} SAMPLER=lists")
    extra = [sampler for sampler in named if sampler not in samplers]
    missing = [sampler for sampler in samplers if sampler not in named and not bare]
    if extra or missing:
        raise ValueError(f"--steps must give step counts for each sampler of --sampler ({', '.join(samplers)}) "
                         f"and no other, got {', '.join(extra) or 'none'} beyond them"
                         f"{' and none for ' + ', '.join(missing) if missing else ''}")
    return {sampler: named.get(sampler, bare[0] if bare else None) for sampler in samplers}


def run(args) -> int:
    import torch

    from cfgfast.data import load_dataset
    from cfgfast.evaluate import check_methods, check_options, sweep
    from cfgfast.models.checkpoint import load_model
    from cfgfast.models.classifier import load_classifier

    steps = steps_by_sampler(args.sampler, args.steps)
    _, _, _, runs, _ = check_options(args.w, args.num, steps, args.batch_size, args.feature_steps, args.v, args.seed,
                                     args.sampler, args.eta)
    methods = methods_with_settings(args)
    if methods is not None:
        methods = check_methods(methods, runs)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out must be a folder, got the file {args.out}")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"--out: folder {os.path.dirname(out)} does not exist")
    if not os.access(out if os.path.isdir(out) else os.path.dirname(out), os.W_OK):
        raise ValueError(f"--out: {args.out} is not writable")
    from cfgfast._checks import resolve_device

    try:  # cpu, cuda or cuda:N, present on this machine
        device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device}")
    model = load_model(args.model).to(device)
    # the shipped noise-conditional classifier goes with the shipped model
    classifier_spec = args.classifier or ("digits" if args.model == "digits" and methods is None else "none")
    classifier = None if classifier_spec == "none" else load_classifier(classifier_spec)
    data = load_dataset(args.dataset)
    print(f"cfgfast evaluate: model {args.model}, classifier {classifier_spec}, {args.num} samples per point, "
          f"{', '.join(f'{sampler} {count}' for sampler, count in runs)} steps, "
          f"w = {' '.join(format(w, 'g') for w in args.w)}"
          + ("" if methods is None else f", guidance {', '.join(methods)}") + f", on {device}")
    sweep(model, data, out, ws=args.w, num=args.num, steps=steps, samplers=args.sampler, eta=args.eta,
          classifier=classifier, model_name=args.model,
          classifier_name=None if classifier is None else classifier_spec, seed=args.seed,
          batch_size=args.batch_size, feature_steps=args.feature_steps, v=args.v, methods=methods,
          command=shlex.join(["cfgfast", *args.argv]))
    plot = "fd_is_methods.png" if methods is not None else "fd_is.png" if len(runs) == 1 else "fd_is_evaluations.png"
    print(f"wrote {os.path.join(args.out, 'results.md')}, metrics.json, {plot} and grid_*.png")
    return 0


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="FD and IS against w for classifier-free and classifier guidance")
    p.add_argument("--model", required=True, help="digits (the bundled model) or a checkpoint from cfgfast train")
    p.add_argument("--classifier", help="noise-conditional classifier for classifier guidance: digits, a checkpoint "
                                        "from cfgfast train-classifier, or none (default: digits with --model "
                                        "digits, else none)")
    p.add_argument("--dataset", default="digits", help="the real images the model was trained on (default digits)")
    p.add_argument("--num", type=int, default=1000, help="samples per point, labels i mod K (default 1000)")
    p.add_argument("--sampler", type=sampler_list, default=["ddpm"],
                   help=f"comma-separated samplers to compare, from {', '.join(SAMPLERS)} (default ddpm)")
    p.add_argument("--steps", type=step_counts, nargs="+", default=[(None, [256])],
                   help="comma-separated step counts (model evaluations) for every sampler, and SAMPLER=counts for "
                        "one, e.g. --steps 10,20,50 ddpm=256 (default 256)")
    p.add_argument("--eta", type=finite_float, default=0.0,
                   help="ddim's noise eta in [0, 1] (default 0: deterministic); needs ddim in --sampler")
    apg, (p_default, m_default) = GUIDANCE_METHODS["apg"], GUIDANCE_METHODS["threshold"]["threshold"]
    p.add_argument("--guidance", type=method_list, metavar="METHODS",
                   help="compare guidance methods instead, comma-separated, each at each w (one sampler at one step "
                        "count, no classifier): cfg (the paper's), rescale (cfg with guidance rescale), apg (adaptive "
                        "projected guidance), cfgpp (CFG++, with --sampler ddim), threshold (dynamic thresholding "
                        "instead of the clip); the flags below change their settings")
    p.add_argument("--guidance-rescale", type=finite_float, metavar="PHI",
                   help="the rescale method's phi in [0, 1] (default "
                        f"{GUIDANCE_METHODS['rescale']['guidance_rescale']:g}, as diffusers recommends)")
    p.add_argument("--apg-eta-parallel", type=finite_float, metavar="ETA",
                   help="the apg method's weight of the part along the conditional prediction, in [0, 1] (default "
                        f"{apg['eta_parallel']:g})")
    p.add_argument("--apg-norm-threshold", type=finite_float, metavar="RHO",
                   help="the apg method's largest update norm per sample (0: none; default "
                        f"{apg['norm_threshold']:g})")
    p.add_argument("--apg-momentum", type=finite_float, metavar="BETA",
                   help=f"the apg method's momentum in (-1, 1) (0: none; default {apg['momentum']:g})")
    p.add_argument("--threshold", type=finite_float, nargs=2, metavar=("P", "M"),
                   help="the threshold method's quantile P of |x| in (0, 1] and largest divisor M >= 1 (M = 1: "
                        f"the clip again; default {p_default:g} {m_default:g})")
    p.add_argument("--w", type=finite_float, nargs="+", default=list(DEFAULT_WS),
                   help="guidance strengths (default " + " ".join(format(w, "g") for w in DEFAULT_WS) + ")")
    p.add_argument("--v", type=finite_float, default=0.3, help="ddpm's variance interpolation (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise and the feature classifier (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampling batch (default 500)")
    p.add_argument("--feature-steps", type=int, default=FEATURE_STEPS,
                   help=f"training steps of the feature classifier (default {FEATURE_STEPS})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", required=True,
                   help="folder to write (created if missing; an earlier sweep's grid_*.png and plot there are "
                        "removed)")
    p.set_defaults(run=run)
