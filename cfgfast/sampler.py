"""cfgfast.sample: classifier-free guided sampling (the paper's Algorithm 2 and the samplers of SPEC §6) over a
lambda grid, with the fused step of csrc/include/cfgfast/step.h and the noise of SPEC §3."""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from collections.abc import Mapping, Set
from dataclasses import dataclass

import torch

from . import _checks
from .backends import Backend, choose
from .noise import normal_noise
from .guidance import APG, Guide, check_method, check_rescale, check_threshold, given_x_rows
from .samplers import (DEFAULT_V, MULTISTEP, check_eta, check_prediction_type, check_sampler, default_lambdas,
                       step_table)
from .schedule import LAMBDA_MAX, LAMBDA_MIN, alpha_sigma
from .step import guidance_weights


def _model_device(model, labels: torch.Tensor) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return labels.device


DEFAULT_STEPS = 256  # the paper's


def _bound(name: str, value) -> float:
    """A bound of a given lambda grid: a real number or a one-element tensor, where +-inf means no bound."""
    try:
        return _checks.real(name, value)
    except ValueError:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isinf(value):
            return float(value)  # (a NumPy float too)
        raise


def _grid(steps, lambdas, lambda_min, lambda_max, sampler) -> list[float]:
    if lambdas is None:
        return default_lambdas(steps, sampler, lambda_min, lambda_max).tolist()
    # a given grid: lambda_min and lambda_max only bound it (by default SPEC §1's [-20, 20]; infinite: no bound)
    lambda_min = LAMBDA_MIN if lambda_min is None else lambda_min
    lambda_max = LAMBDA_MAX if lambda_max is None else lambda_max
    lambda_min, lambda_max = _bound("lambda_min", lambda_min), _bound("lambda_max", lambda_max)
    if not lambda_min < lambda_max:
        raise ValueError(f"lambda_min must be below lambda_max, got {lambda_min} >= {lambda_max}")
    grid = _checks.increasing_grid("lambdas", lambdas)
    if not (lambda_min <= grid[0] and grid[-1] <= lambda_max):  # also refuses inf and nan
        raise ValueError(f"lambdas must lie in [lambda_min, lambda_max] = [{lambda_min}, {lambda_max}] (SPEC §1), "
                         f"got [{grid[0]}, {grid[-1]}]")
    return grid


def _interval(guidance_interval):
    if guidance_interval is None:
        return -math.inf, math.inf
    if isinstance(guidance_interval, (Set, Mapping)):  # unpacks, in no defined order
        raise TypeError(f"guidance_interval must be a pair (lam_lo, lam_hi), got a {type(guidance_interval).__name__}")
    try:
        lo, hi = guidance_interval
    except (TypeError, ValueError):
        raise TypeError(f"guidance_interval must be a pair (lam_lo, lam_hi), got {guidance_interval!r}") from None
    try:
        if any(isinstance(x, (bool, str, bytes)) for x in (lo, hi)):
            raise TypeError
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise TypeError(f"guidance_interval must be a pair of numbers (lam_lo, lam_hi), got {guidance_interval!r}") \
            from None
    if not lo <= hi or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"guidance_interval must have lam_lo <= lam_hi, got ({lo}, {hi})")
    return lo, hi


