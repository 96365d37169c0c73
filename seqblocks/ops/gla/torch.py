"""The chunked PyTorch path of ``gla`` / ``simple_gla``: quadratic inside a chunk, state passing between.

For a chunk of C tokens with ``b_t = sum_{s <= t in chunk} g_s`` (the log-decay from the chunk start)::

    o_i    = scale * ( sum_{j <= i} (q_i * exp(b_i - b_j)) . k_j  v_j  +  (q_i * exp(b_i))^T S )
    S_next = exp(b_C) * S + sum_j (k_j * exp(b_C - b_j)) v_j^T

Every exponent above is <= 0 for a contraction (g <= 0), so nothing overflows. The intra-chunk term
is the one place a per-key decay needs care: factoring ``exp(b_i - b_j)`` into ``exp(b_i) exp(-b_j)``
(one matrix product) overflows as soon as the chunk has decayed by more than ~88 nats. We therefore
split the chunk into sub-blocks of c tokens (secondary chunking): for a block pair I > J the factor
is taken relative to the first row r of block I, ``exp(b_i - b_r) * exp(b_r - b_j)``, both <= 1, one
matrix product per pair; the c x c diagonal blocks are formed elementwise with the exponent masked to
-inf above the diagonal before ``exp``. The scalar decay of simple GLA needs none of this: its mask
``exp(b_i - b_j)`` is a [C, C] matrix formed directly.

Differentiated by autograd. With ``cu_seqlens`` the packed sequences run one at a time (their
bounds are read on the host: this path is the CPU / reference-speed fallback, not a kernel).

Shapes: B batch, T time, H heads, K key width, V value width, n chunks, C chunk, m = C / c sub-blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqblocks.ops.gla._checks import compute_dtype, num_rows

__all__ = ["gla_torch", "simple_gla_torch", "gla_step_torch"]


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, n, C, ...] with T zero-padded to a multiple of C."""
    pad = (-x.shape[1]) % C
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.movedim(1, 2)  # [B, H, T', ...]
    return x.reshape(*x.shape[:2], -1, C, *x.shape[3:])


def _neg_inf_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))


def _intra_gla(q, k, b, c: int) -> torch.Tensor:
    """Per-key decayed scores A[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk), j <= i. [B, H, n, C, K] -> [.., C, C]."""
    *lead, C, K = q.shape
    m = C // c
    qs, ks, bs = (t.reshape(*lead, m, c, K) for t in (q, k, b))
    ref = bs[..., :1, :]  # [.., m, 1, K] b at each block's first row
    blk = torch.arange(m, device=q.device)
    below = blk[:, None] > blk[None, :]  # [m(I), m(J)] strictly lower block pairs
    # Off-diagonal block pairs I > J: exponents relative to block I's first row (both <= 0).
    qt = qs * (bs - ref).exp()  # [.., m, c, K]
    e = _neg_inf_where(below[:, :, None, None], ref.unsqueeze(-3) - bs.unsqueeze(-4))  # [.., m(I), m(J), c, K]
    kt = ks.unsqueeze(-4) * e.exp()
    off = torch.einsum("...Iik,...IJjk->...IJij", qt, kt)
    # Diagonal blocks: the c x c x K exponents, masked above the diagonal before exp.
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    ed = _neg_inf_where(tri[:, :, None], bs.unsqueeze(-2) - bs.unsqueeze(-3))  # [.., m, c(i), c(j), K]
    diag = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, ed.exp())  # [.., m, c, c]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    eye = torch.eye(m, dtype=torch.bool, device=q.device)[:, :, None, None]
    blocks = torch.where(eye, diag.unsqueeze(-3), torch.where(below[:, :, None, None], off, zero))
    return blocks.transpose(-3, -2).reshape(*lead, C, C)  # [.., I, i, J, j] -> [.., C, C]


