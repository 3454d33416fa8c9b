"""Guidance beyond the paper's combination (SPEC §7): guidance rescale, adaptive projected guidance (APG) and
dynamic thresholding, as per-sample reductions followed by the fused step of SPEC §6.

Each method needs statistics of one sample (standard deviations, dot products, a quantile) before the step can
run. They come from one reduction (cfgfast.moments.sample_moments: sums and dot products in float64), and the
step's per-sample inputs follow from them:
- guidance rescale scales g by one number per sample: the fused step reads the scaled weights (w_c k, w_u k)
  and nothing else changes;
- APG's x~ = a x~_c + b Delta, with per-sample a and b, is the step's own x~ = pred_z z + pred_g g for
  g = w_c o_c - w_u o_u + w_z z: the fused step reads per-sample weights with a third column (w_z), and with
  momentum reads the running value M in o_u's place, M updated first by the fused step itself (one pass);
- dynamic thresholding divides x~ by a per-sample quantile, which no weight can hold: x~ is formed here, and the
  fused step reads it through the row's "given x~" form (GivenX: pred_z = 0, pred_g = 1), which keeps every
  sampler, the multistep state, CFG++'s unconditional term, learned variance and SPEC §3's noise in the kernel.

So composed, each stage is a pass of its own over the whole batch, which a CPU reads from memory each time (11 tensor
passes for APG with momentum, against the plain step's 4). The cpu backend runs rescale and APG instead as one op
(cfgfast::per_sample_guided_step_, csrc/cpu/guidance_cpu.cpp) that takes each sample through every stage while its
tensors are in cache: the same moments (the same bits), the same float64 arithmetic in the same order, the same fused
step. The other backends (cuda, triton, reference), thresholding, APG's momentum with 16-bit outputs, the
device-table step (step_table) and a step traced by torch.compile take the composition."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from .moments import sample_moments
from .samplers import check_guidance


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024; SPEC §7), on the x-predictions x~_c, x~_u:

        Delta = x~_c - x~_u;  Delta <- Delta + momentum M, M <- Delta    (M: the running value, zero at first)
        Delta <- Delta min(1, norm_threshold / |Delta|)                  (where norm_threshold > 0)
        x~ = x~_c + w (Delta_orthogonal + eta_parallel Delta_parallel)   (the parts along and across x~_c)

    eta_parallel in [0, 1] (0: only the part of Delta orthogonal to x~_c), norm_threshold >= 0 (0: none),
    momentum in (-1, 1) (0: none; the paper uses negative values such as -0.5). Equal to diffusers'
    normalized_guidance with use_original_formulation=True and guidance_scale w.
    """

    eta_parallel: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        eta = _checks.unit_interval("APG eta_parallel", self.eta_parallel)
        rho = _checks.real("APG norm_threshold", self.norm_threshold)
        if rho < 0:
            raise ValueError(f"APG norm_threshold must be >= 0 (0: no threshold), got {rho}")
        beta = _checks.real("APG momentum", self.momentum)
        if not -1.0 < beta < 1.0:
            raise ValueError(f"APG momentum must lie in (-1, 1) (0: none), got {beta}")
        object.__setattr__(self, "eta_parallel", eta)
        object.__setattr__(self, "norm_threshold", rho)
        object.__setattr__(self, "momentum", beta)


def check_method(sampler: str | None, guidance):
    """"cfg", "cfgpp" (with "ddim" only; sampler None: a step call, where CFG++ is its table's rows) or an APG."""
    if isinstance(guidance, APG):
        return guidance
    names = ["cfg", "cfgpp", "cfgfast.APG(...)"] if sampler is not None else ["cfg", "cfgfast.APG(...)"]
    if not isinstance(guidance, str) or guidance not in ("cfg", "cfgpp") or (sampler is None and guidance == "cfgpp"):
        hint = (" (CFG++ is a step table of its own: cfgfast.step_table('ddim', ..., guidance='cfgpp'))"
                if sampler is None and guidance == "cfgpp" else "")
        raise ValueError(f"guidance must be one of {names}, got {guidance!r}{hint}")
    return check_guidance(sampler, guidance)


