"""cfgfast: classifier-free guided diffusion sampling (Ho & Salimans) with fused reverse-step kernels."""

from __future__ import annotations

import functools
import platform

import torch

from . import _ext
from ._version import __version__
from .backends import available_backends
from .guidance import APG
from .models.checkpoint import load_pretrained
from .noise import normal_noise
from .sampler import sample
from .samplers import PREDICTION_TYPES, SAMPLERS, StepCoefficients, default_lambdas, step_table
from .schedule import alpha_sigma, sampling_lambdas, training_lambdas
from .step import guided_step, guided_step_table, reverse_step

# Load the compiled ops now (or note why they cannot be), not lazily inside a call that torch.compile
# may be tracing.
_ext.load()

__all__ = [
    "APG",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "StepCoefficients",
    "__version__",
    "alpha_sigma",
    "available_backends",
    "build_info",
    "default_lambdas",
    "guided_step",
    "guided_step_table",
    "load_pretrained",
    "normal_noise",
    "reverse_step",
    "sample",
    "sampling_lambdas",
    "step_table",
    "training_lambdas",
]


def build_info() -> dict:
    """What this installation can run: the compiled kernels, the CPU (its model and instruction set), CUDA arch,
    triton."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_kernel": False,
        "cuda_kernel": False,
        "cuda_arch": [],
        "triton": triton_version,
    }
    module = _ext.load()
    if module is None:
        info["extension_error"] = _ext.error()
    else:
        info.update(module.build_info())
    return info


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; else what the platform module knows): figures vary between
    machines that the same instruction set hides (an AMD EPYC and an Intel Xeon both run the AVX2 kernel)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
