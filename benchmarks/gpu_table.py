"""One table of the GPU reverse step: per backend and size, time, achieved GB/s (3 reads + 1 write of
float32), the ratio to a device-to-device copy measured in the same run, the speed-up over the eager
PyTorch step with torch.randn noise, the time of the noise alone (its arithmetic without the reads) and that of
the step without its noise (the last step: the same bytes, no arithmetic to hide).
Each figure is the best of 3 interleaved rounds (best_of_rounds), each the median of 20 timings of 10
back-to-back calls (time_ms). Run by benchmarks/gpu_check.sh on
a machine with a GPU.

    python -m benchmarks.gpu_table [--sizes 1 16 64] [--bf16 64] [--sweep] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from typing import Callable

import torch

import cfgfast
from .utils import eager_step, make_step_inputs, sampler_row, step_bytes


ROUNDS = 3  # interleaved rounds per measurement; each variant's best round is reported


# Calls timed back to back between two events, behind one untimed call, so that the first event is stamped when
# the GPU gets to it and each call's host time (Python, the launcher) overlaps the kernels queued before it, as in
# a sampling loop: it is hidden wherever the kernel takes longer. (docs/performance.md's H100 figures of 2026-11-26
# timed each call alone from an idle GPU, which counted its host time too.)
CALLS_PER_TIMING = 10


def time_ms(fn, warmup_ms=25.0, repeat=20, calls=None) -> float:
    """Median over `repeat` timings of `calls` back-to-back calls (CALLS_PER_TIMING) behind an untimed one, per
    call, with CUDA events, after at least warmup_ms of untimed calls (a new Triton setting compiles in the first
    one; the clocks settle in the rest)."""
    calls = calls or CALLS_PER_TIMING
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # untimed: the GPU is busy when begin is recorded
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def best_of_rounds(variants: dict[str, Callable[[], object]], timer: Callable | None = None,
                   rounds: int = ROUNDS) -> dict[str, float]:
    """Every variant timed in each of `rounds` rounds, the rounds interleaved (a b c, a b c, ...) so that a slow
    patch of the machine (clocks, power, a neighbour) falls on all variants alike; per variant its best round.
    Two sweeps of the Triton settings measured one after the other disagreed on the best setting; this is why."""
    timer = timer or time_ms
    best = {name: math.inf for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], timer(fn))
    return best


def _step(x, backend, out, setting=None, last=False):
    """One step on `backend` into out; setting() first (a tuning knob), inside the timed call: a Python
    assignment or two, nothing on the GPU. last=True: the last step, x~ alone, the same reads and write with no
    noise drawn."""
    def run():
        if setting is not None:
            setting()
        return cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v, seed=1,
                                    step=x.step, backend=backend, out=out, last=last)
    return run


def triton_step_setting() -> tuple[int, int]:
    """The Triton kernel's (BLOCK_GROUPS, NUM_WARPS) in force now."""
    from cfgfast import triton_step

    return triton_step.BLOCK_GROUPS, triton_step.NUM_WARPS


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rows(sizes_m: list[int], bf16_size_m: int | None = None) -> list[dict]:
    """Per size (and float32 eps; bfloat16 eps too at bf16_size_m), the copy, the eager step, each backend and
    (float32) each backend's noise alone."""
    out_rows = []
    backends = [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]
    cases = [(m, torch.float32) for m in sizes_m] + ([(bf16_size_m, torch.bfloat16)] if bf16_size_m else [])
    for millions, eps_dtype in cases:
        shape = (max(1, millions * 16), 65536)  # [B, N]: millions * 2^20 elements
        x = make_step_inputs(shape, eps_dtype, "cuda", seed=0)
        out = torch.empty_like(x.z)
        elements = math.prod(shape)
        step_bytes = (8 + 2 * x.eps_cond.element_size()) * elements  # z, eps_cond, eps_uncond read; z' written
        variants = {
            "copy": lambda: out.copy_(x.z),
            "eager": lambda: eager_step(x.z, x.eps_cond, x.eps_uncond, x.w, x.coefficients, torch.randn_like(x.z)),
        }
        for backend in backends:
            variants[backend] = _step(x, backend, out)
            if eps_dtype == torch.float32:
                # the noise alone into out (one write): what the step's arithmetic costs without its reads; and the
                # step without its noise (the last step: the same bytes moved by the same kernel), the floor that the
                # kernel's access pattern sets
                variants["noise " + backend] = functools.partial(cfgfast.normal_noise, shape, 1, 3, device="cuda",
                                                                 backend=backend, out=out)
                variants["last " + backend] = _step(x, backend, out, last=True)
        ms = best_of_rounds(variants)
        copy_gbs = 8 * elements / ms["copy"] / 1e6
        for backend in backends:
            gbs = step_bytes / ms[backend] / 1e6
            out_rows.append(dict(backend=backend, eps=_dtype_name(eps_dtype), elements=elements, ms=ms[backend],
                                 gb_per_s=gbs, copy_gb_per_s=copy_gbs, of_copy=gbs / copy_gbs, eager_ms=ms["eager"],
                                 speedup=ms["eager"] / ms[backend], noise_ms=ms.get("noise " + backend, math.nan),
                                 last_ms=ms.get("last " + backend, math.nan)))
        del x, out, variants
        torch.cuda.empty_cache()
    return out_rows


