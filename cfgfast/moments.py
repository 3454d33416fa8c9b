"""Per-sample moments of linear combinations of tensors: the reductions of SPEC §7's guidance methods.

Guidance rescale needs std(o_c) and std(g); APG needs <Delta, Delta>, <Delta, x~_c> and <x~_c, x~_c>. All of
them are sums and dot products, over the elements of one sample, of a few vectors v_j = sum_i c_ji t_i made from
the step's tensors t_i (z, o_c, o_u, a running value): one pass over the t_i gives every one of them.

Three implementations of one definition (`sample_moments_reference`): the compiled op cfgfast::sample_moments on CPU
tensors (csrc/cpu/moments_cpu.cpp), a Triton kernel on CUDA tensors (below), and the reference. The fast two cut
each sample into chunks at fixed offsets and add the chunks' partial sums in chunk order, in float64: a sample's
moments are the same bits whatever the batch it is part of (not the same bits from one backend to another).

The Triton part follows cfgfast/triton_step.py: importing this module never fails; without triton the backend
refuses with the reason.
"""

# No `from __future__ import annotations` here: torch.library.triton_op reads the op schema from live annotations.
import math
from collections.abc import Sequence
from numbers import Real

import torch

from . import _ext
from ._checks import MAX_MOMENT_INPUTS as MAX_INPUTS, MAX_MOMENT_VECTORS as MAX_VECTORS
from ._checks import check, check_value, op_moments_args
from .triton_step import INTERPRETED
from .triton_step import refusals as triton_refusals

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (missing or broken: triton_step's refusals say why)
    triton = None

MOMENTS_BACKENDS = ("auto", "reference", "cpu", "triton")

# One program per (sample, chunk) of TRITON_CHUNK elements, read TRITON_BLOCK at a time with a float64 accumulator
# per element of the block and moment; the partial sums are then added in chunk order by a second kernel. Not tuned on
# a GPU: the sums cost about one read of the inputs, which no setting of a plain elementwise pass changes much.
TRITON_CHUNK = 8192
TRITON_BLOCK = 512
TRITON_WARPS = 4
MAX_PER_SAMPLE = 2**30  # int32 offsets inside a sample (as triton_step.py)


def sample_moments_reference(inputs: Sequence[torch.Tensor], combos: Sequence[Sequence[float]]) -> torch.Tensor:
    """float64 [B, V, V + 1]: out[b, j, l] = sum_n v_j[b, n] v_l[b, n] and out[b, j, V] = sum_n v_j[b, n], with
    v_j = sum_i combos[j][i] inputs[i] formed per element in float64.

    inputs: K tensors of one shape [B, ...] on one device (any floating dtype); combos: V rows of K numbers. The
    sums of one sample read that sample alone, in an order that does not depend on the batch.
    """
    batch = inputs[0].shape[0]
    per_sample = math.prod(inputs[0].shape[1:])
    x = torch.stack([t.reshape(batch, per_sample).double() for t in inputs], dim=1)  # [B, K, N]
    c = torch.tensor(combos, dtype=torch.float64, device=x.device)  # [V, K]
    v = torch.einsum("jk,bkn->bjn", c, x)  # [B, V, N]
    gram = torch.stack([(v * v[:, j:j + 1]).sum(dim=2) for j in range(v.shape[1])], dim=1)  # [B, V, V]
    return torch.cat([gram, v.sum(dim=2)[..., None]], dim=2)


def sample_moments(inputs: Sequence[torch.Tensor], combos: Sequence[Sequence[float]],
                   backend: str = "auto") -> torch.Tensor:
    """sample_moments_reference's [B, V, V + 1] in one pass over the inputs (see the module's docstring).

    inputs: 1 to 4 tensors of one shape [B, ...] on one device, float32, bfloat16, float16 or float64 (mixed dtypes
    allowed; views are made contiguous); combos: 1 to 4 rows of len(inputs) real numbers. backend: "auto" (the
    compiled op on CPU tensors, the Triton kernel on CUDA tensors, the reference where neither can run), or one of
    "reference", "cpu", "triton", which raises where it cannot run.
    """
    inputs, combos = _moments_arguments(inputs, combos)
    if not isinstance(backend, str) or backend not in MOMENTS_BACKENDS:
        raise ValueError(f"backend must be one of {list(MOMENTS_BACKENDS)}, got {backend!r}")
    device = inputs[0].device
    if backend == "auto":
        if device.type == "cpu" and _ext.error() is None:
            backend = "cpu"
        elif device.type == "cuda" and not triton_refusals(device):
            backend = "triton"
        else:
            backend = "reference"
    flat = [c for row in combos for c in row]
    if backend == "reference":
        op_moments_args(inputs, flat, len(combos))
        return sample_moments_reference(inputs, combos)
    if backend == "cpu":
        reasons = ([] if device.type == "cpu" else [f"it runs on CPU tensors, got {device}"])
        if _ext.error() is not None:
            reasons.append(f"the compiled extension is missing ({_ext.error()}); rebuild: {_ext.REBUILD}")
        if reasons:
            raise RuntimeError("cfgfast: backend 'cpu' cannot run here: " + "; ".join(reasons))
        return torch.ops.cfgfast.sample_moments(inputs, flat, len(combos))
    reasons = triton_refusals(device)
    if reasons:
        raise RuntimeError("cfgfast: backend 'triton' cannot run here: " + "; ".join(reasons))
    return torch.ops.cfgfast.triton_sample_moments([t.contiguous() for t in inputs], flat, len(combos))


def _moments_arguments(inputs, combos) -> tuple[list[torch.Tensor], list[list[float]]]:
    """inputs as a list of tensors and combos as V rows of K floats (ValueError or TypeError naming the argument);
    the tensors' dtypes, shapes and devices are the op's to check (op_moments_args, csrc/op_checks.h)."""
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a sequence of tensors, got {type(inputs).__name__}")
    inputs = list(inputs)
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"inputs must hold 1 to {MAX_INPUTS} tensors, got {len(inputs)}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a tensor, got {type(t).__name__}")
    if isinstance(combos, torch.Tensor):
        combos = combos.tolist()
    if isinstance(combos, (str, bytes)) or not isinstance(combos, Sequence) or not 1 <= len(combos) <= MAX_VECTORS:
        raise ValueError(f"combos must be 1 to {MAX_VECTORS} rows of {len(inputs)} numbers (one per input), got "
                         f"{combos!r}")
    rows = []
    for j, row in enumerate(combos):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != len(inputs):
            raise ValueError(f"combos[{j}] must hold {len(inputs)} numbers (one per input), got {row!r}")
        for c in row:
            if isinstance(c, bool) or not isinstance(c, Real):
                raise TypeError(f"combos[{j}] must hold real numbers, got {type(c).__name__}")
        rows.append([float(c) for c in row])
    return inputs, rows


