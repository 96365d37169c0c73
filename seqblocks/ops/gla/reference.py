"""The spec of gated linear attention: a token-by-token loop in fp32 (float64 for float64 inputs).

GLA (Yang et al., 2024) keeps a [K, V] state per head and decays each key channel by its own
data-dependent factor::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          g_t [K] log-decay (<= 0 for a contraction)
    o_t = scale * S_t^T q_t                           [V]

Simple GLA (RetNet's retention, lightning attention) is the case of one scalar decay per head,
``g_t`` [H] broadcast over the key channels. With ``cu_seqlens`` the packed sequences are run one by
one, each from its own initial state (zeros by default). These are fla's ``naive_recurrent_gla`` /
``naive_recurrent_simple_gla`` definitions (state [K, V], scale K ** -0.5 by default).

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import torch

from seqblocks.ops.gla._checks import compute_dtype, num_rows, resolve_scale

__all__ = ["gla_ref", "simple_gla_ref"]


def _recurrence(q, k, v, g, scale, state):
    """q, k, g [B, T, H, K], v [B, T, H, V] in the accumulation dtype, state [B, H, K, V] -> (o, state)."""
    outs = []
    for t in range(q.shape[1]):
        state = g[:, t, :, :, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, state


def gla_ref(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Sequential GLA. q, k, g [B, T, H, K], v [B, T, H, V]; initial_state [B or N, H, K, V].

    Returns (o [B, T, H, V] in q's dtype, final state [B or N, H, K, V] fp32 / float64 or None).
    """
    acc = compute_dtype(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = resolve_scale("gla_ref", scale, K)
    out_dtype = q.dtype
    q, k, v, g = (t.to(acc) for t in (q, k, v, g))
    rows = num_rows(B, cu_seqlens)
    h0 = q.new_zeros(rows, H, K, V) if initial_state is None else initial_state.to(acc)
    if cu_seqlens is None:
        o, final = _recurrence(q, k, v, g, scale, h0)
    else:
        bounds = cu_seqlens.tolist()
        pieces, finals = [], []
        for n in range(rows):
            s, e = bounds[n], bounds[n + 1]
            o_n, f_n = _recurrence(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], scale, h0[n : n + 1])
            pieces.append(o_n)
            finals.append(f_n)
        o, final = torch.cat(pieces, dim=1), torch.cat(finals, dim=0)
    return o.to(out_dtype), (final if output_final_state else None)


def simple_gla_ref(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Sequential simple GLA: ``gla_ref`` with the scalar log-decay g [B, T, H] on every key channel."""
    return gla_ref(q, k, v, g[..., None].expand(*g.shape, q.shape[-1]), scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
