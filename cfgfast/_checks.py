"""Argument checks (SPEC §5): a ValueError or TypeError naming the argument, what was expected and what was given.
The public API's conversions of numbers and sequences come first; the ops' checks of their tensors (csrc/op_checks.h's
Python twin) at the end."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Set

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import guard_scalar

EPS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_WORD = 2**32  # counter words of SPEC §3 are 32 bits
MAX_BATCH = 2**31  # samples or images in one batch: beyond, torch's sizes overflow (and no machine holds it)
NUM_COEFFICIENTS = 10  # a step's coefficient row: StepCoef in csrc/include/cfgfast/step.h


def steps(value) -> int:
    """A number of sampling steps: at least 2, below 2^32 (a step's index is a counter word of SPEC §3)."""
    return integer("steps", value, low=2, high=MAX_WORD)


def integer(name: str, value, *, low: int = 0, high: int | None = None) -> int:
    """A Python int (or integral 0-d tensor) in [low, high)."""
    if type(value) is int and value >= low and (high is None or value < high):  # the usual case, fast
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        upper = "" if high is None else f", below {high}"
        raise ValueError(f"{name} must be at least {low}{upper}, got {value}")
    return value


def real(name: str, value) -> float:
    """A finite Python float from a real number or a 0-d tensor."""
    if type(value) is float:
        if torch.compiler.is_compiling():
            # torch.compile makes a float argument symbolic once it has seen two values (automatic dynamic floats),
            # and neither math.isfinite nor the float64 step coefficients computed from it can be traced: specialize
            # on its value, a guard (one graph per value; guided_step_table takes the step as a tensor, one graph)
            value = guard_scalar(value)
        if math.isfinite(value):  # the usual case, fast
            return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"{name} must have a value, got a tensor on the meta device")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# |lambda| at most this: the paper's range is [-20, 20]; far beyond it alpha = e^(lambda / 2) (lambda << 0) makes the
# step's coefficients overflow float64's exp in the schedule and float32 in the kernels (from |lambda| ~ 170).
LAMBDA_LIMIT = 80.0


def lambda_grid(name: str, values) -> list[float]:
    """A 1-D sequence of at least 2 real numbers (a list, tuple, range, tensor, array, ...) as Python floats."""
    if isinstance(values, (str, bytes, Set, Mapping)):  # a set or a dict's keys: in no defined order
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}")
    if isinstance(values, torch.Tensor) and values.device.type == "meta":
        raise ValueError(f"{name} must have values, got a tensor on the meta device")
    try:
        array_like = isinstance(values, torch.Tensor) or hasattr(values, "__array__")
        values = values if array_like else list(values)  # (once: a generator is used up by it)
        grid = torch.as_tensor(values)
        if not array_like and grid.is_floating_point():  # Python floats, not rounded to the default float32
            grid = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__} ({error})") from None
    if grid.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(grid.shape)}")
    if grid.dtype == torch.bool or grid.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {grid.dtype}")
    if grid.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 values, got {grid.shape[0]}")
    return grid.to(device="cpu", dtype=torch.float64).tolist()


def increasing_grid(name: str, values) -> list[float]:
    """A lambda grid as floats: finite, strictly increasing, at least two points."""
    grid = lambda_grid(name, values)
    for t, lam in enumerate(grid):
        log_snr(f"{name}[{t}]", lam)
    for t in range(len(grid) - 1):
        if not grid[t] < grid[t + 1]:
            raise ValueError(f"{name} must be increasing, got {name}[{t}]={grid[t]} >= {name}[{t + 1}]={grid[t + 1]}")
    return grid


def flag(name: str, value) -> bool:
    """True or False (also NumPy's bool and the ints 0 and 1)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def log_snr(name: str, value) -> float:
    """A log-SNR lambda: a finite real number in [-LAMBDA_LIMIT, LAMBDA_LIMIT]."""
    value = real(name, value)
    if not -LAMBDA_LIMIT <= value <= LAMBDA_LIMIT:
        raise ValueError(f"{name} must lie in [-{LAMBDA_LIMIT:g}, {LAMBDA_LIMIT:g}] (the paper uses [-20, 20]; beyond "
                         f"|lambda| = {LAMBDA_LIMIT:g} the step's coefficients overflow), got {value}")
    return value


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def resolve_device(device) -> torch.device:
    """torch.device(device), with the current GPU's index where none is named ("cuda" is cuda:0 there), so that
    it compares equal to the device of a tensor on it. A CUDA device that this machine lacks is refused here,
    before anything is allocated on it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
                         f"got {device!r} ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} is not available: torch finds no CUDA GPU here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} is not available: torch finds {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "cpu":
        device = torch.device("cpu")  # a CPU tensor's device has no index: "cpu:0" is that device
    return device


