"""The chunked (WY / UT-transform) delta rule in PyTorch: parallel inside a chunk, sequential across chunks.

Inside a chunk of C steps that starts from state ``S0`` [K, V], write ``G_i`` for the cumulative log
decay up to step i (``G = cumsum(g)`` within the chunk; 0 for the ungated rule) and ``u_i`` for the
corrected value ``b_i (v_i - (decayed state)^T k_i)`` that step i writes. Unrolling the recurrence::

    u_i + sum_{j<i} b_i exp(G_i - G_j) (k_i . k_j) u_j = b_i v_i - b_i exp(G_i) S0^T k_i

is one unit lower-triangular system ``(I + A) U = diag(b) V - diag(b e^G) K S0`` with
``A_ij = b_i exp(G_i - G_j) k_i . k_j`` (j < i). Solving it once per chunk (the UT transform) gives
``U = U' - W S0`` with ``U' = (I + A)^-1 diag(b) V`` and ``W = (I + A)^-1 diag(b e^G) K``, both
independent of the state, so only ``U``, the outputs and the next state need the sequential pass::

    o_i    = scale (e^{G_i} q_i^T S0 + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) u_j)
    S_next = e^{G_C} S0 + sum_j exp(G_C - G_j) k_j u_j^T

Non-finite values: inside a chunk the products multiply future tokens by a zero weight, and
``0 * NaN = NaN`` would leak a NaN backwards in time. So non-finite inputs are replaced by 0 first and
the outputs the sequential recurrence would make NaN are set to NaN afterwards: a token with a
non-finite k, v, beta or g poisons its head from there on (and the final state), a non-finite q only
its own output.

Differentiated by autograd. Everything runs in fp32 (float64 for float64 inputs). Sequences packed
with ``cu_seqlens`` run as a zero-padded batch: a padded step has ``b = 0`` and ``g = 0``, so it leaves
the state unchanged and each row's final state is its own.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk, n chunks, N packed sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.delta_rule._checks import compute_dtype, first_bad, l2norm, poison, zero_nonfinite

__all__ = ["gated_delta_rule_torch", "delta_rule_step_torch"]


def gated_delta_rule_torch(
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
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunked gated delta rule (``g`` None: ungated); arguments and results as ``gated_delta_rule_ref``."""
    if cu_seqlens is not None:
        qq, kk, vv, bb = (unpack(t, cu_seqlens)[0] for t in (q, k, v, beta))
        gg = None if g is None else unpack(g, cu_seqlens)[0]
        o, final = gated_delta_rule_torch(qq, kk, vv, gg, bb, scale=scale, initial_state=initial_state,
                                          output_final_state=True, use_qk_l2norm=use_qk_l2norm,
                                          chunk_size=chunk_size)
        return pack(o, cu_seqlens), (final if output_final_state else None)

    acc = compute_dtype(q, k, v, g, beta, initial_state)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    if T == 0:
        S = q.new_zeros(Bsz, H, K, V) if initial_state is None else initial_state.to(acc)
        return v.new_zeros(Bsz, 0, H, V, dtype=out_dtype), (S if output_final_state else None)
    C = min(C, T)  # a chunk longer than the sequence only adds padding
    # Non-finite inputs: zeroed here (before the L2 norm, so a bad row's gradient is 0, not NaN), their
    # outputs poisoned below (module docstring).
    q, k, v, g, beta, bad_q, bad = zero_nonfinite(q, k, v, None if g is None else g.to(acc), beta)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    pad = (-T) % C
    n = (T + pad) // C

    def chunks(t: Tensor) -> Tensor:  # [B, T, H, ...] -> [B, H, n, C, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, 0, 0, pad))
        return t.unflatten(1, (n, C)).movedim(3, 1)

    q, k, v, beta = chunks(q), chunks(k), chunks(v), chunks(beta)  # [B, H, n, C, K|V], beta [B, H, n, C]
    G = chunks(g.to(acc)).cumsum(-1) if g is not None else beta.new_zeros(beta.shape)  # [B, H, n, C]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -torch.inf)
    decay = diff.exp()  # [B, H, n, C, C], exp(G_i - G_j) for j <= i, else 0
    strict = decay.masked_fill(torch.eye(C, dtype=torch.bool, device=q.device), 0.0)  # j < i
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * strict  # [B, H, n, C, C] strictly lower
    eye = torch.eye(C, dtype=acc, device=q.device)
    IA = eye + A
    W = torch.linalg.solve_triangular(IA, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    U0 = torch.linalg.solve_triangular(IA, beta[..., None] * v, upper=False, unitriangular=True)
    QK = (q @ k.transpose(-1, -2)) * decay  # [B, H, n, C, C]
    q_decayed = q * G.exp()[..., None]  # [B, H, n, C, K]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # [B, H, n, C, K]
    chunk_decay = G[..., -1].exp()  # [B, H, n]

    S = q.new_zeros(Bsz, H, K, V) if initial_state is None else initial_state.to(acc)  # [B, H, K, V]
    outs = []
    for c in range(n):
        U = U0[:, :, c] - W[:, :, c] @ S  # [B, H, C, V]
        outs.append(scale * (q_decayed[:, :, c] @ S + QK[:, :, c] @ U))
        S = chunk_decay[:, :, c, None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(Bsz, H, 0, C, V)  # [B, H, n, C, V]
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)  # [B, T, H, V]
    o, S = poison(o, S, bad_q, first_bad(bad))
    return o.to(out_dtype), (S if output_final_state else None)


def delta_rule_step_torch(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                          scale: float | None = None, use_qk_l2norm: bool = False) -> Tensor:
    """One token of the (gated) delta rule: advances ``state`` [B, H, K, V] in place, returns o [B, H, V]."""
    acc = state.dtype
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    S = state if g is None else state * g.to(acc).exp()[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))  # [B, H, V]
    S = S + k[..., :, None] * u[..., None, :]
    state.copy_(S)
    return (scale * torch.einsum("bhkv,bhk->bhv", S, q)).to(out_dtype)
