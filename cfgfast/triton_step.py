"""The Triton backend: the guided sampler step of SPEC §6 (csrc/include/cfgfast/step.h) with the noise of SPEC §3
fused into one pass, and the noise alone. Kernels, launchers and settings live here together (as Liger-Kernel's
rms_norm.py does); the ops are registered with torch.library.triton_op, so torch.compile sees the kernels on a GPU.

Layout: inputs are contiguous [B, N] (N = elements per sample). Program p handles BLOCK_GROUPS groups of four
elements of one sample b = p // blocks_per_sample: one Philox4x32-10 call per group (counter (group, b +
index_offset, step, stream), key (seed mod 2^32, seed >> 32)), Box–Muller to four normals laid out
contiguously, the step, its stores. Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors.

Import never fails: without triton the module only reports why in `refusals`.
"""

# No `from __future__ import annotations` here: torch.library.triton_op reads the op schema from live annotations.
import contextlib
import math
import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from ._checks import check, check_value, op_guided_step_args, op_guided_table_args, op_noise_out, seed_as_int64

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

# 256 groups = 1024 elements per program, 4 warps = two groups of four (two 16-byte vectors of float32) per thread
# and input: the plain elementwise shape, which no other block or warp count measured on an H100 beat (README).
# No autotune: out may alias z, so autotune's repeated benchmark launches would apply the step several times, and
# the best setting hardly depends on the shape, which would cost a tuning run per model.
BLOCK_GROUPS = 256
NUM_WARPS = 4