def guidance(w, batch: int, device: torch.device, name: str = "w") -> torch.Tensor:
    """w as a float32 tensor [batch] on device: a number, a 0-d tensor or one value per sample."""
    if isinstance(w, torch.Tensor):
        if w.dim() != 0 and w.shape != (batch,):
            raise ValueError(f"{name} must be a number or a tensor of shape [{batch}] (one per sample), got "
                             f"{tuple(w.shape)}")
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got {w.dtype}")
        if w.device.type == "meta":
            raise ValueError(f"{name} must have values, got a tensor on the meta device")
        # The check reads w on the host, in float32 as the kernels read it (1e300 in float64 is not finite there):
        # not while torch.compile traces or a CUDA graph captures (w was checked when it was made, or the caller's
        # loop checks it once before capture). is_compiling first: torch.compile cannot trace the capture's bool.
        if not torch.compiler.is_compiling() and not (w.is_cuda and torch.cuda.is_current_stream_capturing()) \
                and not bool(torch.isfinite(w.to(torch.float32)).all()):
            raise ValueError(f"{name} must be finite (in float32), got a non-finite value")
        if w.dim() == 0:
            w = w.reshape(1).expand(batch)
        return w.to(device=device, dtype=torch.float32).contiguous()
    value = real(name, w)
    if abs(value) > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} must be finite in float32, got {value}")
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def unit_interval(name: str, value) -> float:
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def clip(value) -> float | None:
    """None (no clipping) or a positive bound on x~, finite in float32 as the kernels read it."""
    if value is None:
        return None
    value = real("clip", value)
    if not 0.0 < value <= torch.finfo(torch.float32).max:
        raise ValueError(f"clip must be positive and finite in float32 (clip=None: no clipping), got {value}")
    return value


def index_offset(value, batch: int, batch_name: str) -> int:
    """The global index of a batch's first sample: samples index_offset ... index_offset + batch - 1 are counter
    words of SPEC §3 (32 bits)."""
    if batch > MAX_WORD:
        raise ValueError(f"{batch_name} must be at most 2^32 samples (SPEC §3's sample counter is 32 bits), "
                         f"got {batch}")
    return integer("index_offset", value, high=MAX_WORD - batch + 1)


def seed(value) -> int:
    return integer("seed", value, high=2**64)


def seed_as_int64(value: int) -> int:
    """The op schema carries the seed as int64: two's complement of a seed in [0, 2^64)."""
    return value - 2**64 if value >= 2**63 else value


# ---- the ops' own checks: csrc/op_checks.h's twin, in its order and words, for the fake kernels of the compiled
# ops (cfgfast/_ops.py), the Triton ops and the reference backend. As torch._check they hold under torch.compile's
# fake tensors, and cost nothing where the condition is a plain True (torch._check's own cost is several µs a call:
# the Triton op's two dozen checks were most of its Python); the memory checks need addresses: real tensors only.

def check(condition, message) -> None:
    """torch._check (a RuntimeError), paid only where the condition is not a plain True: a symbolic condition under
    torch.compile, which torch._check defers, or a failure."""
    if condition is not True:
        torch._check(condition, message)


def check_value(condition, message) -> None:
    """torch._check_value (a ValueError, as TORCH_CHECK_VALUE), paid only where the condition is not a plain True."""
    if condition is not True:
        torch._check_value(condition, message)


def check_type(condition, message) -> None:
    """torch._check_type (a TypeError, as TORCH_CHECK_TYPE), paid only where the condition is not a plain True."""
    if condition is not True:
        torch._check_type(condition, message)


def _real(t: torch.Tensor) -> bool:
    # (is_compiling first: dynamo cannot trace is_fake)
    return not torch.compiler.is_compiling() and not is_fake(t) and t.device.type != "meta"


def _extent(t: torch.Tensor) -> int:
    """The elements from t's first to its last, inclusive (strides are non-negative for every tensor torch makes)."""
    return 1 + sum(st * (sz - 1) for st, sz in zip(t.stride(), t.shape))


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return 0, 0
    n = t.numel() if t.is_contiguous() else _extent(t)  # (contiguous, the usual case: without walking the strides)
    return t.data_ptr(), t.data_ptr() + n * t.element_size()