def check_threshold(threshold, clip) -> tuple[float, float] | None:
    """None or dynamic thresholding's (p, M): p in (0, 1], M >= 1 finite; not together with clip."""
    if threshold is None:
        return None
    try:
        p, bound = threshold
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a pair (p, M) such as (0.995, 1.5), got {threshold!r}") from None
    p = _checks.real("threshold's p", p)
    bound = _checks.real("threshold's M", bound)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"threshold's p (the quantile of |x~|) must lie in (0, 1], got {p}")
    if not 1.0 <= bound <= torch.finfo(torch.float32).max:
        raise ValueError(f"threshold's M (the largest s) must be at least 1 and finite in float32, got {bound}")
    if clip is not None:
        raise ValueError(f"threshold replaces clip (dynamic thresholding clamps x~ to [-s, s] itself): give one, "
                         f"got threshold={threshold!r} and clip={clip!r} (pass clip=None)")
    return p, bound


def check_rescale(guidance_rescale) -> float:
    return _checks.unit_interval("guidance_rescale", guidance_rescale)


def given_x_rows(rows):
    """The rows (float64 [..., 10], or one row as a list of numbers) in their "given x~" form: x~ = g,
    z' = mean_z z + mean_x x~ + the rest, for a step whose x~ was formed (and clipped) before it, passed as pred_cond
    with weights (1, 0)."""
    if isinstance(rows, list):  # (a host row stays numbers: a step under torch.compile cannot read a tensor back)
        return [0.0, 1.0, rows[2], rows[3], rows[2], rows[3], *rows[6:]]
    rows = rows.clone()
    rows[..., 0], rows[..., 1] = 0.0, 1.0  # x~ = pred_z z + pred_g g
    rows[..., 4], rows[..., 5] = rows[..., 2], rows[..., 3]  # z' = direct_z z + direct_g g
    return rows


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


class _HostMath:
    """The per-sample arithmetic (arrays of B float64 numbers) on the host, for CPU tensors: numpy's call on such an
    array costs about a microsecond, torch's several, and a step with APG makes about thirty."""

    quiet = staticmethod(lambda: np.errstate(divide="ignore", invalid="ignore"))  # (x / 0: inf or NaN, as torch)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def clamp(x, lo=None, hi=None):  # (np.maximum / np.minimum: a few times faster than np.clip on small arrays)
        x = x if lo is None else np.maximum(x, lo)
        return x if hi is None else np.minimum(x, hi)

    @staticmethod
    def array(t: torch.Tensor):
        return t.detach().numpy().astype(np.float64, copy=False)

    @staticmethod
    def number(x):
        """A coefficient: a number, or a 0-d tensor (of a device table on the CPU) read at once."""
        return float(x)

    @staticmethod
    def weights(columns, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))

    @staticmethod
    def combine(raw, combos):
        """_combined_moments' C M C^T for numbers: the products of the combos in Python, each sample's sums by einsum (its
        loop for each output; a matrix product's blocking changes the order of addition with B)."""
        k = raw.shape[1]
        c = [[float(x) for x in row] for row in combos]
        outer = np.array([[c[j][a] * c[l][b] for j, l in _PAIRS] for a in range(k) for b in range(k)])
        return (np.einsum("bn,nq->bq", raw[:, :, :k].reshape(-1, k * k), outer),
                np.einsum("bk,jk->bj", raw[:, :, k], np.array(c)))