MAX_PER_SAMPLE = 2**30  # element offsets inside a sample (plus a block) are int32
MAX_PROGRAMS = 2**31  # CUDA's grid limit in x (2^31 - 1 blocks), which Triton's launcher reads as an int32
NUM_COEFFICIENTS = 10  # StepCoef in csrc/include/cfgfast/step.h


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
    def _noise_term(noise_ptr, nu_ptr, offset, mask, noise_std, noise_nu, seed_lo, seed_hi, group, sample, step,
                    EXPLICIT_NOISE: tl.constexpr, NU: tl.constexpr):
        """scale n: the given noise or the normals of SPEC §3 (stream 1), scale = noise_std, or noise_std
        exp(noise_nu nu) with learned variance."""
        if EXPLICIT_NOISE:
            n = tl.load(noise_ptr + offset, mask=mask, other=0.0)
        else:
            n = _sample_normals(seed_lo, seed_hi, group, sample, step, 1)
        if NU:
            nu = tl.load(nu_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            return (noise_std * tl.exp(noise_nu * nu)) * n
        return noise_std * n

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "index_offset"])
    def _guided_step_kernel(
        out_ptr, z_ptr, pred_cond_ptr, pred_uncond_ptr, weights_ptr, x_prev_ptr, nu_ptr, noise_ptr, table_ptr,
        step_ptr, pred_z, pred_g, mean_z, mean_x, direct_z, direct_g, prev, uncond, noise_std, noise_nu, clip,
        seed_lo, seed_hi, step, index_offset, per_sample, blocks_per_sample, table_len,
        CLIP: tl.constexpr, READ_PREV: tl.constexpr, WRITE_PREV: tl.constexpr, DRAW: tl.constexpr,
        EXPLICIT_NOISE: tl.constexpr, NU: tl.constexpr, TABLE: tl.constexpr, WITH_Z: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One guided step (csrc/include/cfgfast/step.h, in its order, float32) of 4 BLOCK elements of one sample.
        out may alias z: each element is read before it is written; x_prev is read before x~ is written over it.

        The row: the scalars pred_z .. noise_nu, or with TABLE row t = *step_ptr of table_ptr [table_len, 10]
        (float64), read here so that a CUDA graph replays the step with a new t; t outside the table gives NaN.
        READ_PREV: x_prev given and (a host row) prev != 0; DRAW: (a host row) noise_std != 0. With TABLE they say
        what the row may need, and the row decides by branches uniform over the grid. Without DRAW the kernel has no
        Philox. WITH_Z: weights [B, 3], whose third column w_z adds w_z z to g."""
        if TABLE:
            t = tl.load(step_ptr)
            valid = (t >= 0) & (t < table_len)
            row = table_ptr + tl.where(valid, t, 0) * 10  # (NUM_COEFFICIENTS: a jit function reads no global)
            nan = float("nan")
            # float64 rounded to float32 once, as the host launch rounds its Python floats
            pred_z = tl.where(valid, tl.load(row).to(tl.float32), nan)
            pred_g = tl.where(valid, tl.load(row + 1).to(tl.float32), nan)
            mean_z = tl.where(valid, tl.load(row + 2).to(tl.float32), nan)
            mean_x = tl.where(valid, tl.load(row + 3).to(tl.float32), nan)
            direct_z = tl.where(valid, tl.load(row + 4).to(tl.float32), nan)
            direct_g = tl.where(valid, tl.load(row + 5).to(tl.float32), nan)
            prev = tl.where(valid, tl.load(row + 6).to(tl.float32), nan)
            uncond = tl.where(valid, tl.load(row + 7).to(tl.float32), nan)
            noise_std = tl.where(valid, tl.load(row + 8).to(tl.float32), nan)
            noise_nu = tl.where(valid, tl.load(row + 9).to(tl.float32), nan)
            step = tl.where(valid, t, 0)
        else:
            # float32 as the eager launch passes them; torch.compile's launch may type Python floats otherwise, and
            # the step must not depend on who launches it
            pred_z, pred_g = tl.cast(pred_z, tl.float32), tl.cast(pred_g, tl.float32)
            mean_z, mean_x = tl.cast(mean_z, tl.float32), tl.cast(mean_x, tl.float32)
            direct_z, direct_g = tl.cast(direct_z, tl.float32), tl.cast(direct_g, tl.float32)
            prev, uncond = tl.cast(prev, tl.float32), tl.cast(uncond, tl.float32)
            noise_std, noise_nu = tl.cast(noise_std, tl.float32), tl.cast(noise_nu, tl.float32)
        clip = tl.cast(clip, tl.float32)
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        group = (pid - b * blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
        j = group[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK, 4]: element index in the sample
        mask = j < per_sample
        offset = b.to(tl.int64) * per_sample + j
        z = tl.load(z_ptr + offset, mask=mask, other=0.0)
        out_cond = tl.load(pred_cond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        out_uncond = tl.load(pred_uncond_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        columns = 3 if WITH_Z else 2
        w_cond = tl.load(weights_ptr + columns * b)
        w_uncond = tl.load(weights_ptr + columns * b + 1)
        g = w_cond * out_cond - w_uncond * out_uncond  # guided_output
        if WITH_Z:
            g = g + tl.load(weights_ptr + columns * b + 2) * z
        x = pred_z * z + pred_g * g  # predicted_x
        if CLIP:
            x = tl.where(x < -clip, -clip, tl.where(x > clip, clip, x))  # NaN passes, as torch.clamp
            result = mean_z * z + mean_x * x  # step_mean, first form
        else:
            result = direct_z * z + direct_g * g  # step_mean, second form: no division-amplified cancellation
        result = result + uncond * out_uncond
        if READ_PREV:
            if TABLE:
                if prev != 0.0:  # an uninitialised state (a multistep sampler's first step) is not read
                    result = result + prev * tl.load(x_prev_ptr + offset, mask=mask, other=0.0)
            else:
                result = result + prev * tl.load(x_prev_ptr + offset, mask=mask, other=0.0)
        if DRAW:
            if TABLE:
                if noise_std != 0.0:  # a deterministic row draws nothing
                    result = result + _noise_term(noise_ptr, nu_ptr, offset, mask, noise_std, noise_nu, seed_lo,
                                                  seed_hi, group, b.to(tl.int64) + index_offset, step,
                                                  EXPLICIT_NOISE, NU)
            else:
                result = result + _noise_term(noise_ptr, nu_ptr, offset, mask, noise_std, noise_nu, seed_lo, seed_hi,
                                              group, b.to(tl.int64) + index_offset, step, EXPLICIT_NOISE, NU)
        tl.store(out_ptr + offset, result, mask=mask)
        if WRITE_PREV:
            tl.store(x_prev_ptr + offset, x, mask=mask)

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


    def _nonzero_f32(value: float) -> bool:
        """Whether a float64 coefficient is nonzero once rounded to float32 (as the kernels use it): magnitudes up
        to 2^-150 round to zero; NaN is nonzero."""
        return not abs(value) <= 2.0**-150

    def _ready(out: torch.Tensor, **inputs: Optional[torch.Tensor]) -> bool:
        """The checks both step ops make after the contract's: inputs contiguous, a launch the grid can take; False
        where there is nothing to compute."""
        for name, t in inputs.items():
            check(t is None or t.is_contiguous(),
                  lambda: f"cfgfast: the triton kernels take contiguous tensors, got {name} with strides {t.stride()}")
        _check_launch(out)
        return out.numel() != 0 and out.device.type != "meta"  # (meta tensors: shapes only, nothing to compute)

    @torch.library.triton_op("cfgfast::triton_guided_step_", mutates_args=("out", "x_prev"))
    def _guided_step_op(
        out: torch.Tensor,
        z: torch.Tensor,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor,
        weights: torch.Tensor,
        x_prev: Optional[torch.Tensor],
        nu: Optional[torch.Tensor],
        noise: Optional[torch.Tensor],
        coef: list[float],
        seed: int,
        step: int,
        index_offset: int,
        clip: Optional[float],
    ) -> None:
        op_guided_step_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef, step, index_offset, clip)
        if not _ready(out, z=z, pred_cond=pred_cond, pred_uncond=pred_uncond, weights=weights, nu=nu,
                      noise=noise):
            return
        # what the row needs, decided here so that each kernel holds only that (no Philox where nothing is drawn)
        draw = _nonzero_f32(coef[8])
        per_sample, blocks, grid = _launch_shape(out)
        with _on_device(out):
            _wrapped(_guided_step_kernel)[grid](
                out, z, pred_cond, pred_uncond, weights, z if x_prev is None else x_prev,
                pred_cond if nu is None else nu, z if noise is None else noise, z, z,  # (unused pointers: any)
                *coef, 0.0 if clip is None else clip, *_seed_words(seed), _word(step), _word(index_offset),
                per_sample, blocks, 0,
                CLIP=clip is not None, READ_PREV=x_prev is not None and _nonzero_f32(coef[6]),
                WRITE_PREV=x_prev is not None, DRAW=draw, EXPLICIT_NOISE=draw and noise is not None,
                NU=draw and nu is not None, TABLE=False, WITH_Z=weights.shape[1] == 3, BLOCK=BLOCK_GROUPS,
                num_warps=NUM_WARPS,
            )

    @torch.library.triton_op("cfgfast::triton_guided_step_table_", mutates_args=("out", "x_prev"))
    def _guided_step_table_op(
        out: torch.Tensor,
        z: torch.Tensor,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor,
        weights: torch.Tensor,
        x_prev: Optional[torch.Tensor],
        nu: Optional[torch.Tensor],
        coef_table: torch.Tensor,
        step: torch.Tensor,
        seed: int,
        index_offset: int,
        clip: Optional[float],
    ) -> None:
        op_guided_table_args(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, index_offset,
                             clip)
        if not _ready(out, z=z, pred_cond=pred_cond, pred_uncond=pred_uncond, weights=weights, nu=nu,
                      coef_table=coef_table, step=step):
            return
        per_sample, blocks, grid = _launch_shape(out)
        # t and its row stay on the device (a CUDA graph replays the launch): the row's needs are decided there
        with _on_device(out):
            _wrapped(_guided_step_kernel)[grid](
                out, z, pred_cond, pred_uncond, weights, z if x_prev is None else x_prev,
                pred_cond if nu is None else nu, z, coef_table, step,
                *([0.0] * NUM_COEFFICIENTS), 0.0 if clip is None else clip, *_seed_words(seed), 0,
                _word(index_offset), per_sample, blocks, coef_table.shape[0],
                CLIP=clip is not None, READ_PREV=x_prev is not None, WRITE_PREV=x_prev is not None, DRAW=True,
                EXPLICIT_NOISE=False, NU=nu is not None, TABLE=True, WITH_Z=weights.shape[1] == 3,
                BLOCK=BLOCK_GROUPS, num_warps=NUM_WARPS,
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
                BLOCK=BLOCK_GROUPS, num_warps=NUM_WARPS,
            )


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def guided_step_triton(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, coef: list[float], seed: int,
                       step: int, index_offset: int, clip: Optional[float]) -> None:
    """One guided step into `out` (contiguous float32 like z; may be z itself) with the coefficient row `coef`
    (the 10 float64 numbers of StepCoefficients.as_list(), used as float32); x_prev, where given, is read (where
    prev != 0) and overwritten with this step's x~. Inputs may be views: they are made contiguous (C order over each
    sample, as SPEC §3 counts elements); x_prev must be contiguous, as it is written. seed in [0, 2^64)."""
    _require(z.device)
    torch.ops.cfgfast.triton_guided_step_(
        out, z.contiguous(), pred_cond.contiguous(), pred_uncond.contiguous(), weights.contiguous(), x_prev,
        _contiguous(nu), _contiguous(noise), [float(c) for c in coef], seed_as_int64(seed), step, index_offset,
        None if clip is None else float(clip),
    )


def guided_step_table_triton(out, z, pred_cond, pred_uncond, weights, x_prev, nu, coef_table, step, seed: int,
                             index_offset: int, clip: Optional[float]) -> None:
    """The step whose row is coef_table[t] (float64 [T, 10] on z's device), t = step[0] (an int64 tensor of one
    element on z's device), both read by the kernel, so a CUDA graph of it replays with the t of the moment; t
    outside the table gives NaN everywhere (the host cannot check it without a sync). The noise's step word is t."""
    _require(z.device)
    torch.ops.cfgfast.triton_guided_step_table_(
        out, z.contiguous(), pred_cond.contiguous(), pred_uncond.contiguous(), weights.contiguous(), x_prev,
        _contiguous(nu), coef_table.contiguous(), step.contiguous(), seed_as_int64(seed), index_offset,
        None if clip is None else float(clip),
    )


def normal_noise_triton(out, seed: int, step: int, stream: int, index_offset: int) -> None:
    """The noise of SPEC §3 into `out` (contiguous float32 [B, ...]); seed in [0, 2^64)."""
    _require(out.device)
    torch.ops.cfgfast.triton_normal_noise_(out, seed_as_int64(seed), step, stream, index_offset)
