"""Reference (the spec) of the selective scan, Mamba's S6 recurrence fused with its discretisation.

For every batch row b, channel d and state index n, with ``dt = delta`` (after the optional bias and
softplus) and ``(Ā, gamma) = discretize(A[d, n], dt[b, t, d], method, dt_A)``::

    h[t, d, n] = Ā * h[t-1, d, n] + gamma * B[t, g(d), n] * u[t, d]
    y[t, d]    = sum_n C[t, g(d), n] * h[t, d, n]          (2 * Re(...) when the state is complex)
               + D[d] * u[t, d]                             (optional skip)
    y[t, d]   *= silu(z[t, d])                              (optional gate)

``g(d) = d // (D / G)`` is the group of channel d. Sequential over time, one sequence at a time, state
in fp32 / complex64 (float64 / complex128 for 64-bit inputs). Slow and obviously right.

Shapes: B batch, T time, D channels, N state, G groups of B / C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqblocks.ops.discretize import discretize
from seqblocks.ops.scan.reference import state_dtype

__all__ = ["selective_scan_ref", "compute_dtypes", "expand_groups", "readout"]


def compute_dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype, torch.dtype]:
    """(real compute dtype, state dtype): fp32 (float64 for 64-bit inputs), complex when any input is."""
    dts = [t.dtype for t in tensors if t is not None]
    sdt = state_dtype(*dts)
    real = sdt.to_real() if sdt.is_complex else sdt
    return real, sdt


def expand_groups(M: torch.Tensor, grouped: bool, D: int) -> torch.Tensor:
    """[..., N] -> [..., 1, N] (broadcasts over channels); grouped [..., G, N] -> [..., D, N], where
    channel d reads group d // (D / G)."""
    if not grouped:
        return M.unsqueeze(-2)
    G = M.shape[-2]
    return M.repeat_interleave(D // G, dim=-2)


def readout(C: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum_n C * h over the last axis; for a complex state ``2 * Re``: the state holds one member of
    each conjugate pair (Mamba / S4D convention), so the real signal is twice the real part."""
    y = (C * h).sum(-1)
    return 2 * y.real if y.is_complex() else y


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan; see ``seqblocks.ops.selective_scan.selective_scan`` for the
    contract. Inputs are assumed valid."""
    real, sdt = compute_dtypes(u, delta, A, B, C, initial_state)
    Bsz, T, Dm = u.shape
    N = A.shape[-1]
    grouped = B.dim() == 4
    dt = delta.to(real)
    if delta_bias is not None:
        dt = dt + delta_bias.to(real)
    if delta_softplus:
        dt = F.softplus(dt)
    dtA = None
    if delta_A is not None:
        dtA = delta_A.to(real)
        if dtA.dim() == 2:
            dtA = dtA.unsqueeze(-1)
        dtA = dtA.expand(Bsz, T, Dm)

    # Each sequence is (row, start, stop, index of its initial state).
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        seqs = [(0, bounds[i], bounds[i + 1], i) for i in range(len(bounds) - 1)]
    else:
        seqs = [(b, 0, T if lengths is None else int(lengths[b]), b) for b in range(Bsz)]

    y = torch.zeros(Bsz, T, Dm, dtype=real, device=u.device)
    finals = []
    for row, start, stop, k in seqs:
        h = torch.zeros(Dm, N, dtype=sdt, device=u.device)
        if initial_state is not None:
            h = h + initial_state[k].to(sdt)
        for t in range(start, stop):
            step_A = None if dtA is None else dtA[row, t].unsqueeze(-1)
            A_bar, gamma = discretize(A.to(sdt), dt[row, t].unsqueeze(-1), discretization, step_A)  # [D, N]
            Bt = expand_groups(B[row, t].to(sdt), grouped, Dm)  # [D or 1, N]
            Ct = expand_groups(C[row, t].to(sdt), grouped, Dm)
            h = A_bar * h + gamma * Bt * u[row, t].to(real).unsqueeze(-1)
            yt = readout(Ct, h)
            if D is not None:
                yt = yt + D.to(real) * u[row, t].to(real)
            if z is not None:
                yt = yt * F.silu(z[row, t].to(real))
            y[row, t] = yt
        finals.append(h)
    return y.to(u.dtype), torch.stack(finals)