if triton is not None:
    from .triton_step import _on_device, _wrapped

    @triton.jit
    def _moments_chunk_kernel(x0_ptr, x1_ptr, x2_ptr, x3_ptr, combos_ptr, partials_ptr, per_sample, chunks,
                              K: tl.constexpr, V: tl.constexpr, VPAD: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK: tl.constexpr):
        """The moments of one chunk of one sample, float64, into partials[pid]: [VPAD, VPAD + 1], the Gram matrix
        of the v_j and their sums in the last column (rows and columns j >= V zero)."""
        pid = tl.program_id(0)
        b = pid // chunks
        first = (pid - b * chunks) * CHUNK
        base = b.to(tl.int64) * per_sample
        rows = tl.arange(0, VPAD)
        live = rows < V
        # combos' columns, [VPAD] each (a column i >= K is never read)
        c0 = tl.load(combos_ptr + rows * K, mask=live, other=0.0)
        c1 = tl.load(combos_ptr + rows * K + 1, mask=live & (K > 1), other=0.0)
        c2 = tl.load(combos_ptr + rows * K + 2, mask=live & (K > 2), other=0.0)
        c3 = tl.load(combos_ptr + rows * K + 3, mask=live & (K > 3), other=0.0)
        sums = tl.zeros([VPAD, BLOCK], tl.float64)
        gram = tl.zeros([VPAD, VPAD, BLOCK], tl.float64)
        for start in range(0, CHUNK, BLOCK):
            n = first + start + tl.arange(0, BLOCK)
            mask = n < per_sample
            x = tl.load(x0_ptr + base + n, mask=mask, other=0.0).to(tl.float64)
            v = c0[:, None] * x[None, :]
            if K > 1:
                x = tl.load(x1_ptr + base + n, mask=mask, other=0.0).to(tl.float64)
                v = v + c1[:, None] * x[None, :]
            if K > 2:
                x = tl.load(x2_ptr + base + n, mask=mask, other=0.0).to(tl.float64)
                v = v + c2[:, None] * x[None, :]
            if K > 3:
                x = tl.load(x3_ptr + base + n, mask=mask, other=0.0).to(tl.float64)
                v = v + c3[:, None] * x[None, :]
            v = tl.where(mask[None, :], v, 0.0)  # (an infinite coefficient times a masked 0 would be NaN)
            sums += v
            gram += v[:, None, :] * v[None, :, :]
        out = partials_ptr + pid.to(tl.int64) * (VPAD * (VPAD + 1)) + rows * (VPAD + 1)
        tl.store(out[:, None] + tl.arange(0, VPAD)[None, :], tl.sum(gram, axis=2))
        tl.store(out + VPAD, tl.sum(sums, axis=1))

    @triton.jit
    def _moments_combine_kernel(partials_ptr, out_ptr, chunks, SIZE: tl.constexpr, SIZE_PAD: tl.constexpr):
        """out[b] = the sum of sample b's chunk partials, added in chunk order (one program a sample)."""
        b = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, SIZE_PAD)
        mask = offsets < SIZE
        total = tl.zeros([SIZE_PAD], tl.float64)
        for c in range(chunks):
            total += tl.load(partials_ptr + (b * chunks + c) * SIZE + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + b * SIZE + offsets, total, mask=mask)

    # The combos a device has seen, as float64 tensors there: a host-to-device copy cannot run while a CUDA graph
    # captures, and a sampling loop's warm-up (before its capture) asks for the combos its captured steps use.
    _COMBOS: dict[tuple, torch.Tensor] = {}

    def _combos_on(device: torch.device, combos: list[float]) -> torch.Tensor:
        if torch.compiler.is_compiling():  # (traced: the graph holds its own tensor, and a fake one is never kept)
            return torch.tensor(combos, dtype=torch.float64).to(device)
        key = (device, tuple(combos))
        found = _COMBOS.get(key)
        if found is None:
            if len(_COMBOS) >= 64:
                _COMBOS.clear()
            found = _COMBOS[key] = torch.tensor(combos, dtype=torch.float64).to(device)
        return found

    @torch.library.triton_op("cfgfast::triton_sample_moments", mutates_args=())
    def _sample_moments_op(inputs: list[torch.Tensor], combos: list[float], num_vectors: int) -> torch.Tensor:
        op_moments_args(inputs, combos, num_vectors)
        first = inputs[0]
        check(first.device.type in ("cuda", "meta") or (INTERPRETED and first.device.type == "cpu"),
              lambda: f"cfgfast: the triton kernels take CUDA tensors (CPU tensors under TRITON_INTERPRET=1), got "
                      f"inputs on {first.device}")
        for i, t in enumerate(inputs):
            check(t.is_contiguous(),
                  lambda i=i, t=t: f"cfgfast: the triton kernels take contiguous tensors, got inputs[{i}] with strides "
                          f"{t.stride()}")
        batch, v = first.shape[0], num_vectors
        per_sample = math.prod(first.shape[1:])
        check_value(per_sample < MAX_PER_SAMPLE,
                    lambda: "cfgfast: the triton backend takes fewer than 2^30 elements per sample")
        vpad = triton.next_power_of_2(v)
        size = vpad * (vpad + 1)
        chunks = triton.cdiv(per_sample, TRITON_CHUNK)
        partials = first.new_empty((batch * chunks, size), dtype=torch.float64)
        full = first.new_zeros((batch, vpad, vpad + 1), dtype=torch.float64)
        if batch * chunks > 0 and first.device.type != "meta":
            padded = inputs + [first] * (MAX_INPUTS - len(inputs))  # (unused pointers: any)
            combos_t = _combos_on(first.device, combos)
            with _on_device(first):
                _wrapped(_moments_chunk_kernel)[(batch * chunks,)](
                    *padded, combos_t, partials, per_sample, chunks, K=len(inputs), V=v, VPAD=vpad,
                    CHUNK=TRITON_CHUNK, BLOCK=TRITON_BLOCK, num_warps=TRITON_WARPS,
                )
                _wrapped(_moments_combine_kernel)[(batch,)](
                    partials, full, chunks, SIZE=size, SIZE_PAD=triton.next_power_of_2(size), num_warps=1,
                )
        return torch.cat([full[:, :v, :v], full[:, :v, vpad:]], dim=2)
