"""What every step benchmark shares: the sizes, the one input factory, the bytes each variant moves,
the device it ran on, and the skips for backends or devices this machine lacks."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import pytest
import torch

import cfgfast
from cfgfast.samplers import DEFAULT_SPACING, MULTISTEP, StepCoefficients

# CFGFAST_BENCH_QUICK=1: one small size, so CI can smoke-run `pytest benchmarks/ --benchmark-disable`.
QUICK = os.environ.get("CFGFAST_BENCH_QUICK", "") not in ("", "0")
SIZES: dict[str, tuple[int, ...]] = (
    {"8x3x16x16": (8, 3, 16, 16)}
    if QUICK
    else {"64x3x64x64": (64, 3, 64, 64), "256x3x64x64": (256, 3, 64, 64), "1024x3x64x64": (1024, 3, 64, 64),
          "16M": (256, 65536), "64M": (1024, 65536)}
)
# Sizes timed on a GPU only (2^24 and 2^26 elements: large enough to leave the L2 and the launch behind).
GPU_ONLY_SIZES = frozenset({"16M", "64M"})
# the slow reference backend and the bfloat16 case run at this size only
SMALL_SIZE = "8x3x16x16" if QUICK else "256x3x64x64"

# The device each fast backend runs on; "reference" runs anywhere and is benchmarked on every device.
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def runs_on(params: dict) -> str | None:
    """The device a benchmark's parameters put it on (its device, or its backend's), None when neither."""
    if "device" in params:
        return params["device"]
    return BACKEND_DEVICE.get(params.get("backend"))
FAST_BACKENDS = tuple(BACKEND_DEVICE)
DEVICES = ("cpu", "cuda")

SEED = 1234
STEPS = 256  # the grid the benchmarked transition is taken from (the paper's 256 steps)


class StepInputs(NamedTuple):
    z: torch.Tensor  # float32 [B, ...]
    eps_cond: torch.Tensor  # eps_dtype, z's shape
    eps_uncond: torch.Tensor
    w: torch.Tensor  # float32 [B], one guidance strength per sample
    lam: float
    lam_next: float
    v: float
    coefficients: StepCoefficients  # the "ddpm" row of lam -> lam_next at v (cfgfast.step_table), for eager_step
    step: int  # index of lam in the grid: the noise's t of SPEC §3
    noise: torch.Tensor  # float32 standard normals like z, for the variants that take noise= explicitly


def make_step_inputs(shape, eps_dtype=torch.float32, device="cpu", seed=0) -> StepInputs:
    """The inputs of one reverse step, the same for every variant: the middle transition of the
    STEPS-step grid, v = 0.3 (the paper's 64x64 value), w in [0, 4) per sample."""
    generator = torch.Generator().manual_seed(seed)
    z, eps_cond, eps_uncond, noise = (torch.randn(shape, generator=generator) for _ in range(4))
    w = 4.0 * torch.rand(shape[0], generator=generator)
    lambdas = cfgfast.sampling_lambdas(STEPS)
    step = STEPS // 2
    lam, lam_next, v = float(lambdas[step]), float(lambdas[step + 1]), 0.3
    return StepInputs(
        z=z.to(device),
        eps_cond=eps_cond.to(device=device, dtype=eps_dtype),
        eps_uncond=eps_uncond.to(device=device, dtype=eps_dtype),
        w=w.to(device),
        lam=lam,
        lam_next=lam_next,
        v=v,
        coefficients=coefficients(cfgfast.step_table("ddpm", [lam, lam_next], v=v)[0]),
        step=step,
        noise=noise.to(device),
    )


def coefficients(row: torch.Tensor) -> StepCoefficients:
    """A row of cfgfast.step_table as the StepCoefficients that the reference twin and eager_step take."""
    return StepCoefficients(*row.tolist())


def sampler_row(sampler: str, eta: float = 0.0) -> torch.Tensor:
    """Row STEPS // 2 of `sampler`'s table on its default grid (SPEC §6): a middle step, so the multistep
    samplers' row is second order (it reads x~_prev)."""
    lambdas = cfgfast.sampling_lambdas(STEPS, spacing=DEFAULT_SPACING[sampler])
    return cfgfast.step_table(sampler, lambdas, eta=eta)[STEPS // 2]


def eager_step(z, eps_cond, eps_uncond, w, coef: StepCoefficients, noise):
    """The paper's step (SPEC §2, a "ddpm" row) in plain torch, as users write it: the guided eps (Eq. 6), then
    z' = mu + std n with mu affine in (z, eps); noise=None on the last row (x~ alone).

    The baseline of the speed bar. It is not cfgfast.reference.guided_step_reference, which follows the kernels'
    general order (it forms x~ and adds the unconditional term, zero here, on every call: 13 passes over the batch
    for a "ddpm" row to these 8); test_step_speed checks the two agree before timing either."""
    w = w.reshape((-1,) + (1,) * (z.dim() - 1))
    eps = (1 + w) * eps_cond.float() - w * eps_uncond.float()  # paper Eq. 6
    z_next = coef.direct_z * z + coef.direct_g * eps
    return z_next if noise is None else z_next + coef.noise_std * noise


def step_bytes(shape, eps_dtype=torch.float32, explicit_noise=False, sampler="ddpm") -> int:
    """Bytes one step must move at least: read z (f32), eps_cond and eps_uncond (their dtype), write z'
    (f32), read the noise when it comes from outside, and for the multistep samplers read x~_prev and write x~
    (f32). Temporaries of the eager step are not counted."""
    itemsize = torch.empty((), dtype=eps_dtype).element_size()
    state = 8 if sampler in MULTISTEP else 0
    return math.prod(shape) * (4 + 2 * itemsize + 4 + (4 if explicit_noise else 0) + state)


def device_info(device) -> dict:
    """The device a time was measured on, for extra_info and the summary."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "threads": torch.get_num_threads()}
    return {
        "device": cfgfast.build_info()["cpu"],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_isa": cfgfast.build_info().get("cpu_isa"),
    }


def synchronized(fn, device):
    """fn, followed by a device synchronisation where the device runs asynchronously (CUDA)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def require_backend(backend: str) -> str:
    """The device `backend` runs on; skips when this machine cannot run it."""
    device = BACKEND_DEVICE[backend]
    require_device(device)
    available = cfgfast.available_backends()
    if backend not in available:
        pytest.skip(f"backend {backend!r} is not in cfgfast.available_backends() = {available}")
    return device


# Row labels of the summary: the conftest computes its ratios from these.
def fused_label(backend: str, mode: str = "out") -> str:
    return {
        "out": f"fused {backend}, out=",
        "no_out": f"fused {backend}, allocating",
        "noise_arg": f"fused {backend}, noise=",
        "bf16_out": f"fused {backend}, bf16 eps, out=",
    }[mode]


# The samplers timed through cfgfast.guided_step: (sampler, eta). "ddim" at eta 0 and "dpmpp_2m" draw no noise.
SAMPLER_CASES = (("ddpm", 0.0), ("ddim", 0.0), ("dpmpp_2m", 0.0), ("dpmpp_2m_sde", 0.0))
SAMPLER_SIZES = (SMALL_SIZE,) if QUICK else ("256x3x64x64", "1024x3x64x64")
DPM_DIFFUSERS_LABEL = "eager dpmpp_2m: torch CFG + diffusers DPMSolverMultistep.step"


def sampler_label(backend: str, sampler: str, eta: float = 0.0) -> str:
    name = f"ddim eta={eta:g}" if sampler == "ddim" else sampler
    return f"fused {backend} guided_step, {name}"


def noise_label(backend: str, mode: str = "out") -> str:
    return {"out": f"noise {backend}, in place", "alloc": f"noise {backend}, normal_noise()"}[mode]


EAGER_LABEL = "eager torch (paper's step + randn_like)"
TWIN_LABEL = "reference twin guided_step_reference + randn_like"
REFERENCE_LABEL = "reference backend (spec noise)"
RANDN_LABEL = "torch.randn, in place"
COPY_LABEL = "copy floor: 2 x out.copy_(z)"
COPY_MULTISTEP_LABEL = "copy floor: 3 x out.copy_(z)"  # the bytes of a multistep step (x~_prev read and written)
COMPILED_LABEL = "torch.compile(eager step), inductor randn"
COMPILED_FALLBACK_LABEL = "torch.compile(eager step), torch.randn"
DIFFUSERS_LABEL = "diffusers DDPMScheduler.step, eps given"
SAMPLE_LABEL = "cfgfast.sample"
SAMPLE_GRAPH_LABEL = "cfgfast.sample, cuda_graph=True"
HAND_LOOP_LABEL = "hand loop: 2 model calls + eager step"

DIT_SAMPLE_LABEL = "cfgfast.sample, DiT adapter"
DIT_DIFFUSERS_LABEL = "diffusers DDPMScheduler loop, DiT"
FORWARD_LABEL = "model forward alone (one pass of 2B per step)"

# sample() end to end, per device and model: (batch, steps). Every step of the grid costs the same, so a few steps
# give the per-step ratio of a 256-step run (and keep the CPU suite under 5 minutes). The toy is exact (2-D, analytic
# eps, CPU only); "digits" is the bundled model at batch 256; "unet64" an untrained 3x64x64 U-Net
# (benchmarks/test_sample_speed.py).
# On a GPU the digits model runs the paper's 256 steps: a CUDA graph's capture is paid once per sample() call.
SAMPLE_MODELS: dict[str, dict[str, tuple[int, int]]] = (
    {"cpu": {"toy": (64, 8), "digits": (16, 4)}, "cuda": {"digits": (16, 4)}}
    if QUICK
    else {"cpu": {"toy": (4096, 64), "digits": (256, 8), "unet64": (8, 2)},
          "cuda": {"digits": (256, 256), "unet64": (16, 64)}}
)


# The host time of one public step call: tiny tensors, so that what is timed is the Python and the dispatch between
# the call and the kernel, which a sampling loop of a small model pays at every step (benchmarks/test_host_speed.py).
HOST_SHAPE = (2, 4)
HOST_SIZE = "host time, z [2, 4]"


def host_label(backend: str, call: str) -> str:
    return {"reverse_step": f"cfgfast.reverse_step {backend}, out=",
            "guided_step": f"cfgfast.guided_step {backend}, out=",
            "op": f"bare op torch.ops.cfgfast.guided_step_ ({backend})"}[call]


def sample_size(device: str, model: str) -> str:
    batch, steps = SAMPLE_MODELS[device][model]
    return f"sample {model}, batch {batch}, {steps} steps"