def _inter(qg, kg, v, decay, A, S):
    """State passing over chunks: o = A v + qg S per chunk, S <- decay * S + kg^T v.

    qg, kg [B, H, n, C, K], v [B, H, n, C, V], decay [B, H, n, K], A [B, H, n, C, C], S [B, H, K, V]."""
    outs = []
    for i in range(v.shape[2]):
        outs.append(A[:, :, i] @ v[:, :, i] + qg[:, :, i] @ S)
        S = decay[:, :, i, :, None] * S + kg[:, :, i].transpose(-1, -2) @ v[:, :, i]
    return torch.stack(outs, dim=2), S


def _one(q, k, v, g, scale, S, chunk_size, scalar):
    """One batch of whole sequences. q, k [B, T, H, K], g [B, T, H(, K)], S [B, H, K, V] -> (o [B, T, H, V], S)."""
    B, T, H, K = q.shape
    if T == 0:  # an empty (packed) sequence: no output, the state passes unchanged
        return v.new_zeros(v.shape), S
    C = chunk_size
    qc, kc, vc, gc = (_to_chunks(t, C) for t in (q, k, v, g))
    b = gc.cumsum(-1 if scalar else -2)  # [B, H, n, C] or [B, H, n, C, K]
    last = b[..., -1:] if scalar else b[..., -1:, :]
    if scalar:
        tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        A = (qc @ kc.transpose(-1, -2)) * _neg_inf_where(tri, b[..., :, None] - b[..., None, :]).exp()
        qg, kg, decay = qc * b[..., None].exp(), kc * (last - b)[..., None].exp(), last.exp().expand(*b.shape[:3], K)
    else:
        A = _intra_gla(qc, kc, b, math.gcd(C, 16))
        qg, kg, decay = qc * b.exp(), kc * (last - b).exp(), last[..., 0, :].exp()
    o, S = _inter(qg, kg, vc, decay, A, S)
    o = o.flatten(2, 3)[:, :, :T].movedim(1, 2) * scale  # [B, T, H, V]
    return o, S


def _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, scalar):
    acc = compute_dtype(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    q, k, v, g = (t.to(acc) for t in (q, k, v, g))
    rows = num_rows(B, cu_seqlens)
    S0 = q.new_zeros(rows, H, K, V) if initial_state is None else initial_state.to(acc)
    if cu_seqlens is None:
        o, S = _one(q, k, v, g, scale, S0, chunk_size, scalar)
    else:
        bounds = cu_seqlens.tolist()
        pieces, finals = [], []
        for n in range(rows):
            s, e = bounds[n], bounds[n + 1]
            o_n, S_n = _one(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], scale, S0[n : n + 1], chunk_size, scalar)
            pieces.append(o_n)
            finals.append(S_n)
        o, S = torch.cat(pieces, dim=1), torch.cat(finals, dim=0)
    return o.to(out_dtype), (S if output_final_state else None)


def gla_torch(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
              chunk_size=64):
    """Chunked GLA; the arguments and results of ``gla`` (``scale`` already resolved to a float)."""
    return _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, scalar=False)


def simple_gla_torch(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                     chunk_size=64):
    """Chunked simple GLA (scalar decay g [B, T, H]); the arguments and results of ``simple_gla``."""
    return _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, scalar=True)


def gla_step_torch(state, q, k, v, g, *, scale):
    """One token: ``state <- exp(g) * state + k v^T`` in place, returns ``scale * state^T q`` [B, H, V].

    state [B, H, K, V] fp32 / float64; q, k [B, H, K]; v [B, H, V]; g [B, H, K] or [B, H] (scalar decay).
    """
    acc = state.dtype
    g = g.to(acc)
    decay = g.exp()[..., None] if g.dim() == 3 else g.exp()[..., None, None]
    new = decay * state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    state.copy_(new)
    return (torch.einsum("bhk,bhkv->bhv", q.to(acc), new) * scale).to(q.dtype)