def disjoint(written: torch.Tensor, name: str, **others) -> None:
    """A tensor the caller writes (`name`) lies within its storage and shares no byte with any of the others (None:
    not given)."""
    if not _real(written):  # (addresses: real tensors only, not torch.compile's fake ones)
        return
    _storage(written, name)
    lo, hi = _byte_range(written)
    for other, t in others.items():
        if t is not None and _real(t) and t.numel():
            t_lo, t_hi = _byte_range(t)
            check_value(t_lo >= hi or lo >= t_hi, lambda: f"cfgfast: {name} must not overlap {other} (it is written)")


def _storage(t: torch.Tensor, name: str) -> None:
    if t.numel() and _real(t):
        needed, held = t.element_size() * (t.storage_offset() + _extent(t)), t.untyped_storage().nbytes()
        check_value(needed <= held, lambda: f"cfgfast: {name} needs {needed} bytes of its storage, which holds {held}")


def _writable(t: torch.Tensor, name: str) -> None:
    # (is_compiling first: dynamo cannot trace is_inference)
    check_value(torch.compiler.is_compiling() or not t.is_inference() or torch.is_inference_mode_enabled(),
                lambda: f"cfgfast: {name} was made under torch.inference_mode() and cannot be written outside it "
                        "(torch refuses in-place updates of inference tensors there): call inside inference_mode, or "
                        "pass one made outside it")


def op_step_memory(out, x_prev, /, **inputs) -> None:
    """check_step_memory: out may be one of the inputs exactly but must not partly overlap a contiguous one (a
    non-contiguous input is copied before anything is written); x_prev, written while every other tensor is read,
    shares no byte with any."""
    if not _real(out):
        return
    lo, hi = _byte_range(out)
    x_lo, x_hi = (0, 0) if x_prev is None else _byte_range(x_prev)
    if x_prev is not None:
        _storage(x_prev, "x_prev")
    for name, t in inputs.items():
        if t is not None:
            t_lo, t_hi = _byte_range(t)
            same = (t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.shape == out.shape
                    and t.dtype == out.dtype)  # (a 16-bit view of out's bytes is not the same elements)
            check_value(same or not t.is_contiguous() or t_lo >= hi or lo >= t_hi,
                        lambda: f"cfgfast: out must not partly overlap {name} (it may be {name} itself, for an "
                                "in-place step)")
            _storage(t, name)
            check_value(x_prev is None or t_lo >= x_hi or x_lo >= t_hi,
                        lambda: f"cfgfast: x_prev must not overlap {name} (it is written)")


def op_noise_out(out, step, stream, index_offset) -> None:
    check_type(out.dtype == torch.float32, lambda: f"cfgfast: out must be float32, got {out.dtype}")
    check_value(out.dim() >= 1, lambda: "cfgfast: out needs a batch dimension, got a 0-d tensor")
    check_value(out.is_contiguous(), lambda: "cfgfast: out must be contiguous")
    _writable(out, "out")
    check_value(0 <= step < MAX_WORD, lambda: f"cfgfast: step must be in [0, 2^32), got {step}")
    check_value(0 <= stream < MAX_WORD, lambda: f"cfgfast: stream must be in [0, 2^32), got {stream}")
    check_value(0 <= index_offset <= MAX_WORD - out.shape[0],
                lambda: f"cfgfast: index_offset + batch must be in [0, 2^32], got index_offset={index_offset}")
    check_value(out.numel() <= out.shape[0] * 2**34, lambda: "cfgfast: at most 2^34 elements per sample")
    _storage(out, "out")