def _classifier_uncond(classifier, z, lam, labels, out_cond, step: int, prediction_type: str = "epsilon"):
    """out_cond + k sigma grad_z log softmax(classifier(z, lam))[labels], k = 1 for an epsilon model, 1/alpha for
    v, -sigma/alpha for x0 (SPEC §6): with it the CFG step becomes classifier guidance, eps~ = eps_cond - w sigma
    grad log p(c | z_lam) (SPEC §4), on the same kernel."""
    batch = z.shape[0]
    # inference_mode(False) and fresh tensors: this also works when the caller samples under inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        z_in = z.detach().clone().requires_grad_(True)  # a copy: the classifier may keep or change its input
        lam_b = torch.full((batch,), lam, dtype=torch.float32, device=z.device)
        labels = labels.clone()
        logits = classifier(z_in, lam_b)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape [{batch}, num_classes] at step {step} "
                             f"(lam={lam:.4g}), got {got}")
        if int(labels.max()) >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for a classifier of {logits.shape[1]} "
                             f"classes, got {int(labels.max())}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"classifier returned non-finite logits at step {step} (lam={lam:.4g}); if the model's "
                             "eps were non-finite at the step before, the state was already")
        if not logits.requires_grad:
            raise ValueError("classifier's logits do not depend on z (no gradient): classifier guidance needs "
                             "a differentiable classifier(z, lam)")
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, z_in)
    alpha, sigma = alpha_sigma(lam)
    k = {"epsilon": 1.0, "v_prediction": 1.0 / alpha, "sample": -sigma / alpha}[prediction_type]
    return out_cond.float() + (k * sigma) * grad.float()


def _forward(model, z, lam_b, labels, max_batch: int | None):
    """model(z, lam_b, labels), in passes of at most max_batch rows (None: one pass)."""
    rows = z.shape[0]
    if max_batch is None or rows <= max_batch:
        return model(z, lam_b, labels)
    parts = []
    for start in range(0, rows, max_batch):
        part = model(z[start:start + max_batch], lam_b[start:start + max_batch], labels[start:start + max_batch])
        if not isinstance(part, torch.Tensor):
            return part  # named by the caller's check
        parts.append(part)
    return torch.cat(parts)


def _predict(model, z, lam, labels, null_labels, guided: bool, step: int, learned_variance: bool = False,
             max_batch: int | None = None):
    """(out_cond, out_uncond, nu) from the forward pass of batch 2B, or of batch B when unguided (out_uncond is
    then out_cond), in parts of at most max_batch rows (where max_batch < 2B, the conditional and unconditional
    rows are passed apart, as a hand loop passes them). A learned-variance model returns 2C channels on dim 1, C of
    prediction then C of nu; nu is the conditional pass's (None for other models). lam: a number, or a float32
    tensor of one element on z's device (a captured step's, looked up at its device-side counter)."""
    batch = z.shape[0]
    if isinstance(lam, torch.Tensor):
        lam_b = lam.expand(batch)
    else:
        lam_b = torch.full((batch,), lam, dtype=torch.float32, device=z.device)
    halves = guided and max_batch is not None and max_batch < 2 * batch
    if halves:
        outs = (_forward(model, z, lam_b, labels, max_batch), _forward(model, z, lam_b, null_labels, max_batch))
        rows = batch
    elif guided:
        outs = (_forward(model, torch.cat([z, z]), torch.cat([lam_b, lam_b]), torch.cat([labels, null_labels]),
                         max_batch),)
        rows = 2 * batch
    else:
        outs = (_forward(model, z, lam_b, labels, max_batch),)
        rows = batch
    out = tuple(_checked_output(o, z, rows, lam, step, learned_variance) for o in outs)
    nu = None
    if learned_variance:
        channels = z.shape[1]
        nu = out[0][:batch, channels:]
        out = tuple(o[:, :channels] for o in out)
    if halves:
        return out[0], out[1], nu
    if guided:
        return out[0][:batch], out[0][batch:], nu
    return out[0], out[0], nu


