"""Reference (the spec) of the SSD recurrence: Mamba-2's state space with one scalar decay per head.

For every sequence, head h (group ``g(h) = h // (H / G)``), head channel p and state index n, with the
step ``dt = clamp(softplus(dt + dt_bias), *dt_limit)`` (bias and softplus optional)::

    h[t, h, p, n] = exp(dt[t, h] * A[h]) * h[t-1, h, p, n] + dt[t, h] * x[t, h, p] * B[t, g(h), n]
    y[t, h, p]    = sum_n C[t, g(h), n] * h[t, h, p, n]  +  D[h] (or D[h, p]) * x[t, h, p]
    y[t, h, p]   *= silu(z[t, h, p])                                   (optional gate)

Sequential over time, one sequence at a time, state and accumulation in fp32 (float64 for float64
inputs). Slow and obviously right.

Shapes: B batch, T time, H heads, P head width, N state, G groups of B / C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqblocks.ops.ssd._common import compute_dtype, head_groups, process_dt

__all__ = ["ssd_ref"]


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD; see ``seqblocks.ops.ssd.ssd`` for the contract. Inputs are assumed valid."""
    acc = compute_dtype(x, dt, A, B, C, initial_state)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    step = process_dt(dt, dt_bias, dt_softplus, dt_limit, acc)  # [B, T, H]
    A = A.to(acc)
    if D is not None:
        D = D.to(acc) if D.dim() == 2 else D.to(acc).unsqueeze(-1)  # [H, P] or [H, 1]

    # Each sequence is (row, start, stop, index of its initial / final state).
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        seqs = [(0, bounds[i], bounds[i + 1], i) for i in range(len(bounds) - 1)]
    else:
        seqs = [(b, 0, T if lengths is None else int(lengths[b]), b) for b in range(Bsz)]

    y = torch.zeros(Bsz, T, H, P, dtype=acc, device=x.device)
    finals = []
    for row, start, stop, k in seqs:
        h = torch.zeros(H, P, N, dtype=acc, device=x.device)
        if initial_state is not None:
            h = h + initial_state[k].to(acc)
        for t in range(start, stop):
            xt = x[row, t].to(acc)                            # [H, P]
            Bt = head_groups(B[row, t].to(acc), H)            # [H, N]
            Ct = head_groups(C[row, t].to(acc), H)
            decay = torch.exp(step[row, t] * A)               # [H]
            h = decay[:, None, None] * h + (step[row, t, :, None] * xt)[:, :, None] * Bt[:, None, :]
            yt = (h * Ct[:, None, :]).sum(-1)                 # [H, P]
            if D is not None:
                yt = yt + D * xt
            if z is not None:
                yt = yt * F.silu(z[row, t].to(acc))
            y[row, t] = yt
        finals.append(h)
    y = y.to(x.dtype)
    if return_final_state:
        return y, torch.stack(finals) if finals else x.new_zeros(0, H, P, N, dtype=acc)
    return y
