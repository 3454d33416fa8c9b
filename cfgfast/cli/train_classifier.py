"""`cfgfast train-classifier`: the noise-conditional classifier p_φ(c | z_λ) of classifier guidance, trained on
z_λ = α x + σ ε with λ from training_lambdas, on a seeded 80% of the dataset; prints and stores its held-out
accuracy at a few λ.

The classifier shipped beside the bundled model was made with exactly:

    cfgfast train-classifier --dataset digits --out cfgfast/models/weights/digits_classifier.pt
"""

from __future__ import annotations

import time

from cfgfast.cli.common import refuse_existing, writable_path

REPORT_LAMBDAS = (-6.0, -3.0, 0.0, 3.0, 6.0, 20.0)  # λ at which the held-out accuracy is reported


def run(args) -> int:
    from cfgfast.data import load_dataset
    from cfgfast.models.classifier import (ClassifierConfig, accuracy, heldout_split, save_classifier,
                                           train_classifier)

    from cfgfast import _checks

    out = writable_path(args.out)
    for name in ("steps", "width"):
        _checks.integer(name, getattr(args, name), low=1)
    _checks.integer("batch_size", args.batch_size, low=1, high=_checks.MAX_BATCH)
    if args.width % ClassifierConfig.groups:
        raise ValueError(f"--width must be a multiple of {ClassifierConfig.groups} (the group norm's groups), got "
                         f"{args.width}")
    refuse_existing(out, args.overwrite)
    _checks.seed(args.seed)  # before the held-out split draws with it
    if not _checks.real("lr", args.lr) > 0:
        raise ValueError(f"lr must be positive, got {args.lr}")
    data = load_dataset(args.dataset)
    if data.images.shape[-1] != data.images.shape[-2]:
        raise ValueError(f"--dataset {args.dataset}: images must be square, got {tuple(data.images.shape[-2:])}")
    config = ClassifierConfig(image_size=data.images.shape[-1], in_channels=data.images.shape[1],
                              num_classes=data.num_classes, width=args.width, noise_conditional=True)
    train, heldout = heldout_split(data.labels, 0.2, args.seed)
    print(f"cfgfast train-classifier: {data.name}, {len(train)} training and {len(heldout)} held-out images of shape "
          f"{tuple(data.images.shape[1:])}, {data.num_classes} classes; {args.steps} steps of batch {args.batch_size}")
    start = time.perf_counter()
    clf = train_classifier(config, data.images[train], data.labels[train], steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=print)
    seconds = time.perf_counter() - start
    heldout_accuracy = {format(lam, "g"): accuracy(clf, data.images[heldout], data.labels[heldout], lam, args.seed)
                        for lam in REPORT_LAMBDAS}
    print("held-out accuracy of z_lambda: " + ", ".join(f"lambda={k}: {v:.1%}" for k, v in heldout_accuracy.items()))
    save_classifier(out, clf, dataset=data.name, class_names=list(data.class_names), steps=args.steps,
                    seed=args.seed, heldout_accuracy=heldout_accuracy)
    print(f"wrote {out} ({seconds:.0f} s)")
    return 0


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="train the noise-conditional classifier p(c | z_lambda) for classifier guidance")
    p.add_argument("--dataset", required=True, help="digits, a folder with one subfolder per class, or FILE.npz")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out where it exists (without it: an error)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    p.add_argument("--width", type=int, default=32, help="channels of the first level, a multiple of 8 (default 32)")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights, batches, noise and the held-out split (default 0)")
    p.set_defaults(run=run)