def _checked_output(out, z, rows: int, lam: float, step: int, learned_variance: bool):
    """The model's output of `rows` rows, checked (shape, device, floating point) and in an eps dtype."""
    expected = (rows,) + tuple(z.shape[1:])
    if learned_variance:
        expected = (rows, 2 * z.shape[1]) + tuple(z.shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = "an output (prediction and learned variance: twice the sample's channels on dim 1)" \
            if learned_variance else "an output"
        raise ValueError(f"model must return {what} of shape {expected} at step {step} (lam={lam:.4g}), got {got}")
    if out.device != z.device:
        raise ValueError(f"model must return its output on {z.device} at step {step}, got {out.device}")
    if not out.is_floating_point():
        raise TypeError(f"model must return a floating-point output at step {step}, got {out.dtype}")
    if out.dtype not in _checks.EPS_DTYPES:
        out = out.float()
    return out


def _check_eval_mode(model, name: str = "model") -> None:
    """A module in training mode whose dropout or batch norm acts differently there is refused: its samples would
    not be a function of the seed (dropout draws from torch's global generator), or sampling would change it."""
    if not isinstance(model, torch.nn.Module) or not model.training:
        return
    for part, module in model.named_modules():
        if module.training and ((isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0)
                                or isinstance(module, torch.nn.modules.batchnorm._BatchNorm)):
            raise ValueError(f"{name} is in training mode, where its {part or 'self'} ({type(module).__name__}) "
                             f"makes the samples depend on more than the seed: call {name}.eval() first")


def _label_top(model, model_null, default):
    """The model's last label row: num_labels - 1 where it says (the adapters; the null row anywhere among them),
    else its null label (cfgfast's UNet: the last row), else `default`."""
    rows = getattr(model, "num_labels", None)
    if rows is not None:
        return _checks.integer("model.num_labels", rows, low=1) - 1
    return default if model_null is None else _checks.integer("model.null_label", model_null)


def _guidance_table(w, grid: list[float], batch: int, device: torch.device, inside: list[bool]) -> torch.Tensor:
    """float32 [T, B]: w at every step and sample, 0 outside the guidance interval. w: a number or a tensor [B] (the
    same at every step), a callable w(lam) -> number or [B], or a tensor [T] or [T, B] (a row a step; where T = B a
    1-D tensor is one w per sample: give a per-step schedule as [T, 1])."""
    steps = len(grid)
    if callable(w) and not isinstance(w, torch.Tensor):
        table = torch.stack([_checks.guidance(w(lam), batch, device, name=f"w(lam) at step {t} (lam={lam:.4g})")
                             for t, lam in enumerate(grid)])
    elif isinstance(w, torch.Tensor) and (w.dim() == 2 or (w.dim() == 1 and w.shape[0] == steps != batch)):
        if w.dim() == 2 and w.shape not in ((steps, batch), (steps, 1)):
            raise ValueError(f"w as a tensor of two dimensions must be [steps, B] = [{steps}, {batch}] or "
                             f"[{steps}, 1] (a row a step), got {tuple(w.shape)}")
        # one row a step, checked as one per-sample w (number or [B]) of all steps at once
        table = _checks.guidance(w.reshape(-1), w.numel(), device).reshape(steps, -1).expand(steps, batch)
    else:
        table = _checks.guidance(w, batch, device).expand(steps, batch)
    inside = torch.tensor(inside, dtype=torch.float32, device=device)
    return (table * inside[:, None]).contiguous()


# The forward pass on the CPU by default: the conditional and the unconditional pass apart (two passes of B rows),
# as a hand-written loop runs them. One pass of 2B rows was slower there for the bundled digits model at batch 256
# (302 ms against 266 for two of 256, medians of 6 interleaved rounds, 2 cores of an AMD EPYC, 2026-12-07) and
# level at batch 64 (75 against 80 ms); passes of a fixed 256 rows were slower again for a model with a cost per
# call (the toy at batch 4096: 3x the hand loop). On a GPU one pass of 2B is the faster.
def _max_batch(max_batch, device: torch.device, batch: int) -> int | None:
    if isinstance(max_batch, str) and max_batch == "auto":
        return max(batch, 1) if device.type == "cpu" else None
    if max_batch is None:
        return None
    return _checks.integer("max_batch", max_batch, low=1)


@dataclass
class _Plan:
    """What sample() checked and derived, once, for its loops."""

    model: object
    classifier: object
    labels: torch.Tensor
    null_labels: torch.Tensor | None
    weights: torch.Tensor  # float32 [T, B, 2]: (1 + w, w) per step and sample, w = 0 outside the guidance interval
    grid: list[float]
    guided: list[bool]  # per step: some w != 0 (the unconditional pass runs)
    table: torch.Tensor  # float64 [T, 10] on the host: the sampler's coefficient rows
    table_x: torch.Tensor  # the same rows in their "given x~" form (dynamic thresholding forms x~ itself)
    stepper: Backend
    seed: int
    index_offset: int
    prediction_type: str
    learned_variance: bool  # the model returns nu, and the step reads it
    model_learned_variance: bool  # the model returns nu (read or not)
    multistep: bool
    max_batch: int | None  # rows of one forward pass (None: all at once)
    guide: Guide  # SPEC §7's guidance method, rescale, threshold and clip, with APG's running value


def _model_clip(model):
    """The model's data range as a clip value (its `data_range`: data lie in [-data_range, data_range]), or None."""
    value = getattr(model, "data_range", None)
    return None if value is None else _checks.clip(value)


@torch.no_grad()
def sample(model, labels, w, steps=DEFAULT_STEPS, *, sampler="ddpm", eta=0.0, v=None, prediction_type=None, seed=0,
           shape=None, null_label=None, lambda_min=None, lambda_max=None, clip="auto", index_offset=0,
           backend="auto", progress=None, guidance_interval=None, classifier=None, cuda_graph=False,
           lambdas=None, max_batch="auto", guidance="cfg", guidance_rescale=0.0, threshold=None) -> torch.Tensor:
    """Samples x [B, *shape] of a class-conditional model with classifier-free guidance (SPEC §4, §6).

    model(z, lam, labels) -> output with lam float32 [B] and labels int64 [B]; `null_label` (default
    model.null_label) means "no class". w: a number or one per sample [B]; or varying by step: a callable
    w(lam) -> number or [B], or a tensor [T] or [T, B] (a row a step; where T = B, give [T, 1]). A step whose w is
    0 for every sample skips the unconditional pass. A module in training mode whose dropout or batch norm acts there is refused (call
    .eval()): its samples would depend on more than the seed. The state starts as the noise of stream 0 and stays
    float32 (the model may return bfloat16 or float16, e.g. under autocast).

    sampler: "ddpm" (the paper's Algorithm 2), "ddim" (eta in [0, 1]; 0: deterministic), "dpmpp_2m" or
    "dpmpp_2m_sde" (DPM-Solver++(2M), 20-30 steps). prediction_type: "epsilon", "v_prediction" or "sample" (default:
    model.prediction_type, else "epsilon"). v: the "ddpm" variance interpolation; None means the model's learned
    variance where model.learned_variance is true (its output then has twice the channels: prediction, then nu),
    else the paper's 0.3. clip="auto" clamps x~ to the model's data range (model.data_range: [-1, 1] for the
    bundled U-Net), if it declares one; a number clamps to [-clip, clip]; None never clamps.

    The grid: default_lambdas(steps, sampler, lambda_min, lambda_max), the paper's spacing on [-20, 20] for ddpm and
    ddim, even spacing in lambda on [-10, 10] for the DPM-Solver++ samplers (a bound given replaces the sampler's);
    or lambdas=: any increasing sequence inside [lambda_min, lambda_max] (by default [-20, 20]: widen them, up to
    +-80, for a grid beyond; +-inf: no bound); steps is then its length (leave steps out, or give that length). guidance_interval=(lam_lo, lam_hi)
    guides only where lam_lo <= lam <= lam_hi (w = 0 elsewhere). Sample i is global sample index_offset + i: the
    same seed gives the same samples for any batch split and batch size, and on any backend to float32 rounding.
    max_batch: the most rows of one forward pass (the 2B rows of a guided step are split into passes of at most
    that many; None: one pass); "auto" is B on the CPU (the conditional and unconditional passes apart, as a hand
    loop runs them: one pass of 2B was slower there) and one pass on a GPU. It also bounds the model's peak memory.

    guidance (SPEC §7): "cfg" (the paper's g = (1 + w) o_c - w o_u); "cfgpp" (CFG++, with sampler "ddim": x~ from
    g, the direction term from the unconditional prediction; the unconditional pass runs at w = 0 too, and outside a
    guidance interval the step is plain ddim); or cfgfast.APG(eta_parallel, norm_threshold, momentum) (adaptive
    projected guidance on the x-predictions; its running value starts at zero and changes only at guided steps).
    guidance_rescale=phi in [0, 1] (diffusers' guidance_rescale): g <- phi g std(o_c)/std(g) + (1 - phi) g per
    sample, with any method (APG's x~ with std(x~_c)). threshold=(p, M): Imagen's dynamic thresholding instead of
    clip, x~ <- clamp(x~, -s, s) / s with s = clamp(quantile_p(|x~|), 1, M) per sample, at every step.

    classifier(z, lam) -> logits [B, num_classes] switches to classifier guidance (Dhariwal & Nichol):
    only the model's conditional pass runs (an unconditional model simply ignores the labels) and
    eps~ = eps(z, c) - w sigma grad_z log softmax(logits)[c], the gradient taken with autograd; w >= 0.

    cuda_graph=True (a CUDA model and the cuda or triton backend): one step (the model's forward pass and the
    fused step reading its coefficients from a device table at a device-side step counter) is captured once as
    a CUDA graph and replayed for every step, removing the per-step launch overhead. Same samples as without.
    """
    plan, z = _plan(model, labels, w, steps, sampler, eta, v, prediction_type, seed, shape, null_label, lambda_min,
                    lambda_max, clip, index_offset, backend, guidance_interval, classifier, cuda_graph, lambdas,
                    max_batch, guidance, guidance_rescale, threshold)
    if progress is None:  # a bar when stderr is a terminal
        progress = sys.stderr is not None and sys.stderr.isatty()
    else:
        progress = _checks.flag("progress", progress)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.grid), desc="cfgfast.sample", unit="step")
    try:
        if cuda_graph:
            z = _loop_table(plan, z, bar, capture=True)
        else:
            z = _loop(plan, z, bar)
    finally:
        if bar is not None:
            bar.close()
    return z


