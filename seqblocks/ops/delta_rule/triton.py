"""Triton kernels of the (gated) delta rule: a fused chunked forward and the fused decode step.

``chunk_fwd_kernel`` runs one program per (sequence, head, block of V columns). It holds the state tile
``S`` [K, BV] in fp32 registers and walks its sequence chunk by chunk (C steps each), doing the whole
chunked form of ``torch.py`` per chunk:

1. the chunk-local UT transform: ``A = diag(b) (K K^T o D)`` strictly lower, with the decay matrix
   ``D_ij = exp(G_i - G_j)``, and ``T = (I + A)^-1`` by forward substitution, one row at a time;
2. ``W = T diag(b e^G) K`` and ``U' = T diag(b) V`` (both ``tl.dot``);
3. the corrected values ``U = U' - W S``, the outputs ``o = scale (diag(e^G) Q S + (Q K^T o D) U)``;
4. the state passing ``S <- e^{G_C} S + (diag(e^{G_C - G}) K)^T U``.

Programs of different V blocks recompute steps 1-2 (K-sized work) instead of exchanging them through
memory; with ``cu_seqlens`` each program reads its own sequence's bounds, so packed batches need no
host sync and no index tables. The grid is (sequences, heads, V / BV), from shapes only.

The backward runs the PyTorch chunked path again under autograd (``DeltaRuleTriton.backward``): the
Triton backward kernels (chunk-state recomputation, dS passing in reverse, the transposed UT
transform) are not written yet.

``step_kernel`` is one decode token: per (row, head, V block), ``S <- e^g S``, ``u = b (v - S^T k)``,
``S += k u^T``, ``o = scale S^T q``, with the state updated in place.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk, N sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqblocks.ops.delta_rule._checks import L2NORM_EPS
from seqblocks.ops.delta_rule.torch import gated_delta_rule_torch

__all__ = ["gated_delta_rule_triton", "delta_rule_step_triton"]


@triton.jit
def chunk_fwd_kernel(q, k, v, g, beta, o, h0, ht, cu_seqlens, T, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, scale, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                     VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr,
                     PRECISION: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # [B, T, H, *] layouts: token t of sequence i_n at (base + t) * H + i_h
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        base = bos * 0
    else:
        bos = (i_n * 0).to(tl.int64)
        eos = bos + T
        base = i_n.to(tl.int64) * T
    rows_c = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = cols_k < K, cols_v < V
    causal = rows_c[:, None] >= rows_c[None, :]
    strict = rows_c[:, None] > rows_c[None, :]
    eye = (rows_c[:, None] == rows_c[None, :]).to(tl.float32)

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        p_h = h0 + ((i_n * H + i_h) * K + cols_k[:, None]).to(tl.int64) * V + cols_v[None, :]
        S = tl.load(p_h, mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(tl.float32)

    for c0 in range(bos, eos, C):
        t = c0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)  # [C]
        m_tk = mask_t[:, None] & mask_k[None, :]
        m_tv = mask_t[:, None] & mask_v[None, :]
        b_q = tl.load(q + tok[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + tok[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_b = tl.load(beta + tok, mask=mask_t, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 1) + EPS)[:, None]
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 1) + EPS)[:, None]
        if GATED:
            b_g = tl.load(g + tok, mask=mask_t, other=0.0).to(tl.float32)
            G = tl.cumsum(b_g, 0)  # [C]; padded steps add 0, so G[C - 1] is the last valid value
            G_end = tl.sum(tl.where(rows_c == C - 1, G, 0.0), 0)
            D = tl.where(causal, tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
            eG = tl.exp(G)
            to_end = tl.exp(G_end - G)
            gamma = tl.exp(G_end)
        else:
            D = tl.where(causal, 1.0, 0.0)
            eG = tl.full([C], 1.0, tl.float32)
            to_end = eG
            gamma = 1.0
        # 1. UT transform: T = (I + A)^-1, forward substitution on Tm = -A (strictly lower)
        kk = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)  # [C, C]
        Tm = -tl.where(strict, b_b[:, None] * kk * D, 0.0)
        for i in range(1, C):
            row_i = tl.sum(tl.where(rows_c[:, None] == i, Tm, 0.0), 0)  # [C], row i of -A
            new = row_i + tl.sum(row_i[:, None] * Tm, 0)
            new = tl.where(rows_c < i, new, 0.0)
            Tm = tl.where(rows_c[:, None] == i, new[None, :], Tm)
        Tmat = Tm + eye
        # 2. W and U'
        W = tl.dot(Tmat, (b_b * eG)[:, None] * b_k, input_precision=PRECISION)  # [C, BK]
        U = tl.dot(Tmat, b_b[:, None] * b_v, input_precision=PRECISION)  # [C, BV]
        # 3. corrected values and outputs
        U = U - tl.dot(W, S, input_precision=PRECISION)
        QK = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * D
        b_o = tl.dot(b_q * eG[:, None], S, input_precision=PRECISION) + tl.dot(QK, U, input_precision=PRECISION)
        tl.store(o + tok[:, None] * V + cols_v[None, :], (scale * b_o).to(o.dtype.element_ty), mask=m_tv)
        # 4. state passing
        S = gamma * S + tl.dot(tl.trans(b_k * to_end[:, None]), U, input_precision=PRECISION)

    if STORE_HT:
        p_t = ht + ((i_n * H + i_h) * K + cols_k[:, None]).to(tl.int64) * V + cols_v[None, :]
        tl.store(p_t, S, mask=mask_k[:, None] & mask_v[None, :])


@triton.jit
def step_kernel(state, q, k, v, g, beta, o, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, scale,
                BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, L2NORM: tl.constexpr,
                EPS: tl.constexpr):
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = cols_k < K, cols_v < V
    bh = (i_b * H + i_h).to(tl.int64)
    b_q = tl.load(q + bh * K + cols_k, mask=mask_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + bh * K + cols_k, mask=mask_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + bh * V + cols_v, mask=mask_v, other=0.0).to(tl.float32)
    b_b = tl.load(beta + bh).to(tl.float32)
    if L2NORM:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, 0) + EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, 0) + EPS)
    p_s = state + (bh * K + cols_k[:, None]) * V + cols_v[None, :]
    m_s = mask_k[:, None] & mask_v[None, :]
    S = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)
    if GATED:
        S = S * tl.exp(tl.load(g + bh).to(tl.float32))
    u = b_b * (b_v - tl.sum(S * b_k[:, None], 0))  # [BV]
    S = S + b_k[:, None] * u[None, :]
    tl.store(p_s, S.to(state.dtype.element_ty), mask=m_s)
    b_o = scale * tl.sum(S * b_q[:, None], 0)
    tl.store(o + bh * V + cols_v, b_o.to(o.dtype.element_ty), mask=mask_v)


def _blocks(K: int, V: int) -> tuple[int, int]:
    # power-of-two tiles, at least 16 wide (tl.dot's minimum); all of K in one tile
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    return BK, BV


def _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    C = max(16, triton.next_power_of_2(min(chunk_size, 64)))
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    o = torch.empty(Bsz, T, H, V, device=q.device, dtype=q.dtype)
    final = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.contiguous().float()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (N, H, triton.cdiv(V, BV))
    chunk_fwd_kernel[grid](
        q, k, v, beta if g is None else g, beta, o, final if h0 is None else h0, final,
        final if cu_seqlens is None else cu_seqlens, T, H, K, V, scale, C=C, BK=BK, BV=BV, GATED=g is not None,
        HAS_H0=h0 is not None, STORE_HT=True, VARLEN=cu_seqlens is not None, L2NORM=use_qk_l2norm,
        EPS=L2NORM_EPS, PRECISION=precision, num_warps=8 if BK * BV >= 128 * 64 else 4)
    return o, final


class DeltaRuleTriton(torch.autograd.Function):
    """Forward: the fused chunked kernel. Backward: the PyTorch chunked path recomputed under autograd."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
        o, final = _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.options = (scale, use_qk_l2norm, chunk_size)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        scale, use_qk_l2norm, chunk_size = ctx.options
        inputs = [t if t is None else t.detach().requires_grad_(n) for t, n in
                  zip((q, k, v, g, beta, initial_state), ctx.needs_input_grad[:6])]
        with torch.enable_grad():
            o, final = gated_delta_rule_torch(*inputs[:5], scale=scale, initial_state=inputs[5],
                                              output_final_state=True, cu_seqlens=cu_seqlens,
                                              use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((o, final), wanted, (do, dfinal), allow_unused=True)) if wanted else None
        out = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return (*out, None, None, None, None)


def gated_delta_rule_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                            scale: float | None, initial_state: Tensor | None, output_final_state: bool,
                            cu_seqlens: Tensor | None, use_qk_l2norm: bool, chunk_size: int
                            ) -> tuple[Tensor, Tensor | None]:
    """The chunked gated delta rule (``g`` None: ungated) on the Triton kernel; contract of ``gated_delta_rule``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final = DeltaRuleTriton.apply(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
                                     chunk_size)
    return o, (final if output_final_state else None)


def delta_rule_step_triton(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                           scale: float | None, use_qk_l2norm: bool) -> Tensor:
    """One decode token on the fused step kernel; ``state`` [B, H, K, V] (contiguous fp32) updated in place."""
    Bsz, H, K, V = state.shape
    scale = K ** -0.5 if scale is None else float(scale)
    BK, BV = _blocks(K, V)
    o = torch.empty(Bsz, H, V, device=q.device, dtype=q.dtype)
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = beta if g is None else g.contiguous()
    step_kernel[(Bsz, H, triton.cdiv(V, BV))](state, q, k, v, g, beta, o, H, K, V, scale, BK=BK, BV=BV,
                                              GATED=g is not beta, L2NORM=use_qk_l2norm, EPS=L2NORM_EPS)
    return o