def sampler_rows(millions: int) -> list[dict]:
    """Per backend and sampler (SPEC §6) at one size, float32 eps: the step of a middle row of the sampler's table
    (the multistep samplers with their x~_prev state, read and written), GB/s of the bytes that sampler moves and
    its share of the copy's bandwidth measured in the same run."""
    backends = [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]
    shape = (max(1, millions * 16), 65536)
    x = make_step_inputs(shape, torch.float32, "cuda", seed=0)
    out, x_prev = torch.empty_like(x.z), torch.zeros_like(x.z)
    variants = {"copy": lambda: out.copy_(x.z)}
    for sampler in cfgfast.SAMPLERS:
        row = sampler_row(sampler)
        state = x_prev if sampler in ("dpmpp_2m", "dpmpp_2m_sde") else None
        for backend in backends:
            variants[(sampler, backend)] = functools.partial(
                cfgfast.guided_step, x.z, x.eps_cond, x.eps_uncond, row, x.w, x_prev=state, seed=1, step=x.step,
                backend=backend, out=out)
    ms = best_of_rounds(variants)
    copy_gbs = 8 * out.numel() / ms["copy"] / 1e6
    result = []
    for sampler in cfgfast.SAMPLERS:
        for backend in backends:
            gbs = step_bytes(tuple(out.shape), torch.float32, sampler=sampler) / ms[(sampler, backend)] / 1e6
            result.append(dict(sampler=sampler, backend=backend, elements=out.numel(), ms=ms[(sampler, backend)],
                               gb_per_s=gbs, of_copy=gbs / copy_gbs))
    return result


# 0: the default, 128 (several waves); 4 and 6: one full wave of the 2-group and 1-group kernels (their launch bounds)
CUDA_BLOCKS_PER_SM = (0, 4, 6, 32, 64, 256)


def cuda_settings() -> list[tuple[int, int]]:
    """The (groups per thread, blocks per SM) settings that cuda_sweep times: 1 and 2 groups under each grid."""
    return [(groups, blocks) for groups in (1, 2) for blocks in CUDA_BLOCKS_PER_SM]


def cuda_sweep(millions: int) -> list[dict]:
    """The CUDA step kernel at one size (float32 and bfloat16 eps) under each of cuda_settings(): the data behind
    the kernel's defaults (groups 0: chosen by eps dtype; blocks 0: 128 an SM)."""
    from cfgfast import _ext

    module = _ext.load()
    if "cuda" not in cfgfast.available_backends() or not hasattr(module, "set_cuda_blocks_per_sm"):
        return []
    shape = (millions * 16, 65536)
    settings = cuda_settings()

    def use(groups, blocks):
        module.set_cuda_groups_per_thread(groups)
        module.set_cuda_blocks_per_sm(blocks)

    result = []
    saved = (module.set_cuda_groups_per_thread(0), module.set_cuda_blocks_per_sm(0))
    try:
        for eps_dtype in (torch.float32, torch.bfloat16):
            x = make_step_inputs(shape, eps_dtype, "cuda", seed=0)
            out = torch.empty_like(x.z)
            step_bytes = (8 + 2 * x.eps_cond.element_size()) * out.numel()
            variants = {"copy": lambda: out.copy_(x.z)}
            for setting in settings:
                variants[setting] = _step(x, "cuda", out, functools.partial(use, *setting))
            ms = best_of_rounds(variants)
            copy_gbs = 8 * out.numel() / ms["copy"] / 1e6
            for groups, blocks in settings:
                gbs = step_bytes / ms[(groups, blocks)] / 1e6
                result.append(dict(eps=_dtype_name(eps_dtype), groups_per_thread=groups, blocks_per_sm=blocks,
                                   gb_per_s=gbs, of_copy=gbs / copy_gbs))
            del x, out, variants
    finally:
        use(*saved)
    return result