def _plan(model, labels, w, steps, sampler, eta, v, prediction_type, seed, shape, null_label, lambda_min, lambda_max,
          clip, index_offset, backend, guidance_interval, classifier, cuda_graph, lambdas, max_batch="auto",
          guidance="cfg", guidance_rescale=0.0, threshold=None):
    """sample()'s arguments checked once: the plan its loops take, and the initial state z."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(z, lam, labels), got {type(model).__name__}")
    _check_eval_mode(model)
    labels = _checks.tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D integer tensor [B], got {labels.dtype} of shape {tuple(labels.shape)}")
    device = _model_device(model, labels)
    if "meta" in (device.type, labels.device.type):
        raise ValueError(f"model and labels must hold values to sample with, got the meta device "
                         f"({'labels' if labels.device.type == 'meta' else 'the model'})")
    labels = labels.to(device=device, dtype=torch.int64)
    batch = labels.shape[0]
    index_offset = _checks.index_offset(index_offset, batch, "labels")
    model_null = getattr(model, "null_label", None)
    null_label = model_null if null_label is None else null_label
    if classifier is not None:
        if null_label is not None:  # unused with a classifier (no unconditional pass), but not garbage
            null_label = _checks.integer("null_label", null_label)
        if not callable(classifier):
            raise TypeError(f"classifier must be callable as classifier(z, lam), got {type(classifier).__name__}")
        _check_eval_mode(classifier, "classifier")
        if batch and int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
        # a model that declares its label rows bounds the labels too (the classifier's classes are checked below; a
        # null_label alone does not: an unconditional model ignores the labels)
        rows = getattr(model, "num_labels", None)
        top = None if rows is None else _checks.integer("model.num_labels", rows, low=1) - 1
        if batch and top is not None and int(labels.max()) > top:
            raise ValueError(f"labels must lie in [0, {top}] (the model's label rows), got values up to "
                             f"{int(labels.max())}")
    else:
        if null_label is None:
            raise ValueError("null_label is unknown: pass null_label= or give the model a null_label attribute")
        null_label = _checks.integer("null_label", null_label)
        # labels and an explicit null_label (another class as the "unconditional" pass is allowed: a negative
        # prompt) lie among the model's label rows, else up to the null_label given
        top = _label_top(model, model_null, null_label)
        if null_label > top:
            raise ValueError(f"null_label must lie in [0, {top}] (the model's label rows), got {null_label}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) > top):
            raise ValueError(f"labels must lie in [0, {top}] (null_label {null_label}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    shape = getattr(model, "sample_shape", None) if shape is None else shape
    if shape is None:
        raise ValueError("shape is unknown: pass shape= or give the model a sample_shape attribute")
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple of ints (one sample's shape), got {type(shape).__name__}")
    shape = tuple(_checks.integer("shape", s, low=1) for s in shape)
    sampler = check_sampler(sampler)
    eta = check_eta(sampler, eta)
    prediction_type = check_prediction_type(getattr(model, "prediction_type", "epsilon") if prediction_type is None
                                            else prediction_type)
    model_learned = _checks.flag("model.learned_variance", getattr(model, "learned_variance", False))
    if model_learned and len(shape) < 1:
        raise ValueError("a learned-variance model needs a channel dimension in its sample shape")
    if v is not None:
        if sampler != "ddpm":
            raise ValueError(f"v is a setting of sampler 'ddpm' only (sampler {sampler!r} ignores it), got v={v!r}")
        v = _checks.unit_interval("v", v)
    learned = model_learned and sampler == "ddpm" and v is None
    if lambdas is None:
        steps = _checks.steps(DEFAULT_STEPS if steps is None else steps)
    grid = _grid(steps, lambdas, lambda_min, lambda_max, sampler)
    if lambdas is not None and steps not in (None, DEFAULT_STEPS, len(grid)):  # a steps= that the grid overrides
        raise ValueError(f"steps must be left out with lambdas= (the grid's length, {len(grid)}, is the number of "
                         f"steps), got steps={steps!r}")
    lam_lo, lam_hi = _interval(guidance_interval)
    inside = [lam_lo <= lam <= lam_hi for lam in grid]
    w_table = _guidance_table(w, grid, batch, device, inside)
    if classifier is not None and batch and bool((w_table < 0).any()):
        raise ValueError("w must be >= 0 with a classifier (a negative w would push samples away from their class)")
    max_batch = _max_batch(max_batch, device, batch)
    seed = _checks.seed(seed)
    cuda_graph = _checks.flag("cuda_graph", cuda_graph)
    if isinstance(clip, str) and clip == "auto":
        clip = None if threshold is not None else _model_clip(model)  # (a threshold clamps x~ itself)
    else:
        clip = _checks.clip(clip)
    threshold = check_threshold(threshold, clip)
    stepper = choose(backend, device)
    if cuda_graph:
        _check_cuda_graph(device, stepper, classifier)
    guidance = check_method(sampler, guidance)
    guidance_rescale = check_rescale(guidance_rescale)
    if guidance != "cfg" and classifier is not None:
        raise ValueError(f"guidance={guidance!r} needs the model's unconditional pass; classifier guidance has none "
                         "(use guidance='cfg')")
    table = step_table(sampler, grid, prediction_type=prediction_type, eta=eta,
                       v=DEFAULT_V if v is None else v, learned_variance=learned)
    if guidance == "cfgpp":  # CFG++'s rows inside the guidance interval, plain ddim outside it
        cfgpp_rows = step_table(sampler, grid, prediction_type=prediction_type, eta=eta, guidance="cfgpp")
        table = torch.where(torch.tensor(inside)[:, None], cfgpp_rows, table)
    if guidance == "cfgpp":  # its step reads o_u at w = 0 too
        guided = list(inside) if batch else [False] * len(grid)
    else:
        guided = (w_table != 0).any(dim=1).tolist() if batch else [False] * len(grid)
    null_labels = None if classifier is not None else torch.full_like(labels, null_label)
    z = normal_noise((batch,) + shape, seed, step=0, stream=0, index_offset=index_offset, device=device)
    if classifier is not None and batch:
        # the classifier's class count bounds the labels: checked before any model pass, even where w = 0
        _classifier_uncond(classifier, z, grid[0], labels, torch.zeros_like(z), 0)
    momentum = isinstance(guidance, APG) and guidance.momentum != 0.0
    guide = Guide(guidance, guidance_rescale, threshold, clip, torch.zeros_like(z) if momentum else None)
    plan = _Plan(model=model, classifier=classifier, labels=labels, null_labels=null_labels,
                 weights=guidance_weights(w_table.reshape(-1)).reshape(len(grid), batch, 2), grid=grid, guided=guided,
                 table=table, table_x=given_x_rows(table), stepper=stepper, seed=seed, index_offset=index_offset,
                 prediction_type=prediction_type, learned_variance=learned, model_learned_variance=model_learned,
                 multistep=sampler in MULTISTEP, max_batch=max_batch, guide=guide)
    return plan, z


def _loop(plan: _Plan, z: torch.Tensor, bar) -> torch.Tensor:
    """The sampler's steps on a checked plan; returns x~ of the last step."""
    grid = plan.grid
    rows, rows_x = plan.table.tolist(), plan.table_x.tolist()
    x_prev = torch.empty_like(z) if plan.multistep else None  # read from the second step on
    # The first step whose state is non-finite, kept on the device (no sync per step), checked at the end.
    first_bad = torch.full((), len(grid), dtype=torch.int64, device=z.device)
    for t, lam in enumerate(grid):
        guided = plan.guided[t]
        if plan.classifier is not None:
            out_cond, _, nu = _predict(plan.model, z, lam, plan.labels, None, False, t, plan.model_learned_variance,
                                       plan.max_batch)
            out_cond = out_cond.float()
            out_uncond = _classifier_uncond(plan.classifier, z, lam, plan.labels, out_cond, t,
                                            plan.prediction_type) if guided else out_cond
        else:
            out_cond, out_uncond, nu = _predict(plan.model, z, lam, plan.labels, plan.null_labels, guided, t,
                                                plan.model_learned_variance, plan.max_batch)
        if not plan.learned_variance:
            nu = None
        elif nu.dtype != out_cond.dtype:
            nu = nu.to(out_cond.dtype)
        # Inputs were checked once above; per step only the model's output is (in _predict). Each step writes a
        # new tensor: the model may keep the z it was given.
        out = torch.empty_like(z)
        plan.guide.step(plan.stepper, out, z, out_cond, out_uncond, plan.weights[t], x_prev, nu, None, rows[t],
                        rows_x[t], plan.seed, t, plan.index_offset, guided)
        z = out
        first_bad = torch.where(torch.isfinite(z).all(), first_bad, first_bad.clamp(max=t))
        if bar is not None:
            bar.update(1)
    _check_finite(first_bad, grid)
    return z


