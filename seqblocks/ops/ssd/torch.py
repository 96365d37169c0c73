"""Chunked pure-PyTorch SSD (the "minimal SSD" form of Mamba-2): quadratic inside a chunk, a linear
recurrence of states between chunks. Runs anywhere PyTorch does; autograd differentiates it.

With ``a[t] = dt[t] * A`` (the log of head h's decay at step t) and chunks of ``L`` steps, inside one
chunk::

    seg[l, s] = a[s+1] + ... + a[l]  (l >= s; -inf above the diagonal)
    y_diag[l] = sum_{s <= l} (C[l] . B[s]) * exp(seg[l, s]) * dt[s] * x[s]        (the chunk's own inputs)
    y_off[l]  = exp(a[0] + ... + a[l]) * C[l] . h_in                               (the incoming state)
    h_out     = exp(a[0] + ... + a[L-1]) * h_in + sum_s exp(seg[L-1, s]) * dt[s] * x[s] B[s]^T

``seg`` is built by a masked cumulative sum, never as a difference of two running sums, so a long
chunk of strong decay loses no precision. The chunk-to-chunk pass is a loop over T / L chunks.

Padding (``lengths``, and the tail that rounds T up to a multiple of L) gets ``dt = 0`` and zero
inputs: the state passes through unchanged and the padded outputs are set to 0. Packed sequences
(``cu_seqlens``) are unpacked into a padded batch with lengths and packed again.

Non-finite values: inside a chunk the quadratic form multiplies future inputs by a zero weight, and
``0 * NaN = NaN`` would leak a NaN backwards in time. So tokens with a non-finite ``x``, ``dt`` or
``B`` are zeroed before the chunk arithmetic and their row's outputs from that token on (and its final
state) are set to NaN afterwards, which is exactly what the sequential recurrence produces.

Shapes: B batch, T time, H heads, P head width, N state, G groups, c chunks, L chunk length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.ssd._common import compute_dtype, head_groups, process_dt

__all__ = ["ssd_torch", "ssd_state_update_torch"]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> [..., L, L] with ``out[l, s] = a[s+1] + ... + a[l]`` for l >= s, -inf above."""
    L = a.shape[-1]
    rows = a.unsqueeze(-1).expand(*a.shape, L)  # [..., l', s] = a[l']
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), -1)
    seg = rows.masked_fill(~strict, 0).cumsum(-2)  # sum over s < l' <= l
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~causal, -math.inf)


