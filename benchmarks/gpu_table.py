"""One table of the GPU reverse step: per backend and size, time, achieved GB/s (3 reads + 1 write of
float32), the ratio to a device-to-device copy measured in the same run, and the speed-up over the eager
PyTorch step with torch.randn noise. Run by benchmarks/gpu_check.sh on a machine with a GPU.

    python benchmarks/gpu_table.py [--sizes 1 16 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import cfgfast
from cfgfast.reference import reverse_step_reference

from .utils import make_step_inputs


def time_ms(fn, warmup=10, repeat=50) -> float:
    """Median of `repeat` calls timed with CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rows(sizes_m: list[int]) -> list[dict]:
    out_rows = []
    backends = [b for b in ("cuda", "triton") if b in cfgfast.available_backends()]
    for millions in sizes_m:
        shape = (max(1, millions * 16), 65536)  # [B, N]: millions * 2^20 elements
        x = make_step_inputs(shape, torch.float32, "cuda", seed=0)
        out = torch.empty_like(x.z)
        elements = math.prod(shape)
        step_bytes = 16 * elements  # z, eps_cond, eps_uncond read; z' written; float32
        copy_ms = time_ms(lambda: out.copy_(x.z))
        copy_gbs = 8 * elements / copy_ms / 1e6
        eager_ms = time_ms(lambda: reverse_step_reference(x.z, x.eps_cond, x.eps_uncond, x.w, x.coefficients,
                                                          torch.randn_like(x.z)))
        for backend in backends:
            ms = time_ms(lambda: cfgfast.reverse_step(x.z, x.eps_cond, x.eps_uncond, x.lam, x.lam_next, x.w, x.v,
                                                      seed=1, step=x.step, backend=backend, out=out))
            gbs = step_bytes / ms / 1e6
            out_rows.append(dict(backend=backend, elements=elements, ms=ms, gb_per_s=gbs, copy_gb_per_s=copy_gbs,
                                 of_copy=gbs / copy_gbs, eager_ms=eager_ms, speedup=eager_ms / ms))
        del x, out
        torch.cuda.empty_cache()
    return out_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="millions (2^20) of elements")
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_table: no CUDA device")
    table = rows(args.sizes)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cfgfast {cfgfast.__version__}")
    print(f"{'backend':8} {'elements':>10} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8} {'eager ms':>9} "
          f"{'speed-up':>9}")
    for r in table:
        print(f"{r['backend']:8} {r['elements'] / 2**20:9.0f}M {r['ms']:8.3f} {r['gb_per_s']:8.0f} "
              f"{r['copy_gb_per_s']:10.0f} {100 * r['of_copy']:7.1f}% {r['eager_ms']:9.3f} {r['speedup']:8.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
