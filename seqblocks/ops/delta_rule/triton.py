"""Triton kernels of the (gated) delta rule: the chunked forward and backward, and the fused decode step.

Forward, two kernels (the chunked form of ``torch.py``):

- ``chunk_ut_kernel``, one program per (chunk, head), every chunk in parallel: the chunk-local UT
  transform ``T = (I + A)^-1`` with ``A = diag(b) (K K^T o D)`` strictly lower and the decay matrix
  ``D_ij = exp(G_i - G_j)`` (forward substitution, one row at a time), then ``W = T diag(b e^G) K`` and
  ``U' = T diag(b) V``, all written to fp32 buffers ([B, T, H, C | K | V]).
- ``chunk_fwd_kernel``, one program per (sequence, head, block of V columns), holds the state tile
  ``S`` [K, BV] in fp32 registers and walks its chunks in order: ``U = U' - W S``, the outputs
  ``o = scale (diag(e^G) Q S + (Q K^T o D) U)`` and the state passing
  ``S <- e^{G_C} S + (diag(e^{G_C - G}) K)^T U``; it saves each chunk's starting state when a
  gradient is needed.

Packed sequences (``cu_seqlens``) need no host sync: the sequential kernels read their sequence's
bounds, and the chunk-parallel ones a (sequence, first token) table per chunk slot built on the
device for the shape-only upper bound ``cdiv(T, C) + N`` slots (spare slots do nothing). Grids come
from shapes only.

Backward, two kernels:

- ``chunk_bwd_dv_kernel``, per (sequence, head, V block), walks the chunks in reverse carrying ``dS``
  [K, BV], reading the saved state, ``T``, ``W`` and ``U'``: it writes ``dv`` and finally ``dh0``, and
  its V block's share of every sum over V that the key side needs (``d(Q e^G)``, ``d(K e^{G_C-G})``,
  ``dW`` [C, K]; ``dP``, ``dT`` from ``U'`` [C, C]; the ``beta`` term of ``U'`` and ``d(e^{G_C})``).
- The shares are summed over V blocks (one ``sum`` over a leading axis of a few blocks), then
  ``chunk_bwd_dqk_kernel``, per (chunk, head) in parallel, goes back through ``T``
  (``dA = -T^T dT T^T``), the decay matrix, the gates and the L2 norm to ``dq``, ``dk``, ``dbeta`` and
  ``dg`` (a reverse cumulative sum inside the chunk).

``step_kernel`` is one decode token: per (row, head, V block), ``S <- e^g S``, ``u = b (v - S^T k)``,
``S += k u^T``, ``o = scale S^T q``, with the state updated in place.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk, N sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqblocks.ops.delta_rule._checks import L2NORM_EPS, poison, zero_nonfinite

__all__ = ["gated_delta_rule_triton", "delta_rule_step_triton"]


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    # (bos, eos, base): the sequence's token range and the row offset of its [B, T, H, *] layout
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        base = bos * 0
    else:
        bos = (i_n * 0).to(tl.int64)
        eos = bos + T
        base = i_n.to(tl.int64) * T
    return bos, eos, base


@triton.jit
def _load_qkbg(q, k, g, beta, tok, mask_t, cols_k, mask_k, K: tl.constexpr, GATED: tl.constexpr,
               L2NORM: tl.constexpr, EPS: tl.constexpr):
    # one chunk's q, k (L2-normalised when asked; rq, rk the reciprocal norms), beta and G = cumsum(g)
    m_tk = mask_t[:, None] & mask_k[None, :]
    b_q = tl.load(q + tok[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + tok[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_b = tl.load(beta + tok, mask=mask_t, other=0.0).to(tl.float32)
    if L2NORM:
        rq = 1.0 / tl.sqrt(tl.sum(b_q * b_q, 1) + EPS)
        rk = 1.0 / tl.sqrt(tl.sum(b_k * b_k, 1) + EPS)
    else:
        rq = tl.full([tok.shape[0]], 1.0, tl.float32)
        rk = rq
    b_q = b_q * rq[:, None]
    b_k = b_k * rk[:, None]
    if GATED:
        G = tl.cumsum(tl.load(g + tok, mask=mask_t, other=0.0).to(tl.float32), 0)
    else:
        G = tl.zeros([tok.shape[0]], dtype=tl.float32)
    return b_q, b_k, rq, rk, b_b, G


@triton.jit
def _decays(G, rows_c, C: tl.constexpr):
    # D_ij = exp(G_i - G_j) for j <= i (0 above); e^G; exp(G_C - G); e^{G_C}. Padded steps add g = 0,
    # so G[C - 1] is the chunk's total log decay.
    causal = rows_c[:, None] >= rows_c[None, :]
    G_end = tl.sum(tl.where(rows_c == C - 1, G, 0.0), 0)
    D = tl.where(causal, tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
    return D, tl.exp(G), tl.exp(G_end - G), tl.exp(G_end)


@triton.jit
def _ut_transform(b_k, b_b, D, rows_c, C: tl.constexpr, PRECISION: tl.constexpr):
    # T = (I + A)^-1 with A = diag(b) (K K^T o D) strictly lower, by forward substitution on -A:
    # row i of the inverse's strict part is -A_i - sum_{j<i} A_ij T_j (rows j < i already final).
    kk = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)  # [C, C]
    strict = rows_c[:, None] > rows_c[None, :]
    Tm = -tl.where(strict, b_b[:, None] * kk * D, 0.0)
    for i in range(1, C):
        row_i = tl.sum(tl.where(rows_c[:, None] == i, Tm, 0.0), 0)  # [C]
        new = tl.where(rows_c < i, row_i + tl.sum(row_i[:, None] * Tm, 0), 0.0)
        Tm = tl.where(rows_c[:, None] == i, new[None, :], Tm)
    return Tm + (rows_c[:, None] == rows_c[None, :]).to(tl.float32), kk


@triton.jit
def _slot(chunk_table, cu_seqlens, i_s, T, VARLEN: tl.constexpr):
    # chunk slot -> (valid, first token t0, eos, base) of its sequence; slots past the last chunk are invalid
    seq = tl.load(chunk_table + 2 * i_s).to(tl.int64)
    t0 = tl.load(chunk_table + 2 * i_s + 1).to(tl.int64)
    valid = seq >= 0
    bos, eos, base = _seq_bounds(cu_seqlens, tl.maximum(seq, 0), T, VARLEN)
    return valid, t0, tl.where(valid, eos, t0), base  # an invalid slot gets an empty token range


@triton.jit
def chunk_ut_kernel(k, v, g, beta, chunk_table, cu_seqlens, Tbuf, Wbuf, Ubuf, T, H: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    GATED: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Per (chunk, head), all chunks in parallel: the UT transform T = (I + A)^-1 ([C, C] rows per token),
    W = T diag(b e^G) K ([C, K]) and U' = T diag(b) V ([C, V]), written for the sequential kernels."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    mask_k = cols_k < K
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    b_q, b_k, rq, rk, b_b, G = _load_qkbg(k, k, g, beta, tok, mask_t, cols_k, mask_k, K, GATED, L2NORM, EPS)
    D, eG, to_end, gamma = _decays(G, rows_c, C)
    Tmat, kk = _ut_transform(b_k, b_b, D, rows_c, C, PRECISION)
    tl.store(Tbuf + tok[:, None] * C + rows_c[None, :], Tmat, mask=mask_t[:, None] & (rows_c[None, :] < C))
    W = tl.dot(Tmat, (b_b * eG)[:, None] * b_k, input_precision=PRECISION)
    tl.store(Wbuf + tok[:, None] * K + cols_k[None, :], W, mask=mask_t[:, None] & mask_k[None, :])
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        m_tv = mask_t[:, None] & (cols_v < V)[None, :]
        b_v = tl.load(v + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        U0 = tl.dot(Tmat, b_b[:, None] * b_v, input_precision=PRECISION)
        tl.store(Ubuf + tok[:, None] * V + cols_v[None, :], U0, mask=m_tv)


@triton.jit
def chunk_fwd_kernel(q, k, v, g, beta, Wbuf, Ubuf, o, h0, ht, h, chunk_offsets, cu_seqlens, T, H: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, scale, C: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_H: tl.constexpr,
                     VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, base = _seq_bounds(cu_seqlens, i_n, T, VARLEN)
    rows_c = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = cols_k < K, cols_v < V
    m_kv = mask_k[:, None] & mask_v[None, :]
    tile = cols_k[:, None].to(tl.int64) * V + cols_v[None, :]  # offsets of an [BK, BV] state tile

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S = tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + tile, mask=m_kv, other=0.0).to(tl.float32)
    if STORE_H:
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)

    for c0 in range(bos, eos, C):
        t = c0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)  # [C]
        m_tv = mask_t[:, None] & mask_v[None, :]
        if STORE_H:  # the chunk's starting state, for the backward
            i_c = first_chunk + (c0 - bos) // C
            tl.store(h + (i_c * H + i_h) * K * V + tile, S, mask=m_kv)
        b_q, b_k, rq, rk, b_b, G = _load_qkbg(q, k, g, beta, tok, mask_t, cols_k, mask_k, K, GATED, L2NORM, EPS)
        D, eG, to_end, gamma = _decays(G, rows_c, C)
        W = tl.load(Wbuf + tok[:, None] * K + cols_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        U = tl.load(Ubuf + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0)  # U'
        U = U - tl.dot(W, S, input_precision=PRECISION)
        QK = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * D
        b_o = tl.dot(b_q * eG[:, None], S, input_precision=PRECISION) + tl.dot(QK, U, input_precision=PRECISION)
        tl.store(o + tok[:, None] * V + cols_v[None, :], (scale * b_o).to(o.dtype.element_ty), mask=m_tv)
        S = gamma * S + tl.dot(tl.trans(b_k * to_end[:, None]), U, input_precision=PRECISION)

    tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + tile, S, mask=m_kv)


@triton.jit
def chunk_bwd_dv_kernel(q, k, v, g, beta, Tbuf, Wbuf, Ubuf, do, dht, h, chunk_offsets, cu_seqlens, dv, dh0, p_qk,
                        p_c, p_t, T, BT,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, scale, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, HAS_DHT: tl.constexpr,
                        VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr):
    """Backward pass 1, per (sequence, head, V block), chunks in reverse: carries dS, writes dv and dh0,
    and this V block's share of the sums over V that pass 2 needs (p_qk: d(Q e^G), d(K e^{G_C - G}) and
    dW, each [C, K] per chunk; p_c: dP and dT' rows, [C, C]; p_t: d(beta) from U' and d(gamma))."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, base = _seq_bounds(cu_seqlens, i_n, T, VARLEN)
    rows_c = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = cols_k < K, cols_v < V
    m_kv = mask_k[:, None] & mask_v[None, :]
    tile = cols_k[:, None].to(tl.int64) * V + cols_v[None, :]
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = (eos - bos + C - 1) // C

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS = tl.load(dht + (i_n * H + i_h).to(tl.int64) * K * V + tile, mask=m_kv, other=0.0).to(tl.float32)
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        c0 = bos + i_c * C
        t = c0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)
        m_tv = mask_t[:, None] & mask_v[None, :]
        m_tk = mask_t[:, None] & mask_k[None, :]
        b_q, b_k, rq, rk, b_b, G = _load_qkbg(q, k, g, beta, tok, mask_t, cols_k, mask_k, K, GATED, L2NORM, EPS)
        b_v = tl.load(v + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = scale * tl.load(do + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        S = tl.load(h + ((first_chunk + i_c) * H + i_h) * K * V + tile, mask=m_kv, other=0.0)
        D, eG, to_end, gamma = _decays(G, rows_c, C)
        m_tc = mask_t[:, None] & (rows_c[None, :] < C)
        Tmat = tl.load(Tbuf + tok[:, None] * C + rows_c[None, :], mask=m_tc, other=0.0)
        W = tl.load(Wbuf + tok[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0)
        vb = b_b[:, None] * b_v
        U = tl.load(Ubuf + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0) \
            - tl.dot(W, S, input_precision=PRECISION)
        P = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * D
        kd = b_k * to_end[:, None]
        dU = tl.dot(tl.trans(P), b_do, input_precision=PRECISION) + tl.dot(kd, dS, input_precision=PRECISION)
        dvb = tl.dot(tl.trans(Tmat), dU, input_precision=PRECISION)  # [C, BV]
        tl.store(dv + tok[:, None] * V + cols_v[None, :], (b_b[:, None] * dvb).to(dv.dtype.element_ty), mask=m_tv)
        # this V block's shares of the sums over V
        d_qe = tl.dot(b_do, tl.trans(S), input_precision=PRECISION)  # [C, BK]
        d_kd = tl.dot(U, tl.trans(dS), input_precision=PRECISION)
        d_w = -tl.dot(dU, tl.trans(S), input_precision=PRECISION)
        d_p = tl.dot(b_do, tl.trans(U), input_precision=PRECISION)  # [C, C]
        d_tu = tl.dot(dU, tl.trans(vb), input_precision=PRECISION)
        d_bv = tl.sum(dvb * b_v, 1)  # [C]
        last = tl.minimum(eos - c0, C) - 1
        d_gam = tl.where(rows_c == last, tl.sum(tl.sum(S * dS, 1), 0), 0.0)
        slot = (i_v * BT * H + tok).to(tl.int64)  # [C] rows of this V block's share (BT = B * T tokens)
        tl.store(p_qk + (slot * 3)[:, None] * K + cols_k[None, :], d_qe, mask=m_tk)
        tl.store(p_qk + (slot * 3 + 1)[:, None] * K + cols_k[None, :], d_kd, mask=m_tk)
        tl.store(p_qk + (slot * 3 + 2)[:, None] * K + cols_k[None, :], d_w, mask=m_tk)
        tl.store(p_c + (slot * 2)[:, None] * C + rows_c[None, :], d_p, mask=m_tc)
        tl.store(p_c + (slot * 2 + 1)[:, None] * C + rows_c[None, :], d_tu, mask=m_tc)
        tl.store(p_t + slot * 2, d_bv, mask=mask_t)
        tl.store(p_t + slot * 2 + 1, d_gam, mask=mask_t)
        dS = tl.dot(tl.trans(b_q * eG[:, None]), b_do, input_precision=PRECISION) + gamma * dS \
            - tl.dot(tl.trans(W), dU, input_precision=PRECISION)
    tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + tile, dS, mask=m_kv)


@triton.jit
def chunk_bwd_dqk_kernel(q, k, g, beta, Tbuf, s_qk, s_c, s_t, chunk_table, cu_seqlens, dq, dk, dg, dbeta, T,
                         H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, GATED: tl.constexpr,
                         VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr):
    """Backward pass 2, per (chunk, head), all chunks in parallel: from the V sums of pass 1, back through
    the UT transform, the decays and the L2 norm to dq, dk, dbeta and dg."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    cols_k = tl.arange(0, BK)
    mask_k = cols_k < K
    causal = rows_c[:, None] >= rows_c[None, :]
    strict = rows_c[:, None] > rows_c[None, :]
    if valid:
        t = t0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)
        m_tk = mask_t[:, None] & mask_k[None, :]
        m_tc = mask_t[:, None] & (rows_c[None, :] < C)
        b_q, b_k, rq, rk, b_b, G = _load_qkbg(q, k, g, beta, tok, mask_t, cols_k, mask_k, K, GATED, L2NORM, EPS)
        D, eG, to_end, gamma = _decays(G, rows_c, C)
        Tmat = tl.load(Tbuf + tok[:, None] * C + rows_c[None, :], mask=m_tc, other=0.0)
        kk = tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
        d_qe = tl.load(s_qk + (tok * 3)[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0)
        d_kd = tl.load(s_qk + (tok * 3 + 1)[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0)
        d_w = tl.load(s_qk + (tok * 3 + 2)[:, None] * K + cols_k[None, :], mask=m_tk, other=0.0)
        d_p = tl.load(s_c + (tok * 2)[:, None] * C + rows_c[None, :], mask=m_tc, other=0.0)
        d_tu = tl.load(s_c + (tok * 2 + 1)[:, None] * C + rows_c[None, :], mask=m_tc, other=0.0)
        d_bv = tl.load(s_t + tok * 2, mask=mask_t, other=0.0)
        d_gam = tl.sum(tl.load(s_t + tok * 2 + 1, mask=mask_t, other=0.0), 0)
        kbg = (b_b * eG)[:, None] * b_k
        # through W = T kbg and U' = T diag(b) V: dT, d(kbg); then dA = -T^T dT T^T (strictly lower)
        d_t = d_tu + tl.dot(d_w, tl.trans(kbg), input_precision=PRECISION)
        d_kbg = tl.dot(tl.trans(Tmat), d_w, input_precision=PRECISION)
        d_a = -tl.dot(tl.dot(tl.trans(Tmat), d_t, input_precision=PRECISION), tl.trans(Tmat),
                      input_precision=PRECISION)
        d_a = tl.where(strict, d_a, 0.0)
        # A = diag(b) (kk o D) strictly lower
        M = tl.where(strict, kk * D, 0.0)
        d_b = d_bv + tl.sum(d_a * M, 1) + eG * tl.sum(d_kbg * b_k, 1)
        d_m = b_b[:, None] * d_a
        d_kk = d_m * D
        d_k = tl.dot(d_kk + tl.trans(d_kk), b_k, input_precision=PRECISION) + (b_b * eG)[:, None] * d_kbg
        d_dec = d_m * kk  # dD (strict part, through A)
        # P = (Q K^T) o D
        qk = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        d_pd = tl.where(causal, d_p * D, 0.0)
        d_q = tl.dot(d_pd, b_k, input_precision=PRECISION) + d_qe * eG[:, None]
        d_k += tl.dot(tl.trans(d_pd), b_q, input_precision=PRECISION) + d_kd * to_end[:, None]
        d_dec += tl.where(causal, d_p * qk, 0.0)
        # the decays: D_ij = exp(G_i - G_j), e^G, exp(G_C - G), e^{G_C}
        E = tl.where(causal, d_dec * D, 0.0)
        d_G = tl.sum(E, 1) - tl.sum(E, 0) + eG * tl.sum(d_qe * b_q, 1) + b_b * eG * tl.sum(d_kbg * b_k, 1)
        e_kd = to_end * tl.sum(d_kd * b_k, 1)
        d_G = d_G - e_kd
        d_end = tl.sum(e_kd, 0) + gamma * d_gam
        d_G = d_G + tl.where(rows_c == C - 1, d_end, 0.0)
        # the L2 norm: x_hat = x r, dx = r (dx_hat - x_hat (x_hat . dx_hat))
        if L2NORM:
            d_q = rq[:, None] * (d_q - b_q * tl.sum(b_q * d_q, 1)[:, None])
            d_k = rk[:, None] * (d_k - b_k * tl.sum(b_k * d_k, 1)[:, None])
        tl.store(dq + tok[:, None] * K + cols_k[None, :], d_q.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + tok[:, None] * K + cols_k[None, :], d_k.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(dbeta + tok, d_b.to(dbeta.dtype.element_ty), mask=mask_t)
        if GATED:  # g -> G is a cumulative sum inside the chunk: dg_t = sum_{s >= t} dG_s
            d_g = tl.sum(d_G, 0) - tl.cumsum(d_G, 0) + d_G
            tl.store(dg + tok, d_g.to(dg.dtype.element_ty), mask=mask_t)


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


def _launch_options(q: Tensor, chunk_size: int, K: int, V: int) -> dict:
    """Tiles: all of K in one power-of-two tile (>= 16, tl.dot's minimum), V in blocks of BV, chunks of C.
    Wide keys take smaller chunks and V blocks so the fp32 [C, K] and [K, BV] dot operands fit in
    shared memory (first settings, not tuned)."""
    BK = max(16, triton.next_power_of_2(K))
    # Shared memory per program grows with C * BK and BK * BV, and software pipelining multiplies it:
    # at K = V = 128 the chunk-64 kernels asked an H200 for 245-303 KB (its limit is 227 KB). Chunks
    # of 32 (16 from K = 256) without pipelining stay under ~105 KB (compiled for sm_90 offline).
    cap = 64 if BK <= 64 else 32 if BK <= 128 else 16
    C = max(16, min(triton.next_power_of_2(chunk_size), cap))
    BV = max(16, min(16 if BK >= 512 else 32 if BK >= 128 else 64, triton.next_power_of_2(V)))
    return {"C": C, "BK": BK, "BV": BV, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "num_warps": 8 if BK >= 128 else 4, "num_stages": 1 if BK >= 128 else 2}


def _chunk_offsets(Bsz: int, T: int, C: int, cu_seqlens: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """Chunk bookkeeping from shapes and device tensors only (no host sync).

    Returns ``offsets`` [N], the slot of each sequence's first chunk, and ``table`` [slots, 2] int64,
    each slot's (sequence, first token), sequence -1 for the spare slots of the upper bound
    ``cdiv(T, C) + N`` that packed sequences allocate."""
    per_row = triton.cdiv(T, C)
    if cu_seqlens is None:
        slots = torch.arange(Bsz * per_row, device=device, dtype=torch.int64)
        offsets = torch.arange(Bsz, device=device, dtype=torch.int64) * per_row
        return offsets, torch.stack([slots // per_row, (slots % per_row) * C], dim=1)
    counts = (cu_seqlens.diff().long() + C - 1) // C
    ends = counts.cumsum(0)
    offsets = ends - counts
    slots = torch.arange(per_row + cu_seqlens.numel() - 1, device=device, dtype=torch.int64)
    seq = torch.searchsorted(ends, slots, right=True)
    valid = seq < counts.numel()
    seq_c = seq.clamp(max=counts.numel() - 1)
    t0 = cu_seqlens.long()[seq_c] + (slots - offsets[seq_c]) * C
    return offsets, torch.stack([torch.where(valid, seq_c, -1), torch.where(valid, t0, 0)], dim=1)


def _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size, save_states):
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    opts = _launch_options(q, chunk_size, K, V)
    C = opts["C"]
    offsets, table = _chunk_offsets(Bsz, T, C, cu_seqlens, q.device)
    cu = offsets if cu_seqlens is None else cu_seqlens
    flags = {"GATED": g is not None, "VARLEN": cu_seqlens is not None, "L2NORM": use_qk_l2norm, "EPS": L2NORM_EPS}
    f32 = {"device": q.device, "dtype": torch.float32}
    # the chunk-local work, every chunk in parallel
    Tbuf, Wbuf, Ubuf = (torch.empty(Bsz, T, H, n, **f32) for n in (C, K, V))
    chunk_ut_kernel[(table.shape[0], H)](k, v, beta if g is None else g, beta, table, cu, Tbuf, Wbuf, Ubuf, T, H,
                                         K, V, **flags, **opts)
    # the sequential pass over chunks
    o = torch.empty(Bsz, T, H, V, device=q.device, dtype=q.dtype)
    final = torch.empty(N, H, K, V, **f32)
    h = torch.empty(table.shape[0], H, K, V, **f32) if save_states else final
    h0 = None if initial_state is None else initial_state.contiguous().float()
    chunk_fwd_kernel[(N, H, triton.cdiv(V, opts["BV"]))](
        q, k, v, beta if g is None else g, beta, Wbuf, Ubuf, o, final if h0 is None else h0, final, h, offsets, cu,
        T, H, K, V, scale, HAS_H0=h0 is not None, STORE_H=save_states, **flags, **opts)
    return o, final, (h, offsets, table, Tbuf, Wbuf, Ubuf)


def _chunk_backward(q, k, v, g, beta, saved, cu_seqlens, do, dht, scale, use_qk_l2norm, chunk_size):
    h, offsets, table, Tbuf, Wbuf, Ubuf = saved
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    opts = _launch_options(q, chunk_size, K, V)
    C, NV = opts["C"], triton.cdiv(V, opts["BV"])
    rows = Bsz * T * H
    dv = torch.empty_like(v)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32)
    p_qk = torch.empty(NV, rows, 3, K, device=q.device, dtype=torch.float32)
    p_c = torch.empty(NV, rows, 2, C, device=q.device, dtype=torch.float32)
    p_t = torch.empty(NV, rows, 2, device=q.device, dtype=torch.float32)
    cu = offsets if cu_seqlens is None else cu_seqlens
    flags = {"GATED": g is not None, "VARLEN": cu_seqlens is not None, "L2NORM": use_qk_l2norm, "EPS": L2NORM_EPS}
    chunk_bwd_dv_kernel[(N, H, NV)](
        q, k, v, beta if g is None else g, beta, Tbuf, Wbuf, Ubuf, do, dht, h, offsets, cu, dv, dh0, p_qk, p_c, p_t,
        T, Bsz * T, H, K, V, scale, HAS_DHT=True, **flags, **opts)
    s_qk, s_c, s_t = p_qk.sum(0), p_c.sum(0), p_t.sum(0)  # the sums over V blocks
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g) if g is not None else dbeta
    opts.pop("BV")
    chunk_bwd_dqk_kernel[(table.shape[0], H)](
        q, k, beta if g is None else g, beta, Tbuf, s_qk, s_c, s_t, table, cu, dq, dk, dg, dbeta, T, H, K,
        **flags, **opts)
    return dq, dk, dv, (dg if g is not None else None), dbeta, dh0


class DeltaRuleTriton(torch.autograd.Function):
    """The chunked kernels: forward (saving each chunk's starting state when a gradient is needed) and
    the two backward passes."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
        q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
        g = None if g is None else g.contiguous()
        save = any(ctx.needs_input_grad[:6])
        o, final, saved = _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
                                         chunk_size, save)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, *(saved if save else ()))
        ctx.options = (scale, use_qk_l2norm, chunk_size)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        scale, use_qk_l2norm, chunk_size = ctx.options
        dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(q, k, v, g, beta, saved, cu_seqlens, do.contiguous(),
                                                     dfinal.contiguous().float(), scale, use_qk_l2norm, chunk_size)
        dh0 = None if initial_state is None else dh0.to(initial_state.dtype)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None


def gated_delta_rule_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                            scale: float | None, initial_state: Tensor | None, output_final_state: bool,
                            cu_seqlens: Tensor | None, use_qk_l2norm: bool, chunk_size: int
                            ) -> tuple[Tensor, Tensor | None]:
    """The chunked gated delta rule (``g`` None: ungated) on the Triton kernels; contract of ``gated_delta_rule``.

    Non-finite inputs follow the PyTorch path's rule (zeroed before the kernels, their outputs NaN after).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g, beta, bad_q, bad = zero_nonfinite(q, k, v, g, beta)
    o, final = DeltaRuleTriton.apply(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
                                     chunk_size)
    o, final = poison(o, final, bad_q, bad, cu_seqlens)
    return o, (final if output_final_state else None)


def delta_rule_step_triton(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                           scale: float | None, use_qk_l2norm: bool) -> Tensor:
    """One decode token on the fused step kernel; ``state`` [B, H, K, V] (contiguous fp32) updated in place."""
    Bsz, H, K, V = state.shape
    scale = K ** -0.5 if scale is None else float(scale)
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(32 if BK >= 128 else 64, triton.next_power_of_2(V)))
    o = torch.empty(Bsz, H, V, device=q.device, dtype=q.dtype)
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    gated = g is not None
    step_kernel[(Bsz, H, triton.cdiv(V, BV))](state, q, k, v, g.contiguous() if gated else beta, beta, o, H, K, V,
                                              scale, BK=BK, BV=BV, GATED=gated, L2NORM=use_qk_l2norm,
                                              EPS=L2NORM_EPS)
    return o
