"""`cfgfast sample`: N guided samples of a class-conditional model into one ADM-format .npz (arr_0 uint8
[N, H, W, C], arr_1 int64 labels), optionally a PNG grid; resumable, and split over ranks under torchrun.

Shards: the global sample indices are cut into batches of --batch-size, [0, B), [B, 2B), ...; each batch is
written atomically to FILE.npz.parts/<start>-<end>.npy beside a manifest.json of the configuration. When all
are there, rank 0 joins them into FILE.npz (atomic) and removes the folder. Sample i is the same whichever
process draws it (cfgfast.sample's index_offset), so --resume may run with any number of processes, and the
file equals that of one uninterrupted single-process run with the same --batch-size, byte for byte.

Under torchrun put `--` before `sample` (torchrun's own parser would take --num and --v for abbreviations of
its --numa-binding and --virtual-local-rank):

    torchrun --nproc_per_node K -m cfgfast -- sample --model digits --num N --w W --out FILE.npz"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

from cfgfast import _checks
from cfgfast.cli.common import FLOAT32_MAX, refuse_existing, writable_path
from cfgfast.guidance import APG
from cfgfast.samplers import SAMPLERS

PARTS_FORMAT = "cfgfast-sample-parts"
PARTS_VERSION = 1
DEFAULT_BATCH_SIZE = 64
GUIDANCES = ("cfg", "cfgpp", "apg")
SHARD_NAME = re.compile(r"^\d{10}-\d{10}\.npy$")
# manifest key -> the option it comes from, to name what differs on a refused --resume
MANIFEST_OPTIONS = {"model_sha256": "--model", "num": "--num", "w": "--w", "steps": "--steps",
                    "sampler": "--sampler", "guidance": "--guidance", "guidance_rescale": "--guidance-rescale",
                    "apg": "--apg-eta-parallel, --apg-norm-threshold, --apg-momentum", "threshold": "--threshold",
                    "eta": "--eta", "v": "--v", "seed": "--seed", "clip": "--clip",
                    "labels": "--labels", "batch_size": "--batch-size", "guidance_interval": "--guidance-interval",
                    "shape": "image shape"}
GRID_MAX = 16  # at most 16 classes x 16 samples in the PNG grid
GRID_PIXELS = 64  # small images are enlarged to about this many pixels a side


class _World:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.size > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL's object collectives use the current device
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    def agree(self, error: Exception | None, plan):
        """Raise any rank's error on every rank (so none waits forever for one that stopped), else return
        rank 0's plan."""
        if self.size == 1:
            if error is not None:
                raise error
            return plan
        import torch.distributed as dist

        errors = [None] * self.size
        dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
        for found in errors:
            if found is not None:
                kind, message = found
                raise (TypeError if kind == "TypeError" else ValueError)(message)
        shared = [plan]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def gather(self, images: np.ndarray, rows: int) -> list[np.ndarray] | None:
        """Every rank's images (padded to `rows` for the collective) on rank 0; None elsewhere."""
        if self.size == 1:
            return [images]
        import torch.distributed as dist

        buffer = torch.zeros((rows,) + images.shape[1:], dtype=torch.uint8, device=self.device)
        buffer[:len(images)] = torch.from_numpy(images).to(self.device)
        buffers = [torch.empty_like(buffer) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(buffer, buffers, dst=0)
        return None if buffers is None else [b.cpu().numpy() for b in buffers]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank under torchrun
    return torch.device("cpu")


def _check_options(args) -> None:
    """Everything about the options that needs no model or file, so a mistake stops the run at once."""
    if not 1 <= args.num <= 2**32:
        raise ValueError(f"--num must be in [1, 2^32] (a sample's index is a 32-bit counter word), got {args.num}")
    if args.max_batch is not None:
        _checks.integer("max_batch", args.max_batch, low=1)
    if args.guidance_interval is not None:
        lo, hi = args.guidance_interval
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"--guidance-interval must be two finite numbers LAM_LO <= LAM_HI, got {lo} {hi}")
    if args.batch_size is not None:
        _checks.integer("batch_size", args.batch_size, low=1)
    _checks.steps(args.steps)
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler}")
    if args.guidance not in GUIDANCES:
        raise ValueError(f"--guidance must be one of {', '.join(GUIDANCES)}, got {args.guidance}")
    apg_given = [name for name in ("apg_eta_parallel", "apg_norm_threshold", "apg_momentum")
                 if getattr(args, name) is not None]
    if apg_given and args.guidance != "apg":
        raise ValueError(f"--{apg_given[0].replace('_', '-')} is a setting of --guidance apg, got --guidance "
                         f"{args.guidance}")
    args.apg = None
    if args.guidance == "apg":
        try:
            args.apg = APG(*(0.0 if getattr(args, name) is None else getattr(args, name)
                             for name in ("apg_eta_parallel", "apg_norm_threshold", "apg_momentum")))
        except ValueError as error:  # name the option, not the argument of cfgfast.APG
            option = {"eta_parallel": "--apg-eta-parallel", "norm_threshold": "--apg-norm-threshold",
                      "momentum": "--apg-momentum"}
            message = str(error)
            for name, flag in option.items():
                message = message.replace(f"APG {name}", flag)
            raise ValueError(message) from None
    if args.threshold is not None:
        p, bound = args.threshold
        if not 0.0 < p <= 1.0:
            raise ValueError(f"--threshold's P (the quantile of |x~|) must lie in (0, 1], got {p}")
        if not (1.0 <= bound <= FLOAT32_MAX):
            raise ValueError(f"--threshold's M (the largest s) must be at least 1 and finite in float32, got {bound}")
        if args.clip is not None:
            raise ValueError("--threshold replaces --clip (dynamic thresholding clamps x~ itself): give one")
    if args.guidance == "cfgpp" and args.sampler != "ddim":
        raise ValueError(f"--guidance cfgpp (CFG++) is a form of --sampler ddim only, got --sampler {args.sampler}")
    if args.v is not None and not 0.0 <= args.v <= 1.0:
        raise ValueError(f"--v must be in [0, 1], got {args.v}")
    if args.v is not None and args.sampler != "ddpm":
        raise ValueError(f"--v is a setting of --sampler ddpm only, got --sampler {args.sampler}")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise ValueError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    if args.eta != 0.0 and args.sampler != "ddim":
        raise ValueError(f"--eta is a setting of --sampler ddim only, got --sampler {args.sampler}")
    if not (math.isfinite(args.w) and abs(args.w) <= FLOAT32_MAX):
        raise ValueError(f"--w must be finite in float32 (|w| <= 3.4e38), got {args.w}")
    if args.clip is None:
        args.clip = "auto"  # the model's data range
    elif not (args.clip >= 0 and math.isfinite(args.clip) and args.clip <= FLOAT32_MAX):
        raise ValueError(f"--clip must be positive and finite in float32 (or 0 for no clipping), got {args.clip}")
    else:
        args.clip = args.clip or None
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2^64), got {args.seed}")
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must name a .npz file (the ADM sample format), got {args.out}")
    if args.grid is not None and not args.grid.lower().endswith(".png"):
        raise ValueError(f"--grid must name a .png file, got {args.grid}")
    if args.grid is not None:
        from cfgfast._images import pillow

        pillow()  # a missing Pillow is told before sampling, not after it