def _chunked(x, step, A, B, C, h0, L):
    """x [B, T, H, P], step [B, T, H], B / C [B, T, H, N] (already per head), T a multiple of L, all in
    the compute dtype; h0 [B, H, P, N] -> (y [B, T, H, P], final [B, H, P, N])."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    c = T // L
    xs = (x * step.unsqueeze(-1)).view(Bsz, c, L, H, P)          # dt * x
    Bs, Cs = B.view(Bsz, c, L, H, N), C.view(Bsz, c, L, H, N)
    a = (step * A).view(Bsz, c, L, H).permute(0, 1, 3, 2)       # [B, c, H, L]
    seg = _segsum(a)                                             # [B, c, H, L, L]
    decay_in = torch.exp(a.cumsum(-1))                           # [B, c, H, L]: exp(a[0] + ... + a[l])
    decay_out = torch.exp(seg[..., -1, :])                       # [B, c, H, L]: exp(a[s+1] + ... + a[L-1])

    scores = torch.einsum("bclhn,bcshn->bchls", Cs, Bs) * torch.exp(seg)
    y = torch.einsum("bchls,bcshp->bclhp", scores, xs)
    contrib = torch.einsum("bclhn,bchl,bclhp->bchpn", Bs, decay_out, xs)  # each chunk's own end state

    h, h_in = h0, []
    chunk_decay = decay_in[..., -1]                              # [B, c, H]
    for i in range(c):
        h_in.append(h)
        h = chunk_decay[:, i, :, None, None] * h + contrib[:, i]
    h_in = torch.stack(h_in, 1)                                  # [B, c, H, P, N]
    y = y + torch.einsum("bclhn,bchpn,bchl->bclhp", Cs, h_in, decay_in)
    return y.reshape(Bsz, T, H, P), h


def ssd_torch(
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
    chunk_size: int = 256,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD; see ``seqblocks.ops.ssd.ssd`` for the contract. Inputs are assumed valid."""
    if cu_seqlens is not None:
        xx, dd, BB, CC = (unpack(t, cu_seqlens)[0] for t in (x, dt, B, C))
        zz = None if z is None else unpack(z, cu_seqlens)[0]
        y, final = ssd_torch(xx, dd, A, BB, CC, D, zz, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                             initial_state=initial_state, return_final_state=True, lengths=cu_seqlens.diff(),
                             chunk_size=chunk_size)
        y = pack(y, cu_seqlens)
        return (y, final) if return_final_state else y

    acc = compute_dtype(x, dt, A, B, C, initial_state)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    h0 = torch.zeros(Bsz, H, P, N, dtype=acc, device=x.device) if initial_state is None else initial_state.to(acc)
    if Bsz == 0 or T == 0:
        y = x.new_zeros(x.shape)
        return (y, h0.clone()) if return_final_state else y

    step = process_dt(dt, dt_bias, dt_softplus, dt_limit, acc)
    xa, Ba, Ca = x.to(acc), head_groups(B.to(acc), H), head_groups(C.to(acc), H)
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=x.device) < lengths.to(x.device).unsqueeze(1)  # [B, T]
    # Tokens whose x, step or B is not finite poison the recurrence from there on (module docstring).
    finite = torch.isfinite(xa).flatten(2).all(-1) & torch.isfinite(step).all(-1)
    bad = ~(finite & torch.isfinite(Ba).flatten(2).all(-1))
    if valid is not None:
        bad = bad & valid
    keep = ~bad if valid is None else valid & ~bad
    zero = torch.zeros((), dtype=acc, device=x.device)
    step = torch.where(keep.unsqueeze(-1), step, zero)
    xa = torch.where(keep[..., None, None], xa, zero)
    Ba = torch.where(keep[..., None, None], Ba, zero)
    if valid is not None:
        Ca = torch.where(valid[..., None, None], Ca, zero)

    L = min(chunk_size, T)
    pad = (-T) % L
    if pad:
        xa, Ba, Ca = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xa, Ba, Ca))
        step = F.pad(step, (0, 0, 0, pad))
    y, final = _chunked(xa, step, A.to(acc), Ba, Ca, h0, L)
    y = y[:, :T]
    xin = x.to(acc)
    if D is not None:
        Dh = D.to(acc) if D.dim() == 2 else D.to(acc).unsqueeze(-1)
        y = y + Dh * xin
    if z is not None:
        y = y * F.silu(z.to(acc))
    poisoned = bad.to(torch.int32).cumsum(1) > 0
    y = y.masked_fill(poisoned[..., None, None], math.nan)
    final = final.masked_fill(poisoned[:, -1, None, None, None], math.nan)
    if valid is not None:
        y = torch.where(valid[..., None, None], y, zero)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y


def ssd_state_update_torch(
    state: torch.Tensor,
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
) -> torch.Tensor:
    """One step of the recurrence on ``state`` [B, H, P, N] in place; returns y [B, H, P] in x's dtype."""
    acc = state.dtype
    H = x.shape[1]
    step = process_dt(dt, dt_bias, dt_softplus, dt_limit, acc)     # [B, H]
    xa = x.to(acc)
    Bh, Ch = head_groups(B.to(acc), H), head_groups(C.to(acc), H)  # [B, H, N]
    decay = torch.exp(step * A.to(acc))
    new = decay[..., None, None] * state + (step.unsqueeze(-1) * xa).unsqueeze(-1) * Bh.unsqueeze(-2)
    state.copy_(new)
    y = (new * Ch.unsqueeze(-2)).sum(-1)
    if D is not None:
        y = y + (D.to(acc) if D.dim() == 2 else D.to(acc).unsqueeze(-1)) * xa
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