class _DeviceMath:
    """The same in float64 torch on the tensors' device: a GPU step does not wait for the host."""

    quiet = staticmethod(contextlib.nullcontext)
    sqrt = staticmethod(torch.sqrt)
    clamp = staticmethod(lambda x, lo=None, hi=None: x.clamp(min=lo, max=hi))

    @staticmethod
    def array(t: torch.Tensor) -> torch.Tensor:
        return t.double()

    @staticmethod
    def number(x):
        return x if isinstance(x, (int, float)) else x.double()

    @staticmethod
    def weights(columns, like: torch.Tensor) -> torch.Tensor:
        return torch.stack(columns, dim=1).float()

    @staticmethod
    def combine(raw, combos):
        """_combined_moments' C M C^T on the device: a number among the combos becomes a fill there, not a copy from the host
        (which a CUDA graph being captured refuses); each sample's sums term by term (elementwise kernels: the
        order of addition does not depend on B)."""
        k = raw.shape[1]
        c = torch.stack([torch.stack([x.double().reshape(()) if isinstance(x, torch.Tensor) else
                                      raw.new_full((), float(x)) for x in row]) for row in combos])  # [2, K]
        outer = torch.stack([(c[j][:, None] * c[l][None, :]).reshape(-1) for j, l in _PAIRS], dim=1)  # [K * K, 3]

        def rows_times(a, b):  # a [B, N] b [N, Q]
            out = a[:, :1] * b[0]
            for n in range(1, a.shape[1]):
                out = out + a[:, n:n + 1] * b[n]
            return out

        return rows_times(raw[:, :, :k].reshape(raw.shape[0], k * k), outer), rows_times(raw[:, :, k], c.T)


def _arithmetic(t: torch.Tensor):
    return _HostMath if t.device.type == "cpu" and not torch.compiler.is_compiling() else _DeviceMath


# the pairs (j, l) of <v_j, v_l> that _combined_moments returns, in its order
_PAIRS = ((1, 1), (1, 0), (0, 0))


def _combined_moments(ops, inputs, combos=None):
    """(<v_1, v_1>, <v_1, v_0>, <v_0, v_0>, sum v_1, sum v_0, number of elements) per sample, in float64 arrays of
    `ops`, for v_j = sum_i combos[j][i] inputs[i] (numbers, or 0-d tensors on the device: a step read from a device
    table must not wait for the host); combos None: v_j = inputs[j] (two inputs).

    From the inputs' own moments M (the reduction's cheapest form: products of float32 values are exact in
    float64), combined as C M C^T. Where v_j cancels (APG's x~_c for epsilon-prediction at high noise: pred_z z and
    pred_g o_c nearly opposite) this loses about 2 log2(|pred_z z| / |x~_c|) of float64's 53 bits: 29 at
    lambda = -20, where x~_c formed in float32 would have lost 14 of its 24."""
    k = len(inputs)
    raw = ops.array(sample_moments(inputs, [[float(i == j) for i in range(k)] for j in range(k)]))
    count = inputs[0][0].numel() if inputs[0].shape[0] else 1
    if combos is None:
        return raw[:, 1, 1], raw[:, 1, 0], raw[:, 0, 0], raw[:, 1, 2], raw[:, 0, 2], count
    # <v_j, v_l> = sum_ab c_ja c_lb M_ab for the three pairs at once: M [B, K * K] against their outer products, each
    # sample's sum in an order that does not depend on the batch (a matrix product's does, and the cancellation in
    # x~_c magnifies the difference)
    dd_dx_xx, sums = ops.combine(raw, combos)
    return dd_dx_xx[:, 0], dd_dx_xx[:, 1], dd_dx_xx[:, 2], sums[:, 1], sums[:, 0], count