def _model_sha256(spec: str) -> str:
    from cfgfast.models.checkpoint import PRETRAINED, pretrained_path

    digest = hashlib.sha256()
    with open(pretrained_path(spec) if spec in PRETRAINED else spec, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _label_of(args, num_classes: int):
    """Global sample index -> class: --labels cycled, or i mod num_classes (SPEC §4)."""
    cycle = args.labels if args.labels else list(range(num_classes))
    return lambda start, end: torch.tensor([cycle[i % len(cycle)] for i in range(start, end)], dtype=torch.int64)


def _shard_name(start: int, end: int) -> str:
    return f"{start:010d}-{end:010d}.npy"


def _shards(num: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, num)) for start in range(0, num, batch_size)]


def _shown(key: str, value) -> str:
    if value is None:
        return "unset"
    return f"sha256 {value[:12]}" if key == "model_sha256" else repr(value)


def _finished(args, parts: str, manifest: dict) -> list[tuple[int, int]]:
    """The shards an interrupted run in `parts` finished, once its manifest matches ([] for a fresh run).
    Fills in manifest["batch_size"]: the option's, else the interrupted run's, else the default."""
    if not os.path.exists(parts):
        manifest["batch_size"] = manifest["batch_size"] or DEFAULT_BATCH_SIZE
        return []
    if not args.resume:
        raise ValueError(f"--out: {parts} holds an interrupted run; add --resume to finish it, or delete the "
                         "folder to start over")
    try:
        with open(os.path.join(parts, "manifest.json")) as f:
            found = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--resume: {parts} has no readable manifest.json ({exc}); delete the folder to start "
                         "over") from None
    if not isinstance(found, dict) or found.get("format") != PARTS_FORMAT or found.get("version") != PARTS_VERSION:
        raise ValueError(f"--resume: {parts}/manifest.json is not a {PARTS_FORMAT} manifest of version "
                         f"{PARTS_VERSION}; delete the folder to start over")
    batch, shape = found.get("batch_size"), found.get("shape")
    if type(batch) is not int or batch < 1 or not isinstance(shape, list) or len(shape) != 3 \
            or any(type(n) is not int or n < 1 for n in shape):
        raise ValueError(f"--resume: {parts}/manifest.json is damaged (batch_size {batch!r}, shape {shape!r}); delete "
                         "the folder to start over")
    manifest["batch_size"] = manifest["batch_size"] or batch
    differ = [f"{option} {_shown(key, found.get(key))} there, {_shown(key, manifest[key])} now"
              for key, option in MANIFEST_OPTIONS.items() if found.get(key) != manifest[key]]
    if differ:
        raise ValueError(f"--resume: {parts} was written by a run with another configuration ("
                         + "; ".join(differ) + "); give the same options, or delete the folder to start over")
    expected = _shards(args.num, manifest["batch_size"])
    present = {name for name in os.listdir(parts) if SHARD_NAME.match(name)}
    strangers = present - {_shard_name(*s) for s in expected}
    if strangers:
        raise ValueError(f"--resume: {parts} holds shards this configuration does not make ({min(strangers)}); "
                         "the folder was changed by hand: delete it to start over")
    done = [s for s in expected if _shard_name(*s) in present]
    for start, end in done:  # each readable, of its shape (mapped, not read): found now, not after the sampling
        _read_shard(os.path.join(parts, _shard_name(start, end)), end - start, tuple(found["shape"]), mmap_mode="r")
    return done


