"""Per-sample moments of linear combinations of tensors: the reductions of SPEC §7's guidance methods.

Guidance rescale needs std(o_c) and std(g); APG needs <Delta, Delta>, <Delta, x~_c> and <x~_c, x~_c>. All of
them are sums and dot products, over the elements of one sample, of a few vectors v_j = sum_i c_ji t_i made from
the step's tensors t_i (z, o_c, o_u, a running value): one pass over the t_i gives every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_moments(inputs: Sequence[torch.Tensor], combos: Sequence[Sequence[float]]) -> torch.Tensor:
    """float64 [B, V, V + 1]: out[b, j, l] = sum_n v_j[b, n] v_l[b, n] and out[b, j, V] = sum_n v_j[b, n], with
    v_j = sum_i combos[j][i] inputs[i] formed per element in float64.

    inputs: K tensors of one shape [B, ...] on one device (any floating dtype); combos: V rows of K numbers. The
    sums of one sample read that sample alone, in an order that does not depend on the batch.
    """
    batch = inputs[0].shape[0]
    x = torch.stack([t.reshape(batch, -1).double() for t in inputs], dim=1)  # [B, K, N]
    c = torch.tensor(combos, dtype=torch.float64, device=x.device)  # [V, K]
    v = torch.einsum("jk,bkn->bjn", c, x)  # [B, V, N]
    gram = torch.stack([(v * v[:, j:j + 1]).sum(dim=2) for j in range(v.shape[1])], dim=1)  # [B, V, V]
    return torch.cat([gram, v.sum(dim=2)[..., None]], dim=2)
