"""The Triton backend: the reverse step of SPEC §2 with the noise of SPEC §3 fused into one pass, and the noise
alone. Kernels, launchers and settings live here together (as Liger-Kernel's rms_norm.py does); the ops are
registered with torch.library.triton_op, so torch.compile sees the kernels on a GPU.

Layout: inputs are contiguous [B, N] (N = elements per sample). Program p handles BLOCK_GROUPS groups of four
elements of one sample b = p // blocks_per_sample: one Philox4x32-10 call per group (counter (group, b +
index_offset, step, stream), key (seed mod 2^32, seed >> 32)), Box–Muller to four normals laid out
contiguously, the step, one store. Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors.

Import never fails: without triton the module only reports why in `refusals`.
"""

# No `from __future__ import annotations` here: torch.library.triton_op reads the op schema from live annotations.
import contextlib
import math
import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from ._checks import check, check_value, op_clip, op_noise_out, op_step_args, out_may_alias, seed_as_int64

try:
    import triton
    import triton.language as tl
except Exception as error:  # missing or broken (a failing backend import): the backend refuses with this reason
    triton = None
    _TRITON_ERROR: Optional[str] = f"triton cannot be imported ({error}); install it: pip install triton"
else:
    _TRITON_ERROR = None

# Triton picks interpreted or compiled kernels when they are defined (at import), from TRITON_INTERPRET, read as
# Triton reads it: through its knobs from Triton 3.4 (1, true, yes, on, y), "1" only before.
INTERPRETED = triton is not None and (bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
                                      else os.environ.get("TRITON_INTERPRET") == "1")

# Block settings: 256 groups = 1024 elements per program, 4 warps = two groups of four (two 16-byte vectors of
# float32) per thread and input, 32 registers on sm_90 (full occupancy). On an H100 (gpu_table.py --sweep,
# 2026-11-26, 64M float32 elements) 128 to 512 groups at 4 or 8 warps all gave 76-77% of the copy bandwidth but
# 128 groups at 8 warps (70%); 1024 groups gave 66% at 4 warps and 75% at 8. Those timings counted each call's host
# time (a Triton call cost about 0.1 ms more than a CUDA one), which may hide differences between kernels; so this
# stays the plain elementwise shape. The
# step is 12-16 bytes per element against ~65 instructions of noise and step per element. No autotune: the kernel writes `out` in place and out may alias z,
# so autotune's repeated benchmark launches would apply the step several times; and the shape (N per model)
# would cost a tuning run per model for a kernel whose best setting hardly depends on it.
BLOCK_GROUPS = 256
NUM_WARPS = 4
# Where the step's loads go. False: where ptxas puts them, which is below the noise (it sinks them to save
# registers: 32 a thread on sm_90), so a warp's reads are in flight only after its noise is computed and other
# warps must hide the latency. True: above the noise, in flight while it is computed (as the CUDA kernel does),
# at 53-54 registers (triton 3.6 and 3.8). On an H100 77.4% of the copy against 76.1%, within a run's noise, so
# False stays (gpu_table.py --sweep times both). (With one group
# a thread, 128 groups and 4 warps, the loads come first at 32 registers either way.)
LOADS_FIRST = False
# L2 prefetch: each step program, after issuing its loads, asks L2 (prefetch.global.L2, by inline assembly) for the
# inputs of the program PREFETCH_PER_SM x (the GPU's SMs) programs after it, which runs about that many programs an
# SM later; so more reads are in flight than the registers hold. 0 (the default): none. On an H100 4, 8 and 16
# gave 76%, 73% and 55% of the copy against 76% without (gpu_table.py --sweep times them). Only where every sample is a whole number of programs (4 BLOCK_GROUPS
# elements), and on a GPU only: the interpreter cannot run PTX, so under TRITON_INTERPRET the kernels are launched
# without it whatever this says.
PREFETCH_PER_SM = 0
# the testing helpers (Philox words, words to normals) are one word / one group per lane
HELPER_BLOCK = 1024

MAX_PER_SAMPLE = 2**30  # element offsets inside a sample (plus a block) are int32
MAX_PROGRAMS = 2**31  # CUDA's grid limit in x (2^31 - 1 blocks), which Triton's launcher reads as an int32