def _create_parts(parts: str, manifest: dict) -> None:
    """The parts folder with its manifest, made under a temporary name and renamed: it exists whole or not."""
    folder = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(parts)), prefix=".tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        os.rename(folder, parts)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _join(parts: str, shards: list[tuple[int, int]], image_shape: tuple) -> np.ndarray:
    """The shard files as one array [N, H, W, C]."""
    images = np.empty((shards[-1][1],) + image_shape, dtype=np.uint8)
    for start, end in shards:
        images[start:end] = _read_shard(os.path.join(parts, _shard_name(start, end)), end - start, image_shape)
    return images


def _read_shard(path: str, count: int, image_shape: tuple, mmap_mode=None) -> np.ndarray:
    """The shard at path: uint8 [count, *image_shape], or an error naming the file."""
    advice = "the folder was changed by hand or its disk damaged: delete it to start over"
    try:
        shard = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); {advice}") from None
    if not isinstance(shard, np.ndarray) or shard.shape != (count,) + image_shape or shard.dtype != np.uint8:
        got = f"{shard.dtype} {list(shard.shape)}" if isinstance(shard, np.ndarray) else type(shard).__name__
        raise ValueError(f"{path}: expected uint8 {[count, *image_shape]}, got {got}; {advice}")
    return shard


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez, atomically, with fixed member timestamps: equal samples give byte-equal files."""
    from cfgfast._io import atomic_open

    with atomic_open(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                              force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array))


def _grid_picture(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One row per class (the first 16 classes, up to 16 samples each); a single class fills a square."""
    from cfgfast._images import image_grid

    classes = np.unique(labels)[:GRID_MAX]
    scale = max(1, GRID_PIXELS // max(images.shape[1:3]))
    if len(classes) == 1:
        cols = math.ceil(math.sqrt(min(len(images), GRID_MAX * GRID_MAX)))
        rows = max(1, min(len(images), GRID_MAX * GRID_MAX) // cols)
        return image_grid(images[:rows * cols], rows, cols, scale)
    cols = min(GRID_MAX, min(int((labels == k).sum()) for k in classes))
    picked = np.concatenate([np.flatnonzero(labels == k)[:cols] for k in classes])
    return image_grid(images[picked], len(classes), cols, scale)


def _prepare(args, world: _World):
    """All checks before sampling starts: every rank loads the model; rank 0 also checks the output paths
    and the parts folder. Returns (model, manifest, (all shards, finished shards)); the last two on rank 0 only."""
    from cfgfast.backends import choose
    from cfgfast.models.checkpoint import load_model

    if world.rank == 0:
        # (a run interrupted after writing them, while its parts folder was removed, finishes with --resume)
        resuming = args.resume and os.path.isdir(args.out + ".parts")
        writable_path(args.out)
        refuse_existing(args.out, args.overwrite or resuming)
        if args.grid is not None:
            writable_path(args.grid, "--grid")
            refuse_existing(args.grid, args.overwrite or resuming, "--grid")
    model = load_model(args.model).to(world.device)
    num_classes = model.config.num_classes
    for label in args.labels or []:
        if not 0 <= label < num_classes:
            raise ValueError(f"--labels must lie in [0, {num_classes}) for this model of {num_classes} classes, "
                             f"got {label}")
    channels, height, width = model.sample_shape
    if args.grid is not None and channels not in (1, 3):
        raise ValueError(f"--grid draws grey or RGB images, got a model with {channels} channels")
    choose(args.backend, world.device)
    if world.rank != 0:
        return model, None, None
    manifest = {"format": PARTS_FORMAT, "version": PARTS_VERSION, "model": args.model,
                "model_sha256": _model_sha256(args.model), "num": args.num, "w": args.w, "steps": args.steps,
                "sampler": args.sampler, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
                "apg": None if args.apg is None else [args.apg.eta_parallel, args.apg.norm_threshold,
                                                      args.apg.momentum],
                "threshold": args.threshold, "eta": args.eta, "v": args.v, "seed": args.seed, "clip": args.clip,
                "labels": args.labels, "guidance_interval": args.guidance_interval,
                "batch_size": args.batch_size, "shape": [height, width, channels]}
    finished = _finished(args, args.out + ".parts", manifest)
    return model, manifest, (_shards(args.num, manifest["batch_size"]), finished)


class _Progress:
    """A tqdm bar over samples on a terminal, else one line per shard (rank 0 only)."""

    def __init__(self, total: int, done: int, show: bool):
        self.total, self.done, self.show, self.start = total, done, show, time.perf_counter()
        self.bar = None
        if show and sys.stderr is not None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="sample", desc="cfgfast sample")

    def update(self, start: int, end: int) -> None:
        self.done += end - start
        if self.bar is not None:
            self.bar.update(end - start)
        elif self.show:
            print(f"samples {start}-{end - 1} done: {self.done}/{self.total}, "
                  f"{time.perf_counter() - self.start:.1f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    import cfgfast
    from cfgfast._io import atomic_open
    from cfgfast._images import save_png
    from cfgfast.data import to_uint8

    _check_options(args)
    world = _World(_device(args.device))
    try:
        error, model, manifest, plan = None, None, None, None
        try:
            model, manifest, plan = _prepare(args, world)
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            error = exc
        shards, finished = world.agree(error, plan)
        todo = [s for s in shards if s not in finished]
        parts = args.out + ".parts"
        label_of = _label_of(args, model.config.num_classes)
        channels, height, width = model.sample_shape
        image_shape = (height, width, channels)
        created, progress = False, None
        try:
            if world.rank == 0:
                if not os.path.exists(parts):
                    _create_parts(parts, manifest)
                    created = True
                args.interrupt_hint = f"the finished shards are in {parts}: rerun with --resume to finish"
                resumed = f", resuming with {sum(e - s for s, e in finished)} done" if finished else ""
                print(f"cfgfast {cfgfast.__version__}: {args.num} samples of {args.model}, w={args.w:g}, "
                      f"{args.steps} steps of {args.sampler}, seed {args.seed}, batch {manifest['batch_size']}, "
                      f"{world.size} process(es) on {world.device.type}{resumed}", flush=True)
            progress = _Progress(args.num, sum(e - s for s, e in finished), world.rank == 0)
            for first in range(0, len(todo), world.size):
                # one shard per rank per round; rank 0 writes them all, so only it needs the output folder
                round_shards = todo[first:first + world.size]
                mine = round_shards[world.rank] if world.rank < len(round_shards) else None
                images = np.zeros((0,) + image_shape, dtype=np.uint8)
                if mine is not None:
                    x = cfgfast.sample(model, label_of(*mine), args.w, args.steps, sampler=args.sampler,
                                       eta=args.eta, v=args.v, seed=args.seed, clip=args.clip, index_offset=mine[0],
                                       backend=args.backend, progress=False,
                                       guidance_interval=args.guidance_interval,
                                       max_batch="auto" if args.max_batch is None else args.max_batch,
                                       cuda_graph=args.cuda_graph,
                                       guidance=args.apg if args.apg is not None else args.guidance,
                                       guidance_rescale=args.guidance_rescale, threshold=args.threshold)
                    images = to_uint8(x)
                for (start, end), received in zip(round_shards, world.gather(images, shards[0][1]) or []):
                    with atomic_open(os.path.join(parts, _shard_name(start, end))) as f:
                        np.save(f, received[:end - start])
                    progress.update(start, end)
        except BaseException:
            # a run that fails before its first shard leaves nothing to resume: no parts folder that would block
            # the corrected rerun
            if created and os.path.isdir(parts) and os.listdir(parts) == ["manifest.json"]:
                shutil.rmtree(parts, ignore_errors=True)
                args.interrupt_hint = None
            raise
        finally:
            if progress is not None:
                progress.close()
        if world.rank != 0:
            return 0
        images, labels = _join(parts, shards, image_shape), label_of(0, args.num).numpy()
        _write_npz(args.out, arr_0=images, arr_1=labels)
        print(f"wrote {args.out}: arr_0 uint8 {list(images.shape)}, arr_1 int64 labels "
              f"({time.perf_counter() - progress.start:.1f} s)")
        if args.grid is not None:
            save_png(args.grid, _grid_picture(images, labels))
            print(f"wrote {args.grid}")
        # out of the way in one step, then deleted: stopped midway, it leaves a hidden folder, not a half-deleted parts
        # folder that a rerun would take for an interrupted run
        args.interrupt_hint = None
        trash = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(parts)), prefix=".tmp-")
        os.replace(parts, os.path.join(trash, "parts"))
        shutil.rmtree(trash)
        return 0
    finally:
        world.close()


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="guided samples of a model into an ADM-format .npz (resumable; works under "
                                  "torchrun)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="digits|CKPT",
                   help="digits (the bundled model) or a checkpoint of cfgfast train")
    p.add_argument("--num", type=int, required=True, metavar="N", help="number of samples")
    p.add_argument("--w", type=float, required=True, metavar="W", help="guidance strength (0: no guidance)")
    p.add_argument("--out", required=True, metavar="FILE.npz",
                   help="the samples: arr_0 uint8 [N, H, W, C], arr_1 int64 labels (the ADM evaluator format)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace FILE.npz (and the --grid picture) where they exist (without it: an error)")
    p.add_argument("--grid", metavar="FILE.png", help="also draw the samples: one row per class, up to 16 x 16")
    p.add_argument("--resume", action="store_true",
                   help="finish the interrupted run whose shards are in FILE.npz.parts (same options; any number "
                        "of processes). Without it an existing parts folder is an error")
    p.add_argument("--labels", type=int, nargs="+", metavar="K",
                   help="classes cycled over the samples: sample i gets the (i mod count)-th K, so one K gives "
                        "every sample that class (default: sample i gets class i mod num_classes)")
    p.add_argument("--steps", type=int, default=256,
                   help="sampling steps, one model evaluation each (default 256; 20-30 with dpmpp_2m)")
    p.add_argument("--sampler", default="ddpm",
                   help="ddpm (the paper's, default), ddim, dpmpp_2m or dpmpp_2m_sde (DPM-Solver++(2M))")
    p.add_argument("--guidance", default="cfg",
                   help="cfg (the paper's, default), cfgpp (CFG++, with --sampler ddim) or apg (adaptive projected "
                        "guidance; --apg-* set it, each defaulting to cfgfast.APG()'s; the setting measured on digits "
                        "in docs/evaluation/guidance.md: --apg-norm-threshold 1 --apg-momentum -0.5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescale phi in [0, 1] (default 0: none)")
    p.add_argument("--apg-eta-parallel", type=float, metavar="ETA",
                   help="APG: the weight of the update's part along the conditional prediction, in [0, 1] (default 0)")
    p.add_argument("--apg-norm-threshold", type=float, metavar="RHO",
                   help="APG: the largest norm of the update per sample (default 0: none)")
    p.add_argument("--apg-momentum", type=float, metavar="BETA",
                   help="APG: momentum of the running update, in (-1, 1) (default 0: none; the paper uses -0.5)")
    p.add_argument("--threshold", type=float, nargs=2, metavar=("P", "M"),
                   help="dynamic thresholding instead of --clip: x is clamped to [-s, s] and divided by s, s the "
                        "P-quantile of |x| per sample, clamped to [1, M] (e.g. 0.995 1.5; M = 1 is the clip again)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim's noise, in [0, 1] (default 0: deterministic)")
    p.add_argument("--v", type=float, default=None,
                   help="ddpm's variance interpolation in [0, 1] (default: the model's learned variance, else 0.3)")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed (default 0)")
    p.add_argument("--clip", type=float, metavar="C", default=None,
                   help="clip the predicted x to [-C, C] at every step (default: the model's data range, [-1, 1] "
                        "for images; 0 turns clipping off)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help=f"samples per model call and per shard file, on each process (default {DEFAULT_BATCH_SIZE}; "
                        "with --resume, the interrupted run's)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LAM_LO", "LAM_HI"),
                   help="guide only where LAM_LO <= lambda <= LAM_HI (w = 0 and no unconditional pass elsewhere)")
    p.add_argument("--max-batch", type=int, metavar="ROWS",
                   help="the most rows of one forward pass (default: the batch on the CPU, all 2B rows on a GPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each step as a captured CUDA graph (a CUDA model; cuda or triton backend)")
    p.add_argument("--backend", default="auto", help="auto, reference, cpu, triton or cuda")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available (one GPU per torchrun process), else CPU")
    p.set_defaults(run=run)
