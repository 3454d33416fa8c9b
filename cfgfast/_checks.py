"""Argument checks of the public API (SPEC §5): a ValueError or TypeError naming the argument, what
was expected and what was given."""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Set

import numpy as np
import torch
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


def like_z(name: str, value, z: torch.Tensor) -> torch.Tensor:
    """A tensor with z's shape and device."""
    value = tensor(name, value)
    if value.shape != z.shape:
        raise ValueError(f"{name} must have the shape of z {tuple(z.shape)}, got {tuple(value.shape)}")
    return like_device(name, value, z)


def like_device(name: str, value, z: torch.Tensor) -> torch.Tensor:
    """A tensor on z's device."""
    value = tensor(name, value)
    if value.device != z.device:
        raise ValueError(f"{name} must be on z's device {z.device}, got {value.device}")
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


# The last w tensor found finite and its version counter (which every in-place change of it or of a view of it
# advances): a sampling loop that passes the same w at every step pays for one check, and on a GPU one
# host-device synchronisation, not one per step (on the CPU the check costs ~30 us a call, most of a small
# step's Python). Writes that bypass the counter (through .data, a NumPy view, a CUDA graph's replay) are not
# seen: such a w is not checked again, and a non-finite value there gives non-finite samples.
_FINITE_W: tuple[weakref.ref, int] | None = None