def sweep(millions: int, settings: list[tuple[int, int]]) -> list[dict]:
    """The Triton kernel at one size under each (groups per program, warps) setting: the data for choosing
    triton_step.BLOCK_GROUPS and NUM_WARPS. The module's settings are restored after."""
    from cfgfast import triton_step

    if "triton" not in cfgfast.available_backends():
        return []
    shape = (millions * 16, 65536)
    x = make_step_inputs(shape, torch.float32, "cuda", seed=0)
    out = torch.empty_like(x.z)
    saved = triton_step_setting()

    def use(groups, warps):
        triton_step.BLOCK_GROUPS, triton_step.NUM_WARPS = groups, warps

    variants = {"copy": lambda: out.copy_(x.z)}
    variants.update({setting: _step(x, "triton", out, functools.partial(use, *setting)) for setting in settings})
    try:
        ms = best_of_rounds(variants)
    finally:
        use(*saved)
    copy_gbs = 8 * out.numel() / ms["copy"] / 1e6
    result = []
    for setting in settings:
        groups, warps = setting
        gbs = 16 * out.numel() / ms[setting] / 1e6
        result.append(dict(block_groups=groups, num_warps=warps, gb_per_s=gbs, of_copy=gbs / copy_gbs))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="millions (2^20) of elements")
    parser.add_argument("--bf16", type=int, default=64, help="also time bfloat16 eps at this size (0: no)")
    parser.add_argument("--sweep", action="store_true", help="also time Triton block settings at the largest size")
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_table: no CUDA device")
    table = rows(args.sizes, args.bf16 or None)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cfgfast {cfgfast.__version__}")
    print(f"{'backend':8} {'eps':9} {'elements':>9} {'ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'of copy':>8} "
          f"{'eager ms':>9} {'speed-up':>9} {'noise ms':>9} {'no-noise ms':>11}")
    for r in table:
        print(f"{r['backend']:8} {r['eps']:9} {r['elements'] / 2**20:8.0f}M {r['ms']:8.3f} {r['gb_per_s']:7.0f} "
              f"{r['copy_gb_per_s']:9.0f} {100 * r['of_copy']:7.1f}% {r['eager_ms']:9.3f} {r['speedup']:8.1f}x "
              f"{r['noise_ms']:9.3f} {r['last_ms']:11.3f}")
    per_sampler = sampler_rows(max(args.sizes))
    print(f"per sampler at {max(args.sizes)}M float32 elements (bytes each sampler moves):")
    for r in per_sampler:
        print(f"  {r['sampler']:13} {r['backend']:7} {r['ms']:8.3f} ms {r['gb_per_s']:7.0f} GB/s "
              f"{100 * r['of_copy']:5.1f}% of copy")
    swept, cuda_swept = [], []
    if args.sweep:
        cuda_swept = cuda_sweep(max(args.sizes))
        print(f"cuda settings at {max(args.sizes)}M elements (groups of 4 per thread and round; blocks per SM, "
              "0: the default, 128):")
        for r in cuda_swept:
            print(f"  {r['eps']:8} eps, {r['groups_per_thread']} per thread, {r['blocks_per_sm']:3d} blocks/SM: "
                  f"{r['gb_per_s']:7.0f} GB/s, {100 * r['of_copy']:5.1f}% of copy")
        settings = [(g, w) for g in (128, 256, 512, 1024) for w in (4, 8)]
        swept = sweep(max(args.sizes), settings)
        print(f"triton settings at {max(args.sizes)}M float32 elements (groups of 4 per program, warps):")
        for r in swept:
            print(f"  BLOCK_GROUPS {r['block_groups']:5d} num_warps {r['num_warps']}: {r['gb_per_s']:7.0f} GB/s, "
                  f"{100 * r['of_copy']:5.1f}% of copy")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": table, "samplers": per_sampler, "cuda_sweep": cuda_swept, "triton_sweep": swept},
                      f, indent=1)


if __name__ == "__main__":
    main()
