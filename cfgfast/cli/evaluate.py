"""`cfgfast evaluate`: the w sweep (the paper's Figure 4 and Table 1 at digits scale). FD, IS and class accuracy
of guided samples, in the feature space of a classifier trained here on real images, for classifier-free guidance
and (with a noise-conditional classifier) classifier guidance; writes results.md, metrics.json, fd_is.png and a
sample grid per w into --out."""

from __future__ import annotations

import os

from cfgfast.cli.common import finite_float
from cfgfast.evaluate import DEFAULT_WS, FEATURE_STEPS


# names in the library's errors that differ from this command's flags
ERROR_NAMES = {"ws": "--w", "data": "--dataset"}


def run(args) -> int:
    import torch

    from cfgfast.data import load_dataset
    from cfgfast.evaluate import check_options, sweep
    from cfgfast.models.checkpoint import load_model
    from cfgfast.models.classifier import load_classifier

    check_options(args.w, args.num, args.steps, args.batch_size, args.feature_steps, args.v, args.seed)
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
    classifier_spec = args.classifier or ("digits" if args.model == "digits" else "none")
    classifier = None if classifier_spec == "none" else load_classifier(classifier_spec)
    data = load_dataset(args.dataset)
    print(f"cfgfast evaluate: model {args.model}, classifier {classifier_spec}, {args.num} samples per point, "
          f"{args.steps} steps, w = {' '.join(format(w, 'g') for w in args.w)}, on {device}")
    sweep(model, data, out, ws=args.w, num=args.num, steps=args.steps, classifier=classifier,
          model_name=args.model, classifier_name=None if classifier is None else classifier_spec, seed=args.seed,
          batch_size=args.batch_size, feature_steps=args.feature_steps, v=args.v)
    print(f"wrote {os.path.join(args.out, 'results.md')}, metrics.json, fd_is.png and grid_w*.png")
    return 0


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="FD and IS against w for classifier-free and classifier guidance")
    p.add_argument("--model", required=True, help="digits (the bundled model) or a checkpoint from cfgfast train")
    p.add_argument("--classifier", help="noise-conditional classifier for classifier guidance: digits, a checkpoint "
                                        "from cfgfast train-classifier, or none (default: digits with --model "
                                        "digits, else none)")
    p.add_argument("--dataset", default="digits", help="the real images the model was trained on (default digits)")
    p.add_argument("--num", type=int, default=1000, help="samples per point, labels i mod K (default 1000)")
    p.add_argument("--steps", type=int, default=256, help="sampling steps (default 256)")
    p.add_argument("--w", type=finite_float, nargs="+", default=list(DEFAULT_WS),
                   help="guidance strengths (default " + " ".join(format(w, "g") for w in DEFAULT_WS) + ")")
    p.add_argument("--v", type=finite_float, default=0.3, help="variance interpolation (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise and the feature classifier (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per sampling batch (default 500)")
    p.add_argument("--feature-steps", type=int, default=FEATURE_STEPS,
                   help=f"training steps of the feature classifier (default {FEATURE_STEPS})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", required=True,
                   help="folder to write (created if missing; an earlier sweep's grid_w*.png there are removed)")
    p.set_defaults(run=run)