def _rescale_factor(ops, phi: float, a_coef, b_coef, moments):
    """k = phi std(a) / std(y) + 1 - phi per sample (float64), for y = a_coef a + b_coef b, from the moments
    (<b, b>, <b, a>, <a, a>, sum b, sum a, n) of (a, b) (_combined_moments')."""
    bb, ab, aa, sb, sa, n = moments
    var_y = (a_coef * a_coef * aa + 2.0 * a_coef * b_coef * ab + b_coef * b_coef * bb) / n \
        - ((a_coef * sa + b_coef * sb) / n) ** 2
    var_a = aa / n - (sa / n) ** 2
    # (variances from sums: a rounding below zero is zero)
    return phi * ops.sqrt(ops.clamp(var_a, 0.0)) / ops.sqrt(ops.clamp(var_y, 0.0)) + (1.0 - phi)


def rescaled_weights(pred_cond, pred_uncond, weights, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale of "cfg" and "cfgpp" (SPEC §7; diffusers' rescale_noise_cfg) as per-sample weights:
    g <- phi g std(o_c) / std(g) + (1 - phi) g is g scaled by k = phi std(o_c) / std(g) + 1 - phi, so the fused
    step reads (k w_cond, k w_uncond). Population standard deviations over each sample, from float64 sums."""
    ops = _arithmetic(pred_cond)
    with ops.quiet():
        moments = _combined_moments(ops, [pred_cond, pred_uncond])
        w64 = ops.array(weights)
        k = _rescale_factor(ops, guidance_rescale, w64[:, 0], -w64[:, 1], moments)
        return ops.weights([w64[:, 0] * k, w64[:, 1] * k], pred_cond)


def _quantile_abs(x: torch.Tensor, p: float, work: torch.Tensor | None = None) -> torch.Tensor:
    """torch.quantile(|x| per sample, p) (linear interpolation), from the two order statistics it interpolates:
    one topk of the few values at or above them where p is near 1 (Imagen's 0.995: 63 of 12288), else two
    selections, instead of a sort. work: a tensor of x's shape for |x| (else a new one)."""
    flat = torch.abs(x, out=work).reshape(x.shape[0], -1) if work is not None else x.abs().reshape(x.shape[0], -1)
    n = flat.shape[1]
    rank = p * (n - 1)
    below = math.floor(rank)
    above = min(below + 1, n - 1)
    if n - below <= 1024:  # the order statistics below and above are the last two of the n - below largest
        top = flat.topk(n - below, dim=1).values
        low, high = top[:, -1], top[:, -2 if above > below else -1]
    else:
        low = flat.kthvalue(below + 1, dim=1).values
        high = flat.kthvalue(above + 1, dim=1).values if above > below else low
    return low if rank == below else torch.lerp(low, high, rank - below)


def dynamic_threshold(x: torch.Tensor, threshold: tuple[float, float], work: torch.Tensor | None = None):
    """x~ <- clamp(x~, -s, s) / s with s = clamp(quantile_p(|x~|), 1, M) per sample (Imagen; diffusers'
    _threshold_sample), in place. x: float32 [B, ...]; work: a tensor of x's shape to use (else a new one)."""
    p, bound = threshold
    if x.numel() == 0:  # (no sample, or samples of no element: nothing to scale)
        return x
    s = _per_sample(_quantile_abs(x, p, work).clamp(min=1.0, max=bound), x)
    return x.clamp_(-s, s).div_(s)


def _add_scaled_(y: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
    """y += a x, for a number a or a 0-d tensor (a coefficient read on the device)."""
    return y.add_(x, alpha=a) if isinstance(a, (int, float)) else y.addcmul_(x, a)


class Guide:
    """How one sampling run turns (o_c, o_u) into what the fused step reads (SPEC §7), with APG's running value.

    method: "cfg", "cfgpp" or an APG; rescale: phi; threshold: (p, M) or None; clip: the step's clip (None with a
    threshold); buffer: APG's running value M where its momentum is not 0, updated in place at each guided step;
    per_sample: False takes the composition on every backend (the module's docstring), for comparison.
    The tensors it forms (thresholding's x~ and |x~|, a 16-bit o_c widened beside APG's running value) live in
    buffers kept from step to step: a new tensor of a large batch costs more in page faults than its arithmetic, and
    a captured CUDA graph needs fixed addresses.
    """

    def __init__(self, method, rescale: float = 0.0, threshold=None, clip=None, buffer: torch.Tensor | None = None,
                 per_sample: bool = True):
        self.method = method
        self.rescale = rescale
        self.threshold = threshold
        self.clip = clip
        self.apg = method if isinstance(method, APG) else None
        # Whether x~ is formed before the fused step (which then reads its "given x~" row): dynamic thresholding
        # only; rescale and APG are per-sample weights of the step (APG's with a third column, w_z).
        self.forms_x = threshold is not None
        self.buffer = buffer  # APG's running value M (float32, z's shape; zero before the first guided step)
        if self.apg is not None and self.apg.momentum and buffer is None:
            raise ValueError("APG with momentum needs its running value: a float32 tensor of z's shape, zero before "
                             "the first guided step (momentum_buffer=)")
        self._work: dict[str, torch.Tensor] = {}
        self.per_sample = per_sample and not self.forms_x and (self.apg is not None or bool(rescale))
        self._running = buffer if self.apg is not None and self.apg.momentum else None  # (what the op writes)
        self._guide = [rescale] if self.apg is None else \
            [rescale, self.apg.eta_parallel, self.apg.norm_threshold, self.apg.momentum]

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        found = self._work.get(name)
        if found is None or found.shape != like.shape or found.device != like.device:
            found = self._work[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return found

    def inputs(self, stepper, z, pred_cond, pred_uncond, weights, pred_z, pred_g, guided: bool):
        """(pred_cond, pred_uncond, weights, clip) for the fused step: the model's outputs with per-sample weights
        (rescaled; APG's) and the step's row as it is, or, where forms_x, x~ itself with weights (1, 0) for the
        given-x~ row. pred_z, pred_g: the row's prediction coefficients (numbers, or 0-d tensors on z's device);
        stepper: the backend, whose fused step also updates APG's running value."""
        if self.apg is not None and guided:
            pred_cond, pred_uncond, weights = self._apg(stepper, z, pred_cond, pred_uncond, weights[:, 1], pred_z,
                                                        pred_g)
        elif guided and self.rescale:
            weights = rescaled_weights(pred_cond, pred_uncond, weights, self.rescale)
        if not self.forms_x:
            return pred_cond, pred_uncond, weights, self.clip
        x = self._buffer("x", z)
        # x~ = pred_z z + pred_g ((w_c o_c - w_u o_u) + w_z z)
        x.copy_(pred_cond).mul_(_per_sample(weights[:, 0], z)).addcmul_(pred_uncond, _per_sample(-weights[:, 1], z))
        if weights.shape[1] == 3:
            x.addcmul_(z, _per_sample(weights[:, 2], z))
        _add_scaled_(x.mul_(pred_g), z, pred_z)
        dynamic_threshold(x, self.threshold, self._buffer("abs", z))
        unit = torch.zeros_like(weights[:, :2])
        unit[:, 0] = 1.0
        if self.method == "cfgpp":  # its step reads o_u (the row's uncond term), in x~'s dtype
            uncond = pred_uncond if pred_uncond.dtype == torch.float32 else \
                self._buffer("uncond", z).copy_(pred_uncond)
            return x, uncond, unit, None
        return x, x, unit, None  # (weights (1, 0): g = x~; the row reads no o_u)

    def _apg(self, stepper, z, pred_cond, pred_uncond, w, pred_z, pred_g):
        """APG's x~ (SPEC §7) as per-sample weights of the fused step: (pred_cond, pred_uncond, weights [B, 3]).

        With x~_c = pred_z z + pred_g o_c and Delta = pred_g (o_c - o_u) (+ momentum M, then M <- Delta), x~ is
        a x~_c + b Delta for per-sample a and b from the moments of x~_c and Delta. The step's x~ is
        pred_z z + pred_g g with g = w_c o_c - w_u o_u + w_z z, so: without momentum (o_c, o_u) with
        (a + b, b, (a - 1) pred_z / pred_g); with momentum (o_c, M), M updated first, with
        (a, -b / pred_g, (a - 1) pred_z / pred_g). One pass of the moments, no x~ formed."""
        apg = self.apg
        if apg.momentum:
            self._update_running_value(stepper, pred_cond, pred_uncond, pred_g, w)
            if pred_cond.dtype != torch.float32:  # (the step reads o_c beside M, float32: one dtype)
                pred_cond = self._buffer("x_cond", z).copy_(pred_cond)
            other, delta_combo = self.buffer, (0.0, 1.0)  # Delta = M
        else:
            other, delta_combo = pred_uncond, (pred_g, -pred_g)  # Delta = pred_g o_c - pred_g o_u
        inputs, combos = [pred_cond, other], [(pred_g, 0.0), delta_combo]
        if not (isinstance(pred_z, (int, float)) and pred_z == 0):  # (x0-prediction: x~_c does not read z)
            inputs, combos = [z] + inputs, [(pred_z,) + combos[0], (0.0,) + combos[1]]
        ops = _arithmetic(z)
        with ops.quiet():
            return pred_cond, other, self._apg_weights(ops, inputs, combos, w, pred_z, pred_g)

    def _update_running_value(self, stepper, pred_cond, pred_uncond, pred_g, w) -> None:
        """M <- momentum M + pred_g (o_c - o_u) for each sample this step guides (w != 0), in place; a sample at
        w = 0 keeps its M, as it would sampled alone, where the step is not guided at all (as diffusers' APG guider
        keeps its buffer where it does not guide). One pass of the fused kernel's own affine step, in float32, on
        every backend: its z is M, z' = z + d g with d = pred_g (1 where pred_g = 0) and per-sample weights making
        g = (o_c - o_u) + ((momentum - 1) / d) z where w != 0 (o_c - o_u formed before the scale: pred_g reaches
        2e4 at lambda = -20, where pred_g o_c - pred_g o_u would lose the difference), g = 0 (z' = M exactly) where
        w = 0. pred_g: a number or a 0-d tensor on the device (the row then a one-row table read there)."""
        m = self.buffer
        ops = _arithmetic(m)
        pred_g = ops.number(pred_g)  # (on the host: a number, read at once from a CPU table)
        on_host = isinstance(pred_g, (int, float))
        nonzero = float(pred_g != 0) if on_host else (pred_g != 0).double()
        d = (pred_g if pred_g != 0 else 1.0) if on_host else torch.where(pred_g != 0, pred_g, 1.0)
        guided = ops.array(w) != 0
        on = guided * nonzero  # (a bool array times a number, or times a float64 0-d tensor: float64 either way)
        weights = ops.weights([on, on, guided * ((self.apg.momentum - 1.0) / d)], w)
        if on_host:
            row = [0.0, 0.0, 0.0, 0.0, 1.0, d, 0.0, 0.0, 0.0, 0.0]
            stepper.guided_step(m, m, pred_cond, pred_uncond, weights, None, None, None, row, 0, 0, 0, None)
            return
        zero = torch.zeros((), dtype=torch.float64, device=m.device)
        table = torch.stack([zero, zero, zero, zero, zero + 1.0, d] + [zero] * 4)[None]
        counter = torch.zeros(1, dtype=torch.int64, device=m.device)
        stepper.guided_step_table(m, m, pred_cond, pred_uncond, weights, None, None, table, counter, 0, 0, None)

    def _apg_weights(self, ops, inputs, combos, w, pred_z, pred_g) -> torch.Tensor:
        """The step's weights [B, 3] for APG's x~ (_apg), from the moments of x~_c and Delta (combos[0], combos[1]
        of the inputs) and w per sample."""
        apg = self.apg
        moments = _combined_moments(ops, inputs, combos)
        dd, dx, xx = moments[:3]
        dd = ops.clamp(dd, 0.0)  # (|Delta|^2 from the inputs' moments: where o_c ~ o_u, a rounding below 0 is 0)
        w64 = ops.array(w)
        scale = 1.0
        if apg.norm_threshold > 0:
            # (a zero Delta: rho / 0 = inf, scale 1, as diffusers' torch.minimum(1, rho / |Delta|))
            scale = ops.clamp(apg.norm_threshold / ops.sqrt(dd), hi=1.0)
        # Delta_parallel = (<Delta, x~_c> / <x~_c, x~_c>) x~_c (|x~_c| floored at 1e-12, as F.normalize)
        along = dx / ops.clamp(xx, 1e-24)
        # x~ = x~_c + w s (Delta - (1 - eta) along x~_c) = a x~_c + b Delta
        a = 1.0 - w64 * scale * (1.0 - apg.eta_parallel) * along
        b = w64 * scale
        if self.rescale:
            k = _rescale_factor(ops, self.rescale, a, b, moments)  # (x~ = a x~_c + b Delta against x~_c)
            a, b = a * k, b * k
        # (pred_g = 0: x~ = pred_z z whatever the outputs, Delta = 0 and a = 1; the terms in 1 / pred_g are 0)
        pred_z, pred_g = ops.number(pred_z), ops.number(pred_g)
        if isinstance(pred_g, (int, float)):
            inv_g = 1.0 / pred_g if pred_g != 0 else 0.0
        else:
            inv_g = torch.where(pred_g != 0, 1.0 / pred_g, 0.0)
        w_z = (a - 1.0) * (pred_z * inv_g)
        return ops.weights([a, -b * inv_g, w_z] if apg.momentum else [a + b, b, w_z], w)

    def step(self, stepper, out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise, row, row_x, seed, t,
             index_offset, guided: bool) -> None:
        """One step on host rows (row: the sampler's, row_x: its given-x~ form, read where forms_x). On a backend with
        the per-sample op, rescale and APG run there (APG's momentum with 16-bit outputs excepted: its step reads
        o_c widened to float32 beside M)."""
        if guided and self.per_sample and stepper.per_sample_guidance and not torch.compiler.is_compiling() and \
                (pred_cond.dtype == torch.float32 or self._running is None):
            stepper.per_sample_guided_step(out, z, pred_cond, pred_uncond, weights, self._running, x_prev, nu, noise,
                                           row, self._guide, seed, t, index_offset, self.clip)
            return
        pred_cond, pred_uncond, weights, clip = self.inputs(stepper, z, pred_cond, pred_uncond, weights, row[0],
                                                            row[1], guided)
        if nu is not None and nu.dtype != pred_cond.dtype:  # (nu has the dtype of what the step reads as o_c)
            nu = nu.float()
        stepper.guided_step(out, z, pred_cond, pred_uncond, weights, x_prev, nu, noise,
                            row_x if self.forms_x else row, seed, t, index_offset, clip)

    def step_table(self, stepper, out, z, pred_cond, pred_uncond, weights, x_prev, nu, table, table_x, counter,
                   seed, index_offset, guided: bool) -> None:
        """One step on device tables read at `counter` (no host read: capturable)."""
        pz = pg = None
        if self.forms_x or (guided and self.apg is not None):
            row = table.index_select(0, counter)[0]  # (float64, 0-d tensors on the device)
            pz, pg = row[0], row[1]
        pred_cond, pred_uncond, weights, clip = self.inputs(stepper, z, pred_cond, pred_uncond, weights, pz, pg,
                                                            guided)
        if nu is not None and nu.dtype != pred_cond.dtype:
            nu = nu.float()
        stepper.guided_step_table(out, z, pred_cond, pred_uncond, weights, x_prev, nu,
                                  table_x if self.forms_x else table,
                                  counter, seed, index_offset, clip)