def op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset,
                        clip) -> None:
    check_type(z.dtype == torch.float32, lambda: f"cfgfast: z must be float32, got {z.dtype}")
    check_value(z.dim() >= 1, lambda: "cfgfast: z needs a batch dimension, got a 0-d tensor")
    check_type(pred_cond.dtype in EPS_DTYPES,
               lambda: f"cfgfast: pred_cond must be float32, bfloat16 or float16, got {pred_cond.dtype}")
    # the inputs of z's shape, with the argument whose dtype each must have
    for name, t, like, like_t in (("pred_cond", pred_cond, "pred_cond", pred_cond),
                                  ("pred_uncond", pred_uncond, "pred_cond", pred_cond),
                                  ("nu", nu, "pred_cond", pred_cond), ("noise", noise, "z", z)):
        if t is not None:
            check_type(t.dtype == like_t.dtype,
                       lambda: f"cfgfast: {name} must have the dtype of {like} ({like_t.dtype}), got {t.dtype}")
            check_value(t.shape == z.shape, lambda: f"cfgfast: {name} must have the shape of z {list(z.shape)}, got "
                                                    f"{list(t.shape)}")
            check_value(t.device == z.device, lambda: f"cfgfast: {name} must be on z's device {z.device}, got "
                                                      f"{t.device}")
    check_type(weights.dtype == torch.float32, lambda: f"cfgfast: weights must be float32, got {weights.dtype}")
    check_value(weights.dim() == 2 and weights.shape[0] == z.shape[0] and weights.shape[1] in (2, 3),
                lambda: f"cfgfast: weights must have shape [{z.shape[0]}, 2] or [{z.shape[0]}, 3], "
                        f"got {list(weights.shape)}")
    check_value(weights.device == z.device,
                lambda: f"cfgfast: weights must be on z's device {z.device}, got {weights.device}")
    for name, t in (("out", out), ("x_prev", x_prev)):  # the written tensors
        if t is not None:
            check_value(t.shape == z.shape and t.dtype == torch.float32 and t.is_contiguous() and t.device == z.device,
                        lambda: f"cfgfast: {name} must be a contiguous float32 tensor of z's shape {list(z.shape)} on "
                                f"{z.device}")
            _writable(t, name)
    check_value(len(coef) == NUM_COEFFICIENTS,
                lambda: f"cfgfast: coef must hold {NUM_COEFFICIENTS} numbers, got {len(coef)}")
    check_value(clip is None or 0 < clip <= torch.finfo(torch.float32).max,
                lambda: f"cfgfast: clip must be positive and finite in float32 (clip=None: no clipping), got {clip}")
    op_noise_out(out, step, 1, index_offset)
    # (out among the inputs: x_prev must not overlap it either)
    op_step_memory(out, x_prev, z=z, pred_cond=pred_cond, pred_uncond=pred_uncond, weights=weights, nu=nu,
                   noise=noise, out=out)


def op_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset,
                         clip) -> None:
    check_value(coef_table.dtype == torch.float64 and coef_table.dim() == 2 and coef_table.shape[1] == NUM_COEFFICIENTS
                and 1 <= coef_table.shape[0] <= MAX_WORD,
                lambda: f"cfgfast: coef_table must be a float64 tensor of shape [T, {NUM_COEFFICIENTS}] (T at most "
                        f"2^32; cfgfast.step_table), got {coef_table.dtype} {list(coef_table.shape)}")
    check_value(step.dtype == torch.int64 and step.numel() == 1,
                lambda: f"cfgfast: step must be an int64 tensor holding one number, got {step.dtype} "
                        f"{list(step.shape)}")
    check_value(coef_table.device == z.device and step.device == z.device,
                lambda: f"cfgfast: coef_table and step must be on z's device {z.device}")
    op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, None, [1.0] * NUM_COEFFICIENTS, 0,
                        index_offset, clip)
    op_step_memory(out, x_prev, coef_table=coef_table, step=step)  # (read by other threads while those are written)


MAX_MOMENT_INPUTS = MAX_MOMENT_VECTORS = 4  # cfgfast::sample_moments: kMaxMomentInputs, kMaxMomentVectors


def op_moments_args(inputs, combos, num_vectors) -> None:
    k = len(inputs)
    check_value(1 <= k <= MAX_MOMENT_INPUTS,
                lambda: f"cfgfast: inputs must hold 1 to {MAX_MOMENT_INPUTS} tensors, got {k}")
    check_value(1 <= num_vectors <= MAX_MOMENT_VECTORS,
                lambda: f"cfgfast: num_vectors must be in [1, {MAX_MOMENT_VECTORS}], got {num_vectors}")
    check_value(len(combos) == k * num_vectors,
                lambda: f"cfgfast: combos must hold num_vectors x len(inputs) = {num_vectors} x {k} numbers, got "
                        f"{len(combos)}")
    first = inputs[0]
    check_value(first.dim() >= 1, lambda: "cfgfast: inputs need a batch dimension, got a 0-d inputs[0]")
    for i, t in enumerate(inputs):
        check_type(t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                   lambda: f"cfgfast: inputs[{i}] must be float32, bfloat16, float16 or float64, got {t.dtype}")
        check_value(t.shape == first.shape, lambda: f"cfgfast: inputs[{i}] must have the shape of inputs[0] "
                                                    f"{list(first.shape)}, got {list(t.shape)}")
        check_value(t.device == first.device,
                    lambda: f"cfgfast: inputs[{i}] must be on {first.device} like inputs[0], got {t.device}")
        _storage(t, f"inputs[{i}]")