def refusals(device: torch.device) -> list[str]:
    """Why the triton backend cannot run on `device` (empty: it can)."""
    device = torch.device(device)
    reasons = []
    if _TRITON_ERROR is not None:
        reasons.append(_TRITON_ERROR)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reasons.append("it runs on CUDA tensors, but CUDA is not available")
    elif not (device.type == "cpu" and INTERPRETED):
        reasons.append(f"it runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before cfgfast is "
                       f"imported), got {device}")
    return reasons


def _require(device: torch.device) -> None:
    reasons = refusals(device)
    if reasons:
        raise RuntimeError("cfgfast: backend 'triton' cannot run here: " + "; ".join(reasons))


if triton is not None:
    _TWO_PI_2M24 = tl.constexpr(2.0 * math.pi * 2.0**-24)  # one turn over 2^24 steps of f; fp32(2 pi) * 2^-24

    @triton.jit
    def _log_positive(x, SCALE: tl.constexpr):
        """ln(x 2^-SCALE) for positive normal float32 x: Cephes' logf, the same operations as log_positive in
        csrc/include/cfgfast/normal.h (tl.log may lower to an approximate instruction on NVIDIA GPUs, whose
        absolute error near x = 1 would swamp -2 ln u there). x = (1 + m) 2^e with 1 + m in [sqrt(1/2), sqrt(2)),
        split exactly by integer arithmetic on the bits."""
        ix = x.to(tl.uint32, bitcast=True) + (0x3F800000 - 0x3F3504F3)
        e = ((ix >> 23) - (127 + SCALE)).to(tl.int32, bitcast=True).to(tl.float32)
        m = ((ix & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
        z = m * m
        z2 = z * z
        p01 = tl.fma(m, -2.4999993993e-1, 3.3333331174e-1)
        p23 = tl.fma(m, -1.6668057665e-1, 2.0000714765e-1)
        p45 = tl.fma(m, -1.2420140846e-1, 1.4249322787e-1)
        p67 = tl.fma(m, -1.1514610310e-1, 1.1676998740e-1)
        y = tl.fma(z2, tl.fma(z2, 7.0376836292e-2, tl.fma(z, p67, p45)), tl.fma(z, p23, p01))
        y = y * m * z
        y = tl.fma(e, -2.12194440e-4, y)
        y = tl.fma(z, -0.5, y)
        return tl.fma(e, 0.693359375, m + y)

    @triton.jit
    def _box_muller_radius(x):
        """sqrt(-2 ln u), u(x) = ((x >> 8) + 1) 2^-24 in (0, 1] (SPEC §3); x uint32, so >> is logical. The
        integer (x >> 8) + 1 <= 2^24 converts exactly; the 2^-24 goes into the exponent.

        The square root as sqrt_radius in csrc/include/cfgfast/common.h: -2 ln u is -0 or in [1.2e-7, 33.3],
        where the correctly rounded sqrt.rn is its fast path alone (reciprocal square root, one Newton step);
        without the branch to its slow path the program needs 8% fewer instructions and 32 registers, not 40
        (sm_90). Zero (u = 1) by a select, as rsqrt(0) is inf."""
        v = -2.0 * _log_positive(((x >> 8) + 1).to(tl.float32), 24)
        r = tl.math.rsqrt(v)
        s = v * r
        return tl.where(v == 0.0, v, tl.fma(tl.fma(-s, s, v), r * 0.5, s))

    @triton.jit
    def _sincos_turns(x):
        """(sin, cos) of 2 pi f, f(x) = (x >> 8) 2^-24 in [0, 1), as sincos_turns in normal.h.

        Reduced exactly to the nearest quarter turn in fixed point, so the float32 angle is |a| <= pi/4 with a
        relative rounding error, not an absolute one of ulp(2 pi); then Cephes' sinf/cosf polynomials.
        """
        q = x >> 8
        k = (q + (1 << 21)) >> 22  # nearest quarter turn, 0..4
        r = (q - (k << 22)).to(tl.int32, bitcast=True)  # f - k/4 in [-1/8, 1/8) in units of 2^-24
        a = r.to(tl.float32) * _TWO_PI_2M24
        z = a * a
        sp = tl.fma(tl.fma(z, -1.9515295891e-4, 8.3321608736e-3), z, -1.6666654611e-1)
        sin_a = tl.fma(sp * z, a, a)
        cp = tl.fma(tl.fma(z, 2.443315711809948e-5, -1.388731625493765e-3), z, 4.166664568298827e-2)
        cos_a = tl.fma(cp * z, z, tl.fma(z, -0.5, 1.0))
        odd = (k & 1) != 0  # rotate by k quarter turns: swap on odd k, then the signs
        s = tl.where(odd, cos_a, sin_a)
        c = tl.where(odd, sin_a, cos_a)
        s = tl.where((k & 2) != 0, -s, s)
        c = tl.where(((k + 1) & 2) != 0, -c, c)
        return s, c

    @triton.jit
    def _words_to_normals(x0, x1, x2, x3):
        """Box–Muller of SPEC §3: [BLOCK, 4] normals, row q the four of group q, from [BLOCK] uint32 words.

        Built by broadcasting each group's radii and angles along the row (not by joining and reshaping), so the
        normals share the [BLOCK, 4] layout of the step's loads: no shuffle through shared memory (checked by
        tests/test_codegen.py)."""
        rho0, rho1 = _box_muller_radius(x0)[:, None], _box_muller_radius(x2)[:, None]
        s0, c0 = _sincos_turns(x1)
        s1, c1 = _sincos_turns(x3)
        col = tl.arange(0, 4)[None, :]
        first = col < 2  # columns 0, 1: rho0 cos0, rho0 sin0; columns 2, 3: rho1 cos1, rho1 sin1
        rho = tl.where(first, rho0, rho1)
        cos = tl.where(first, c0[:, None], c1[:, None])
        sin = tl.where(first, s0[:, None], s1[:, None])
        return rho * tl.where((col & 1) == 0, cos, sin)

    @triton.jit
    def _philox(seed_lo, seed_hi, c0, c1, c2, c3):
        """Philox4x32-10 (Random123) with key (seed_lo, seed_hi) = (seed mod 2^32, seed >> 32): tl.random.philox
        splits its 64-bit seed so. The words arrive as int32 (_word: a word >= 2^31 as its two's complement, so
        that every launcher types it int32: Inductor of torch 2.11 failed on an int argument >= 2^31), so the low
        one is taken mod 2^32 before the high one goes above it. Under torch.compile a word equal to 1 arrives as a
        constant (Inductor makes every int argument of 1 one), a Python int: adding a tensor makes it one."""
        zero = tl.zeros([], tl.int64)
        low = (seed_lo + zero).to(tl.uint32).to(tl.int64)  # (uint32 to int64 extends with zeros)
        return tl.random.philox(((seed_hi + zero) << 32) | low, c0, c1, c2, c3)

    @triton.jit
    def _sample_normals(seed_lo, seed_hi, group, sample, step, stream):
        """[BLOCK, 4] normals of the [BLOCK] groups `group` (int32) of global sample `sample` (int64)."""
        c0 = group.to(tl.uint32)
        zero = c0 * 0
        # step and stream: int32 scalars (_word) or a constant (Triton makes an argument equal to 1 one), added to
        # a uint32 block first (int32 + uint32 is uint32, the same bits), then uint32 words
        x0, x1, x2, x3 = _philox(seed_lo, seed_hi, c0, zero + sample.to(tl.uint32), (zero + step).to(tl.uint32),
                                 (zero + stream).to(tl.uint32))
        return _words_to_normals(x0, x1, x2, x3)

    @triton.jit
    def _prefetch_l2(pointers, mask):
        """prefetch.global.L2 of each pointer where mask holds: a hint, with no result (the inline assembly's
        dummy output is 0 and unused; not pure, so the compiler keeps it)."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }", "=r,l,r",
            [pointers, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _load_step_inputs(z_ptr, eps_cond_ptr, eps_uncond_ptr, offset, mask):
        """z, eps_cond and eps_uncond at [BLOCK, 4] offsets, the eps widened to float32."""
        z = tl.load(z_ptr + offset, mask=mask, other=0.0)
        eps_cond = tl.load(eps_cond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        eps_uncond = tl.load(eps_uncond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        return z, eps_cond, eps_uncond

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "index_offset", "prefetch_ahead"])
    def _reverse_step_kernel(
        out_ptr, z_ptr, eps_cond_ptr, eps_uncond_ptr, w_ptr, noise_ptr,
        alpha, sigma, mean_z, mean_eps, mean_z_clip, mean_x_clip, noise_std, clip,
        seed_lo, seed_hi, step, index_offset, per_sample, blocks_per_sample, prefetch_ahead,
        HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr,
        LOADS_FIRST: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    ):
        """One reverse step (SPEC §2) of 4 BLOCK elements of one sample; the formulas of
        csrc/include/cfgfast/step.h in float32. out may alias z: each element is read before it is written.
        PREFETCH: also the L2 prefetch of the inputs of program pid + prefetch_ahead (PREFETCH_PER_SM)."""
        # The coefficients in float32, as the launch passes them eagerly; torch.compile's launch of the same
        # kernel may type Python floats otherwise, and the step must not depend on who launches it.
        alpha, sigma, clip = tl.cast(alpha, tl.float32), tl.cast(sigma, tl.float32), tl.cast(clip, tl.float32)
        mean_z, mean_eps = tl.cast(mean_z, tl.float32), tl.cast(mean_eps, tl.float32)
        mean_z_clip, mean_x_clip = tl.cast(mean_z_clip, tl.float32), tl.cast(mean_x_clip, tl.float32)
        noise_std = tl.cast(noise_std, tl.float32)
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        group = (pid - b * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
        j = group[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK, 4]: element index in the sample
        mask = j < per_sample
        offset = b.to(tl.int64) * per_sample + j
        if LOADS_FIRST:
            # per_sample >= 0 always: a branch that the compiler cannot fold (unless per_sample is 1, a constant),
            # out of which ptxas does not sink the loads
            if per_sample >= 0:
                z, eps_cond, eps_uncond = _load_step_inputs(z_ptr, eps_cond_ptr, eps_uncond_ptr, offset, mask)
            else:
                z = tl.zeros([BLOCK, 4], tl.float32)
                eps_cond = z
                eps_uncond = z
        else:
            z, eps_cond, eps_uncond = _load_step_inputs(z_ptr, eps_cond_ptr, eps_uncond_ptr, offset, mask)
        if PREFETCH:
            # the inputs of program pid + prefetch_ahead, which (every sample a whole number of programs: the
            # launch sets PREFETCH only then) start prefetch_ahead programs' elements further on: one address a
            # group (16 bytes of z), where that program exists
            first = b.to(tl.int64) * per_sample + group * 4 + (prefetch_ahead + tl.zeros([], tl.int64)) * (4 * BLOCK)
            due = (group * 0 + pid) < tl.num_programs(0) - prefetch_ahead
            _prefetch_l2(z_ptr + first, due)
            _prefetch_l2(eps_cond_ptr + first, due)
            _prefetch_l2(eps_uncond_ptr + first, due)
            if HAS_NOISE and not LAST:  # the last step does not read the noise
                _prefetch_l2(noise_ptr + first, due)
        w = tl.load(w_ptr + b)
        eps = (1.0 + w) * eps_cond - w * eps_uncond  # paper Eq. 6
        if CLIP or LAST:
            x = tl.div_rn(z - sigma * eps, alpha)  # x~ = (z - sigma eps~) / alpha
            if CLIP:
                x = tl.where(x < -clip, -clip, tl.where(x > clip, clip, x))  # NaN passes, as torch.clamp
        if LAST:
            result = x
        else:
            if HAS_NOISE:
                n = tl.load(noise_ptr + offset, mask=mask, other=0.0)
            else:
                n = _sample_normals(seed_lo, seed_hi, group, b.to(tl.int64) + index_offset, step, 1)
            if CLIP:
                result = mean_z_clip * z + mean_x_clip * x + noise_std * n  # mu, first form
            else:
                result = mean_z * z - mean_eps * eps + noise_std * n  # mu, second form
        tl.store(out_ptr + offset, result, mask=mask)

    # (noise_stream, not stream: torch.compile's launcher of a user kernel has its own argument named stream)
    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "noise_stream", "index_offset"])
    def _normal_noise_kernel(out_ptr, seed_lo, seed_hi, step, noise_stream, index_offset, per_sample,
                             blocks_per_sample, BLOCK: tl.constexpr):
        """The noise of SPEC §3 for 4 BLOCK elements of one sample."""
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        group = (pid - b * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
        j = group[:, None] * 4 + tl.arange(0, 4)[None, :]
        n = _sample_normals(seed_lo, seed_hi, group, b.to(tl.int64) + index_offset, step, noise_stream)
        tl.store(out_ptr + b.to(tl.int64) * per_sample + j, n, mask=j < per_sample)

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _philox_words_kernel(x0_ptr, x1_ptr, x2_ptr, x3_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, seed_lo, seed_hi, numel,
                             BLOCK: tl.constexpr):
        """Testing helper: raw Philox words for counters held in int64 (written back as int64 in [0, 2^32))."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        c0 = tl.load(c0_ptr + i, mask=mask, other=0).to(tl.uint32)
        c1 = tl.load(c1_ptr + i, mask=mask, other=0).to(tl.uint32)
        c2 = tl.load(c2_ptr + i, mask=mask, other=0).to(tl.uint32)
        c3 = tl.load(c3_ptr + i, mask=mask, other=0).to(tl.uint32)
        x0, x1, x2, x3 = _philox(seed_lo, seed_hi, c0, c1, c2, c3)
        tl.store(x0_ptr + i, x0.to(tl.int64), mask=mask)
        tl.store(x1_ptr + i, x1.to(tl.int64), mask=mask)
        tl.store(x2_ptr + i, x2.to(tl.int64), mask=mask)
        tl.store(x3_ptr + i, x3.to(tl.int64), mask=mask)

    @triton.jit
    def _words_to_normals_kernel(out_ptr, x0_ptr, x1_ptr, x2_ptr, x3_ptr, groups, BLOCK: tl.constexpr):
        """Testing helper: the Box–Muller mapping alone, [groups, 4] normals from four int64 word tensors."""
        g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 4 g overflows int32 from 2^29 groups
        mask = g < groups
        x0 = tl.load(x0_ptr + g, mask=mask, other=0).to(tl.uint32)
        x1 = tl.load(x1_ptr + g, mask=mask, other=0).to(tl.uint32)
        x2 = tl.load(x2_ptr + g, mask=mask, other=0).to(tl.uint32)
        x3 = tl.load(x3_ptr + g, mask=mask, other=0).to(tl.uint32)
        j = g[:, None] * 4 + tl.arange(0, 4)[None, :]
        tl.store(out_ptr + j, _words_to_normals(x0, x1, x2, x3), mask=j < 4 * groups)

    def _wrapped(kernel):
        """The kernel as torch.compile must see it inside a triton_op. Under TRITON_INTERPRET=1 older torch
        (2.11) refuses to wrap an interpreted kernel; there it is called directly (eagerly, the same launch)."""
        try:
            return torch.library.wrap_triton(kernel)
        except RuntimeError:
            if INTERPRETED:
                return kernel
            raise

    def _check_launch(out: torch.Tensor) -> None:
        """The sizes one launch takes: int32 offsets inside a sample, and a grid (batch x programs a sample) below
        CUDA's 2^31 blocks, which Triton's launcher would refuse with an OverflowError from inside."""
        check(out.device.type in ("cuda", "meta") or (INTERPRETED and out.device.type == "cpu"),
              lambda: f"cfgfast: the triton kernels take CUDA tensors (CPU tensors under TRITON_INTERPRET=1), "
                      f"got out on {out.device}")
        per_sample = out.numel() // max(out.shape[0], 1)
        check_value(per_sample < MAX_PER_SAMPLE,
                    lambda: "cfgfast: the triton backend takes fewer than 2^30 elements per sample")
        programs = out.shape[0] * ((per_sample + 4 * BLOCK_GROUPS - 1) // (4 * BLOCK_GROUPS))
        check_value(programs < MAX_PROGRAMS,
                    lambda: f"cfgfast: the triton backend launches fewer than 2^31 programs (batch x "
                            f"ceil(elements per sample / {4 * BLOCK_GROUPS})), got {programs}; use the "
                            f"cuda backend or smaller batches")

    def _on_device(out: torch.Tensor):
        """Triton launches on the current device and its current stream, whatever device the pointers are on: the
        launch is made current on the tensors' device (as the cuda backend's device guard does), so tensors on a
        GPU other than the current one are not read by kernels on the current one. Not for fake tensors (the op's
        body is also its fake kernel, which torch.compile and export trace without a GPU; nothing is launched)."""
        if out.device.type != "cuda" or is_fake(out):
            return contextlib.nullcontext()
        return torch.cuda.device(out.device)

    def _prefetch_ahead(out: torch.Tensor) -> int:
        """Programs ahead that the step prefetches (PREFETCH_PER_SM x the GPU's SMs), or 0: none (the setting; CPU
        tensors under the interpreter, which cannot run the prefetch's PTX; or samples that are not a whole number
        of programs, where a later program's inputs are not a fixed distance on; ROCm, where "cuda" tensors are not
        NVIDIA's; fake tensors traced where no GPU is). Under torch.compile it is read once, when the graph is
        traced, like the other settings here."""
        per_sample = out.numel() // max(out.shape[0], 1)
        if PREFETCH_PER_SM <= 0 or INTERPRETED or out.device.type != "cuda" or per_sample % (4 * BLOCK_GROUPS):
            return 0
        if torch.version.hip is not None or not torch.cuda.is_available():
            return 0
        return PREFETCH_PER_SM * torch.cuda.get_device_properties(out.device).multi_processor_count

    def _word(value: int) -> int:
        """A 32-bit counter or key word in [0, 2^32) as the int32 of the same bits, which every launcher types int32
        (torch.compile's Inductor of torch 2.11 failed on a user kernel's int argument >= 2^31: "'int' object has
        no attribute 'xreplace'"). Mod and floor division: also for a symbolic int under torch.compile."""
        return (value + 2**31) % 2**32 - 2**31

    def _seed_words(seed: int) -> tuple[int, int]:
        """The ops' int64 seed (two's complement of a seed >= 2^63) as its two 32-bit words (_word)."""
        return _word(seed % 2**32), _word((seed // 2**32) % 2**32)

    def _launch_shape(out: torch.Tensor) -> tuple[int, int, tuple[int]]:
        """(elements per sample, programs per sample, grid)."""
        batch = out.shape[0]
        per_sample = out.numel() // batch
        blocks = triton.cdiv(per_sample, 4 * BLOCK_GROUPS)
        return per_sample, blocks, (batch * blocks,)

    @torch.library.triton_op("cfgfast::triton_reverse_step_", mutates_args=("out",))
    def _reverse_step_op(
        out: torch.Tensor,
        z: torch.Tensor,
        eps_cond: torch.Tensor,
        eps_uncond: torch.Tensor,
        w: torch.Tensor,
        noise: Optional[torch.Tensor],
        coef: list[float],
        seed: int,
        step: int,
        index_offset: int,
        clip: Optional[float],
        last: bool,
    ) -> None:
        op_step_args(out, z, eps_cond, eps_uncond, w, noise, coef, step, index_offset)
        op_clip(clip)
        tensors = (z, eps_cond, eps_uncond, w) + (() if noise is None else (noise,))
        check(all(t.is_contiguous() for t in tensors),
              lambda: "cfgfast: the triton kernel takes contiguous inputs")
        check(all(t.device == out.device for t in tensors),
              lambda: "cfgfast: all tensors must be on out's device")
        _check_launch(out)
        if out.numel() == 0 or out.device.type == "meta":  # (meta tensors: shapes only, nothing to compute)
            return
        if not is_fake(out):  # (traced by torch.compile, the op's fake tensors have no addresses)
            out_may_alias(out, z=z, eps_cond=eps_cond, eps_uncond=eps_uncond, w=w, noise=noise)
        per_sample, blocks, grid = _launch_shape(out)
        alpha, sigma, mean_z, mean_eps, mean_z_clip, mean_x_clip, noise_std = coef
        ahead = _prefetch_ahead(out)
        with _on_device(out):
            _wrapped(_reverse_step_kernel)[grid](
                out, z, eps_cond, eps_uncond, w, z if noise is None else noise,
                alpha, sigma, mean_z, mean_eps, mean_z_clip, mean_x_clip, noise_std, 0.0 if clip is None else clip,
                *_seed_words(seed), _word(step), _word(index_offset), per_sample, blocks, ahead,
                HAS_NOISE=noise is not None, CLIP=clip is not None, LAST=last, BLOCK=BLOCK_GROUPS,
                LOADS_FIRST=LOADS_FIRST, PREFETCH=ahead > 0, num_warps=NUM_WARPS,
            )

    @torch.library.triton_op("cfgfast::triton_normal_noise_", mutates_args=("out",))
    def _normal_noise_op(out: torch.Tensor, seed: int, step: int, stream: int, index_offset: int) -> None:
        op_noise_out(out, step, stream, index_offset)
        _check_launch(out)
        if out.numel() == 0 or out.device.type == "meta":
            return
        per_sample, blocks, grid = _launch_shape(out)
        with _on_device(out):
            _wrapped(_normal_noise_kernel)[grid](
                out, *_seed_words(seed), _word(step), _word(stream), _word(index_offset), per_sample, blocks,
                BLOCK=BLOCK_GROUPS,
                num_warps=NUM_WARPS
            )


def reverse_step_triton(out, z, eps_cond, eps_uncond, w, noise, coef: list[float], seed: int, step: int,
                        index_offset: int, clip: Optional[float], last: bool) -> None:
    """One reverse step into `out` (contiguous float32 like z; may be z itself). Inputs may be views: they are
    made contiguous (C order over each sample, as SPEC §3 counts elements). seed in [0, 2^64); coef: the seven
    float64 numbers of StepCoefficients.as_list(), used as float32."""
    _require(z.device)
    torch.ops.cfgfast.triton_reverse_step_(
        out, z.contiguous(), eps_cond.contiguous(), eps_uncond.contiguous(), w.contiguous(),
        None if noise is None else noise.contiguous(), [float(c) for c in coef], seed_as_int64(seed), step,
        index_offset, None if clip is None else float(clip), bool(last),
    )


def normal_noise_triton(out, seed: int, step: int, stream: int, index_offset: int) -> None:
    """The noise of SPEC §3 into `out` (contiguous float32 [B, ...]); seed in [0, 2^64)."""
    _require(out.device)
    torch.ops.cfgfast.triton_normal_noise_(out, seed_as_int64(seed), step, stream, index_offset)


def philox_words_triton(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """Testing helper: Philox4x32-10 words for counter tensors (any integer dtype, values in [0, 2^32), one
    shape) under key (seed mod 2^32, seed >> 32); four int64 tensors of 32-bit values."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), torch.device("cpu"))
    _require(device)
    counters = torch.broadcast_tensors(*(torch.as_tensor(c, device=device) for c in (c0, c1, c2, c3)))
    counters = [c.to(torch.int64).contiguous() for c in counters]
    words = [torch.empty_like(counters[0]) for _ in range(4)]
    numel = counters[0].numel()
    if numel:
        grid = (triton.cdiv(numel, HELPER_BLOCK),)
        _philox_words_kernel[grid](*words, *counters, *_seed_words(seed_as_int64(seed)), numel, BLOCK=HELPER_BLOCK)
    return tuple(words)


def words_to_normals_triton(x0, x1, x2, x3) -> torch.Tensor:
    """Testing helper: the kernels' Box–Muller on given words (int64 tensors of one shape [...]); float32 [..., 4]."""
    words = [torch.as_tensor(x).to(torch.int64).contiguous() for x in (x0, x1, x2, x3)]
    _require(words[0].device)
    out = torch.empty(words[0].shape + (4,), dtype=torch.float32, device=words[0].device)
    groups = words[0].numel()
    if groups:
        grid = (triton.cdiv(groups, HELPER_BLOCK),)
        _words_to_normals_kernel[grid](out, *words, groups, BLOCK=HELPER_BLOCK)
    return out