def _check_finite_w(w: torch.Tensor) -> None:
    global _FINITE_W
    last = _FINITE_W
    if last is not None and last[0]() is w and last[1] == w._version:
        return
    # in float32, as the kernels read it: 1e300 in float64 is not finite there
    if not bool(torch.isfinite(w.to(torch.float32)).all()):
        raise ValueError("w must be finite (in float32), got a non-finite value")
    # an inference tensor (made under torch.inference_mode) has no version counter: checked at every call
    if not w.is_inference():
        _FINITE_W = (weakref.ref(w), w._version)


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
        # The check reads w on the host: not possible while torch.compile traces or a CUDA graph captures
        # (there w was checked when it was made, or the caller's loop checks it once before capture).
        # (is_compiling first: is_current_stream_capturing returns a bool, which torch.compile cannot trace)
        if not torch.compiler.is_compiling() and not (w.is_cuda and torch.cuda.is_current_stream_capturing()):
            _check_finite_w(w)
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


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    n = t.numel()
    if n == 0:
        return 0, 0
    start = t.data_ptr()
    if t.is_contiguous():  # the usual case, without walking the strides in Python
        return start, start + n * t.element_size()
    size = t.element_size()
    low = start + size * sum(min(0, st * (sz - 1)) for st, sz in zip(t.stride(), t.shape))
    return low, start + size * (1 + sum(max(0, st * (sz - 1)) for st, sz in zip(t.stride(), t.shape)))


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of a and b overlaps at all (by address ranges; never under torch.compile's fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    a_lo, a_hi = _byte_range(a)
    b_lo, b_hi = _byte_range(b)
    return a_lo < b_hi and b_lo < a_hi


def writable_out(out: torch.Tensor) -> None:
    """torch refuses in-place writes to a tensor made under inference_mode once outside it; say so by name."""
    if torch.compiler.is_compiling():  # dynamo cannot trace is_inference (a graph break under fullgraph=True)
        return
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("out was made under torch.inference_mode() and cannot be written outside it (torch refuses "
                         "in-place updates of inference tensors there): call inside inference_mode, or pass an out "
                         "made outside it")


def out_may_alias(out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """out may be one of the inputs exactly (an in-place step) but must not partly overlap any."""
    if torch.compiler.is_compiling():
        # fake tensors have no addresses; the compiled graph runs the op, whose own check compares them (and
        # torch.compile makes a mutated graph input's writes its own). Not the Triton op: its body, this check
        # included, is traced, and the compiled graph launches its kernel without it.
        return
    lo, hi = _byte_range(out)
    for name, t in inputs.items():
        if t is None or t is out:
            continue
        t_lo, t_hi = _byte_range(t)
        if not (t_lo < hi and lo < t_hi):  # disjoint: the usual case, decided by the address ranges alone
            continue
        if t.device != out.device:  # addresses on two devices say nothing
            continue
        if (t.data_ptr() == out.data_ptr() and t.stride() == out.stride() and t.shape == out.shape
                and t.dtype == out.dtype):
            continue  # the same elements: an in-place step (a 16-bit view of out's bytes is not)
        raise ValueError(f"out must not partly overlap {name} (it may be {name} itself, for an in-place step)")


# ---- the ops' own checks, as torch._check (they hold under torch.compile's fake tensors): shared by the fake
# kernels of the compiled ops (cfgfast/_ops.py) and the Triton ops; csrc/op_checks.h is their C++ twin.

def check(condition, message) -> None:
    """torch._check(condition, message), whose own cost (several µs a call: the Triton op's two dozen checks were
    most of its Python) is paid only where the condition is not a plain True: a symbolic condition under
    torch.compile, which torch._check defers, or a failure."""
    if condition is not True:
        torch._check(condition, message)


def check_value(condition, message) -> None:
    """torch._check_value (a ValueError), paid only where the condition is not a plain True."""
    if condition is not True:
        torch._check_value(condition, message)


def op_noise_out(out, step, stream, index_offset) -> None:
    check(out.dtype == torch.float32, lambda: f"cfgfast: out must be float32, got {out.dtype}")
    check(out.dim() >= 1, lambda: "cfgfast: out needs a batch dimension")
    check(out.is_contiguous(), lambda: "cfgfast: out must be contiguous")
    check(0 <= step < MAX_WORD, lambda: f"cfgfast: step must be in [0, 2^32), got {step}")
    check(0 <= stream < MAX_WORD, lambda: f"cfgfast: stream must be in [0, 2^32), got {stream}")
    check(0 <= index_offset and index_offset + out.shape[0] <= MAX_WORD,
          lambda: f"cfgfast: index_offset + batch must be in [0, 2^32], got index_offset={index_offset}")
    check(out.numel() <= out.shape[0] * 2**34, lambda: "cfgfast: at most 2^34 elements per sample")


def op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset) -> None:
    """The checks of csrc/op_checks.h's check_guided_step_args that fake tensors allow (no addresses or storage)."""
    check(z.dtype == torch.float32, lambda: f"cfgfast: z must be float32, got {z.dtype}")
    check(z.dim() >= 1, lambda: "cfgfast: z needs a batch dimension, got a 0-d tensor")
    check(pred_cond.dtype in EPS_DTYPES,
          lambda: f"cfgfast: pred_cond must be float32, bfloat16 or float16, got {pred_cond.dtype}")
    check(pred_uncond.dtype == pred_cond.dtype,
          lambda: f"cfgfast: pred_uncond must have the dtype of pred_cond ({pred_cond.dtype}), got {pred_uncond.dtype}")
    for name, t in (("pred_cond", pred_cond), ("pred_uncond", pred_uncond)):
        check(t.shape == z.shape, lambda: f"cfgfast: {name} must have the shape of z {tuple(z.shape)}, got "
                                          f"{tuple(t.shape)}")
    check(weights.dtype == torch.float32, lambda: f"cfgfast: weights must be float32, got {weights.dtype}")
    check(weights.shape == (z.shape[0], 2), lambda: f"cfgfast: weights must have shape [{z.shape[0]}, 2], got "
                                                    f"{tuple(weights.shape)}")
    check(x_prev is None or (x_prev.dtype == torch.float32 and x_prev.shape == z.shape and x_prev.is_contiguous()),
          lambda: f"cfgfast: x_prev must be a contiguous float32 tensor of shape {tuple(z.shape)}")
    check(nu is None or (nu.dtype == pred_cond.dtype and nu.shape == z.shape),
          lambda: f"cfgfast: nu must have the dtype of pred_cond ({pred_cond.dtype}) and the shape of z "
                  f"{tuple(z.shape)}")
    check(noise is None or (noise.shape == z.shape and noise.dtype == torch.float32),
          lambda: f"cfgfast: noise must be a float32 tensor of shape {tuple(z.shape)}")
    check(out.shape == z.shape and out.dtype == torch.float32 and out.is_contiguous(),
          lambda: f"cfgfast: out must be a contiguous float32 tensor of shape {tuple(z.shape)}")
    check(len(coef) == NUM_COEFFICIENTS, lambda: f"cfgfast: coef must hold {NUM_COEFFICIENTS} numbers, got {len(coef)}")
    # one device: a direct call with one meta tensor among CPU ones reaches the fake kernel, which must not pass
    # for the real one (under torch.compile, fake tensors carry their real devices)
    for name, t in (("pred_cond", pred_cond), ("pred_uncond", pred_uncond), ("weights", weights),
                    ("x_prev", x_prev), ("nu", nu), ("noise", noise), ("out", out)):
        check(t is None or t.device == z.device,
              lambda: f"cfgfast: all tensors must be on {z.device}, got {name} on {t.device}")
    op_noise_out(out, step, 1, index_offset)


def op_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset) -> None:
    check(coef_table.dtype == torch.float64, lambda: f"cfgfast: coef_table must be float64, got {coef_table.dtype}")
    check(coef_table.dim() == 2 and coef_table.shape[1] == NUM_COEFFICIENTS and coef_table.shape[0] >= 1,
          lambda: f"cfgfast: coef_table must have shape [T, {NUM_COEFFICIENTS}], got {tuple(coef_table.shape)}")
    check(coef_table.shape[0] <= MAX_WORD, lambda: "cfgfast: at most 2^32 steps")
    check(step.dtype == torch.int64, lambda: f"cfgfast: step must be an int64 tensor, got {step.dtype}")
    check(step.numel() == 1, lambda: f"cfgfast: step must hold one number, got shape {tuple(step.shape)}")
    check(coef_table.device == z.device and step.device == z.device,
          lambda: f"cfgfast: coef_table and step must be on {z.device}")
    op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, None, [1.0] * NUM_COEFFICIENTS, 0,
                        index_offset)


def op_clip(clip) -> None:
    check(clip is None or 0 < clip <= torch.finfo(torch.float32).max,
          lambda: f"cfgfast: clip must be positive and finite in float32, got {clip}")
