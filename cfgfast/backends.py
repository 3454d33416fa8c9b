"""Backends of the reverse step and the noise, and the choice between them.

Each backend says what it supports and why it refuses an input (`refusals`); "auto" takes the first
that accepts, in the order of SPEC §4 (cuda, triton on CUDA tensors; cpu on CPU tensors; reference last);
a backend named explicitly that cannot run raises with its reasons.
"""

from __future__ import annotations

import os

import torch

from . import _ext
from ._checks import check_value, op_guided_step_args, op_guided_table_args, op_noise_out, op_step_memory, seed_as_int64
from .reference import guided_step_reference, normal_noise_reference
from .samplers import StepCoefficients

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


class Backend:
    name: str = ""
    # whether per_sample_guided_step runs here (cfgfast.guidance.Guide composes the step from passes otherwise)
    per_sample_guidance: bool = False

    def refusals(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on `device` (empty: it can)."""
        raise NotImplementedError

    def guided_step(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef: list[float], seed, step,
                    index_offset, clip) -> None:
        """The step of csrc/include/cfgfast/step.h with the coefficient row `coef` (10 floats) into out; x_prev,
        where given, is read and overwritten with this step's x~."""
        raise NotImplementedError

    def normal_noise(self, out, seed, step, stream, index_offset) -> None:
        raise NotImplementedError

    def guided_step_table(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed,
                          index_offset, clip) -> None:
        """The step whose coefficients are row step[0] of coef_table (float64 [T, 10]), with the noise of step t."""
        raise NotImplementedError


def _extension_refusals() -> list[str]:
    if _ext.error() is not None:
        return [f"the compiled extension is missing ({_ext.error()}); rebuild: {_ext.REBUILD}"]
    return []


class ReferenceBackend(Backend):
    """Plain PyTorch on any device: the oracle."""

    name = "reference"

    def refusals(self, device):
        return []

    def guided_step(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset,
                    clip):
        op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip)
        self._step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset, clip)

    def guided_step_table(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed,
                          index_offset, clip):
        """Row step[0] of coef_table, read here on the host."""
        op_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset, clip)
        t, steps = int(step.reshape(-1)[0]), coef_table.shape[0]
        check_value(0 <= t < steps, lambda: f"cfgfast: step {t} is outside the table of {steps} steps")
        self._step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, None, coef_table[t].tolist(), seed, t,
                   index_offset, clip)

    @staticmethod
    def _step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset, clip):
        """The step on checked arguments."""
        coef = StepCoefficients(*coef)
        if noise is None and coef.noise_std != 0.0:
            noise = normal_noise_reference(z.shape, seed, step, 1, index_offset, device=z.device)
        z_next, x = guided_step_reference(z, pred_cond, pred_uncond, weights, coef, noise, clip, x_prev, nu)
        out.copy_(z_next)
        if x_prev is not None:
            x_prev.copy_(x)

    def normal_noise(self, out, seed, step, stream, index_offset):
        op_noise_out(out, step, stream, index_offset)
        out.copy_(normal_noise_reference(out.shape, seed, step, stream, index_offset, device=out.device))


class CompiledOpsBackend(Backend):
    """The compiled ops torch.ops.cfgfast.* (csrc/), which torch dispatches to the kernel of the tensors' device."""

    def guided_step(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset,
                    clip):
        try:
            torch.ops.cfgfast.guided_step_(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef,
                                           seed_as_int64(seed), step, index_offset, clip)
        except RuntimeError:
            # ATen's overlap check, the op's first, refuses an out over part of an input without naming it
            op_step_memory(out, x_prev, z=z, pred_cond=pred_cond, pred_uncond=pred_uncond, weights=weights, nu=nu,
                           noise=noise, out=out)
            raise

    def normal_noise(self, out, seed, step, stream, index_offset):
        torch.ops.cfgfast.normal_noise_(out, seed_as_int64(seed), step, stream, index_offset)

    def guided_step_table(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed,
                          index_offset, clip):
        try:
            torch.ops.cfgfast.guided_step_table_(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step,
                                                 seed_as_int64(seed), index_offset, clip)
        except RuntimeError:  # (as guided_step)
            op_step_memory(out, x_prev, z=z, pred_cond=pred_cond, pred_uncond=pred_uncond, weights=weights, nu=nu,
                           coef_table=coef_table, step=step, out=out)
            raise