def _check_finite(first_bad: torch.Tensor, grid: list[float]) -> None:
    """Names the first step whose state was non-finite (tracked on the device, read once at the end)."""
    bad = int(first_bad)
    if bad < len(grid):
        raise ValueError(f"the sample became non-finite at step {bad} (lam={grid[bad]:.4g}): the model returned "
                         "non-finite outputs, or w is too large for this model")


def _check_cuda_graph(device, stepper, classifier) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {device}")
    if stepper.name not in ("cuda", "triton"):
        raise ValueError(f"cuda_graph=True needs the cuda or triton backend (their step reads the step counter on "
                         f"the device), got backend {stepper.name!r}")
    if classifier is not None:
        raise ValueError("cuda_graph=True cannot capture classifier guidance (autograd per step); use "
                         "cuda_graph=False with a classifier")


def _loop_table(plan: _Plan, z: torch.Tensor, bar, capture: bool) -> torch.Tensor:
    """The sampler with every per-step quantity on the device: lambda, the step's weights and coefficient row are
    looked up at a step counter that the step itself advances, and the multistep state is a static buffer, so a
    recorded step replays them all. Two steps are recorded where the run has guided and unguided steps, one with the
    forward pass of batch 2B and one of batch B, and each step replays the one it needs: an unguided step does not
    pay for the unconditional pass. With capture=True (CUDA) each is captured as a CUDA graph after a warm-up;
    capture=False runs the same steps eagerly (the CPU tests of this path)."""
    model, labels, grid = plan.model, plan.labels, plan.grid
    device, steps = z.device, len(grid)
    table, table_x = plan.table.to(device), plan.table_x.to(device)
    weights = plan.weights.to(device)
    lam_table = torch.tensor(grid, dtype=torch.float32, device=device)
    counter = torch.zeros(1, dtype=torch.int64, device=device)
    first_bad = torch.full((), steps, dtype=torch.int64, device=device)
    z_state, z_next = z.clone(), torch.empty_like(z)
    x_prev = torch.zeros_like(z) if plan.multistep else None

    def make_step(guided: bool):
        def step():
            # (the model's output was checked by an eager pass first: nothing here raises inside a capture)
            out_cond, out_uncond, nu = _predict(model, z_state, lam_table.index_select(0, counter), labels,
                                                plan.null_labels, guided, "of the captured loop",
                                                plan.model_learned_variance, plan.max_batch)
            nu = nu if plan.learned_variance else None
            plan.guide.step_table(plan.stepper, z_next, z_state, out_cond, out_uncond,
                                  weights.index_select(0, counter)[0], x_prev, nu, table, table_x, counter, plan.seed,
                                  plan.index_offset, guided)
            first_bad.copy_(torch.where(torch.isfinite(z_next).all(), first_bad,
                                        torch.minimum(first_bad, counter[0])))
            z_state.copy_(z_next)
            counter.add_(1)

        return step

    kinds = sorted(set(plan.guided))  # the steps this run needs: unguided (False), guided (True)
    # one eager forward pass of each kind checks what the model returns (no errors can be raised inside a replay)
    for guided in kinds:
        _predict(model, z, grid[0], labels, plan.null_labels, guided, 0, plan.model_learned_variance, plan.max_batch)
    runs = {guided: make_step(guided) for guided in kinds}
    # The model's device made current for the capture and the replays: torch.cuda.graph captures on a stream of
    # the current device, and a replay launches on the current device's stream.
    with torch.cuda.device(device) if capture else contextlib.nullcontext():
        if capture:
            z0 = z_state.clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks; state reset below
                for step in runs.values():
                    for _ in range(2):
                        step()
                        counter.zero_()  # (each warm-up step at the first row: a grid may be shorter than them)
            torch.cuda.current_stream(device).wait_stream(side)
            graphs = {}
            for guided, step in runs.items():
                graphs[guided] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[guided], stream=side):
                    step()
            z_state.copy_(z0)
            counter.zero_()
            first_bad.fill_(steps)
            if x_prev is not None:
                x_prev.zero_()
            if plan.guide.buffer is not None:  # APG's running value, moved by the warm-up
                plan.guide.buffer.zero_()
            runs = {guided: graph.replay for guided, graph in graphs.items()}
        for t in range(steps):
            runs[plan.guided[t]]()
            if bar is not None:
                bar.update(1)
    _check_finite(first_bad, grid)
    return z_state
