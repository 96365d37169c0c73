"""The sequential delta rule: the spec every fast path is tested against.

Per head, with state ``S`` [K, V] (fla's orientation: ``o_t = S_t^T q_t``), decay ``a_t = exp(g_t)``
(1 for the plain delta rule) and write strength ``b_t = beta_t``::

    S_t = a_t S_{t-1} + k_t b_t (v_t - a_t S_{t-1}^T k_t)^T      # = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    o_t = scale * S_t^T q_t

The write replaces the value the state predicts for key ``k_t`` by ``v_t`` (a step of online
regression with learning rate ``b_t``); the gate forgets before the write. With ``use_qk_l2norm`` q and
k are first divided by their L2 norm (``sqrt(sum(x^2) + 1e-6)``), which keeps ``I - b k k^T``
contractive for ``b`` in [0, 2].

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqblocks.ops.delta_rule._checks import compute_dtype, l2norm

__all__ = ["delta_rule_ref", "gated_delta_rule_ref"]


def gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule, one step at a time in fp32 (float64 for float64 inputs).

    Args:
        q, k (Tensor): [B, T, H, K].  v (Tensor): [B, T, H, V].
        g (Tensor | None): [B, T, H] log decay (``a_t = exp(g_t)``); None: no decay (the delta rule).
        beta (Tensor): [B, T, H] write strength.
        scale (float | None): output scale. Default: None (``K ** -0.5``).
        initial_state (Tensor | None): [B, H, K, V] ([N, H, K, V] with cu_seqlens). Default: None (zeros).
        output_final_state (bool): also return the final state. Default: False.
        cu_seqlens (Tensor | None): [N + 1] offsets of sequences packed in a batch of 1; the state
            restarts at each. Default: None.
        use_qk_l2norm (bool): L2-normalise q and k first. Default: False.

    Returns:
        (o, final_state): o [B, T, H, V] in q's dtype; final_state [B, H, K, V] ([N, H, K, V]) fp32 or None.
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            o_i, s_i = gated_delta_rule_ref(
                q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], None if g is None else g[:, lo:hi], beta[:, lo:hi],
                scale=scale, initial_state=None if initial_state is None else initial_state[i:i + 1],
                output_final_state=True, use_qk_l2norm=use_qk_l2norm)
            outs.append(o_i)
            finals.append(s_i)
        return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)

    acc = compute_dtype(q, k, v, g, beta, initial_state)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    S = q.new_zeros(Bsz, H, K, V) if initial_state is None else initial_state.to(acc)  # [B, H, K, V]
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(acc).exp()[..., None, None]
        k_t = k[:, t]  # [B, H, K]
        predicted = torch.einsum("bhkv,bhk->bhv", S, k_t)  # [B, H, V]
        u = beta[:, t, :, None] * (v[:, t] - predicted)  # [B, H, V]
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(Bsz, 0, H, V, dtype=acc)
    return o.to(out_dtype), (S if output_final_state else None)


def delta_rule_ref(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                   initial_state: Tensor | None = None, output_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """The (ungated) delta rule: ``gated_delta_rule_ref`` with ``g = 0``; arguments as there."""
    return gated_delta_rule_ref(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                use_qk_l2norm=use_qk_l2norm)