class CpuBackend(CompiledOpsBackend):
    """The fused C++ kernel (AVX2 where the CPU has it) on CPU tensors."""

    name = "cpu"
    per_sample_guidance = True

    def refusals(self, device):
        reasons = [] if device.type == "cpu" else [f"it runs on CPU tensors, got {device}"]
        return reasons + _extension_refusals()

    def per_sample_guided_step(self, out, z, pred_cond, pred_uncond, weights, running, x_prev, nu, noise, coef,
                               guide: list[float], seed, step, index_offset, clip) -> None:
        """The step with guidance rescale or APG, each sample's reduction and step in one task
        (csrc/cpu/guidance_cpu.cpp): weights [B, 2] the paper's; guide [phi] or [phi, eta_parallel, norm_threshold,
        momentum]; running APG's running value where momentum != 0 (else None)."""
        torch.ops.cfgfast.per_sample_guided_step_(out, z, pred_cond, pred_uncond, weights, running, x_prev, nu, noise,
                                                  coef, guide, seed_as_int64(seed), step, index_offset, clip)


class CudaBackend(CompiledOpsBackend):
    """The fused CUDA kernel (csrc/cuda) on CUDA tensors."""

    name = "cuda"

    def refusals(self, device):
        reasons = [] if device.type == "cuda" else [f"it runs on CUDA tensors, got {device}"]
        reasons += _extension_refusals()
        if not reasons and not _ext.cuda_kernel:
            reasons.append("the extension was built without its CUDA kernels (no CUDA toolkit at build time, or "
                           f"CFGFAST_SKIP_CUDA=1); rebuild with a toolkit: FORCE_CUDA=1 {_ext.REBUILD}")
        if device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("torch sees no CUDA device")
        return reasons


class TritonBackend(Backend):
    """The fused Triton kernel (cfgfast/triton_step.py) on CUDA tensors, or on CPU tensors under
    TRITON_INTERPRET=1. Its table step reads the step and the row on the device, as the cuda backend's."""

    name = "triton"

    def refusals(self, device):
        return _triton_step().refusals(device)

    def guided_step(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed, step, index_offset,
                    clip):
        _triton_step().guided_step_triton(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, seed,
                                          step, index_offset, clip)

    def normal_noise(self, out, seed, step, stream, index_offset):
        _triton_step().normal_noise_triton(out, seed, step, stream, index_offset)

    def guided_step_table(self, out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed,
                          index_offset, clip):
        _triton_step().guided_step_table_triton(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step,
                                                seed, index_offset, clip)


def _triton_step():
    """cfgfast.triton_step, imported on first use: importing triton costs a second or two."""
    from . import triton_step

    return triton_step


# Where the triton backend can matter, import it (and register its ops) now rather than inside a call
# that torch.compile may be tracing.
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y"):
    _triton_step()


_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), CpuBackend(), TritonBackend(), CudaBackend())
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def available_backends() -> list[str]:
    """The backends that can run on this machine (on its CPU or its GPU), in BACKEND_NAMES order."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [
        name
        for name in BACKEND_NAMES
        if name in _BACKENDS and any(not _BACKENDS[name].refusals(d) for d in devices)
        and not (name == "triton" and not torch.cuda.is_available())  # the interpreter is for tests, not use
    ]


# "auto"'s choice per device and extension state: what the backends accept on a device does not change while
# the process runs (the extension, triton and the GPUs are found once), and choosing costs more than a small step.
_AUTO_CHOICE: dict[tuple[torch.device, str | None], Backend] = {}
# A backend named explicitly that accepted a device, likewise (its refusals are only asked once).
_NAMED_CHOICE: dict[tuple[str, torch.device, str | None], Backend] = {}


def choose(backend: str, device: torch.device) -> Backend:
    """The backend to run on `device`: the named one, or with "auto" the first that accepts."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        key = (device, _ext.error())
        chosen = _AUTO_CHOICE.get(key)
        if chosen is None:
            chosen = next((_BACKENDS[name] for name in _AUTO_ORDER.get(device.type, ("reference",))
                           if name in _BACKENDS and not _BACKENDS[name].refusals(device)), _BACKENDS["reference"])
            _AUTO_CHOICE[key] = chosen
        return chosen
    key = (backend, device, _ext.error())
    chosen = _NAMED_CHOICE.get(key)
    if chosen is not None:
        return chosen
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {backend!r}")
    if backend not in _BACKENDS:
        raise RuntimeError(f"cfgfast: backend {backend!r} is not part of this version of cfgfast")
    chosen = _BACKENDS[backend]
    reasons = chosen.refusals(device)
    if reasons:
        raise RuntimeError(f"cfgfast: backend {backend!r} cannot run here: " + "; ".join(reasons))
    _NAMED_CHOICE[key] = chosen
    return chosen
