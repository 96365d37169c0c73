"""Triton kernels of the (gated) delta rule: the chunked forward and backward, and the fused decode step.

Forward, three stages at chunk C = 64 (``chunk_size`` rounded to 16, 32 or 64), the shape of
fla's ``chunk_gated_delta_rule``:

1. ``chunk_wy_kernel``, per (chunk, head), every chunk in parallel: the chunk-local cumulative gate
   ``G`` and the keys' reciprocal norms (written for stages 2-3), ``A = diag(b) (K K^T o D)`` strictly
   lower with ``D_ij = exp(G_i - G_j)``, ``T = (I + A)^-1`` by blocked inversion (``_block_inverse``:
   the 16 x 16 diagonal blocks by forward substitution, all blocks at once, then a few [C, C]
   products), ``W = T diag(b e^G) K`` and ``U' = T diag(b) V``.
2. ``chunk_state_kernel``, per (sequence, head, V block), chunks in order: the state [K, BV] as up to
   four fp32 register tiles of key rows; it stores each chunk's starting state ``h_c`` and
   ``v_new = U' - W h_c``, then ``h <- e^{G_C} h + (diag(e^{G_C - G}) K)^T v_new``. Only this stage is
   sequential, and its per-chunk work is three matrix products per tile.
3. ``chunk_out_kernel``, per (chunk, head, V block), every chunk in parallel:
   ``o = scale (diag(e^G) Q h_c + ((Q K^T) o D) v_new)``.

For bf16 inputs W, U', h_c and v_new are bf16 and the products take bf16 operands (fp32 accumulate;
the state itself is carried in fp32); other dtypes keep them fp32 (fp32 inputs with IEEE products).

Packed sequences (``cu_seqlens``) need no host sync: the sequential kernels read their sequence's
bounds, and the chunk-parallel ones a (sequence, first token) table per chunk slot built on the
device for the shape-only upper bound ``cdiv(T, C) + N`` slots (spare slots do nothing). Grids come
from shapes only.

Backward: the forward saves only its inputs; the backward recomputes stages 1-2 at its own chunk
(``_backward_options``: 64, 32 from K > 64, 16 from K > 128, so the two kernels below fit in shared
memory) with fp32 T, W, U' and states, then runs two kernels:

- ``chunk_bwd_dv_kernel``, per (sequence, head, V block), walks the chunks in reverse carrying ``dS``
  [K, BV], reading the recomputed state, ``T``, ``W`` and ``U'``: it writes ``dv`` and finally
  ``dh0``, and its V block's share of every sum over V that the key side needs (``d(Q e^G)``,
  ``d(K e^{G_C-G})``, ``dW`` [C, K]; ``dP``, ``dT`` from ``U'`` [C, C]; the ``beta`` term of ``U'``
  and ``d(e^{G_C})``).
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
from seqblocks.ops.triton_dot import dot, dot_mode

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
def _slot(chunk_table, cu_seqlens, i_s, T, VARLEN: tl.constexpr):
    # chunk slot -> (valid, first token t0, eos, base) of its sequence; slots past the last chunk are invalid
    seq = tl.load(chunk_table + 2 * i_s).to(tl.int64)
    t0 = tl.load(chunk_table + 2 * i_s + 1).to(tl.int64)
    valid = seq >= 0
    bos, eos, base = _seq_bounds(cu_seqlens, tl.maximum(seq, 0), T, VARLEN)
    return valid, t0, tl.where(valid, eos, t0), base  # an invalid slot gets an empty token range


@triton.jit
def _block_inverse(A, C: tl.constexpr, MODE: tl.constexpr):
    # (I + A)^-1 for A [C, C] strictly lower, C a multiple of 16. The 16 x 16 diagonal blocks are
    # inverted together by forward substitution on a [C / 16, 16, 16] tile (14 steps, each one row of
    # every block; row 1 is -A_1 already); with Ad their part of A, Dinv = (I + Ad)^-1 and
    # L = Dinv (A - Ad) strictly block
    # lower (L^{C/16} = 0), I + A = (I + Ad)(I + L), so (I + A)^-1 = (I - L + L^2 - ...) Dinv: a few
    # [C, C] products in place of a C-step loop.
    NB: tl.constexpr = C // 16
    rows = tl.arange(0, C)
    eye = (rows[:, None] == rows[None, :]).to(tl.float32)
    blk = tl.arange(0, NB)
    same = blk[:, None, None, None] == blk[None, None, :, None]  # [NB, 1, NB, 1]: a diagonal block
    Nd = -tl.sum(tl.where(same, tl.reshape(A, (NB, 16, NB, 16)), 0.0), 2)  # [NB, 16, 16] of -A
    r16 = tl.arange(0, 16)[None, :, None]
    for i in range(2, 16):  # row i of every block: -A_i - sum_{j<i} A_ij N_j, rows j < i final
        row = tl.sum(tl.where(r16 == i, Nd, 0.0), 1)  # [NB, 16]
        row = row + tl.sum(row[:, :, None] * Nd, 1)
        Nd = tl.where(r16 == i, row[:, None, :], Nd)
    wide = tl.broadcast_to(Nd[:, :, None, :], (NB, 16, NB, 16))
    Dinv = tl.reshape(tl.where(same, wide, 0.0), (C, C)) + eye
    if NB == 1:
        Tm = Dinv
    else:
        off = (rows[:, None] // 16) > (rows[None, :] // 16)
        L = dot(Dinv, tl.where(off, A, 0.0), MODE)
        X = eye - L
        for _ in tl.static_range(NB - 2):
            X = eye - dot(L, X, MODE)
        Tm = dot(X, Dinv, MODE)
    return Tm


@triton.jit
def chunk_wy_kernel(k, v, g, beta, chunk_table, cu_seqlens, Gbuf, Rk, Tbuf, Wbuf, Ubuf, T, H: tl.constexpr,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    GATED: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr, STORE_T: tl.constexpr,
                    EPS: tl.constexpr, MODE: tl.constexpr):
    """Stage 1, per (chunk, head), every chunk in parallel: G = cumsum(g) in the chunk (to Gbuf), the
    keys' reciprocal norms (to Rk, with L2NORM), A = diag(b) (K K^T o D) strictly lower, T = (I + A)^-1
    blocked (to Tbuf with STORE_T), W = T diag(b e^G) K and U' = T diag(b) V in Wbuf's dtype."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    b_b = tl.load(beta + tok, mask=mask_t, other=0.0).to(tl.float32)
    if GATED:
        G = tl.cumsum(tl.load(g + tok, mask=mask_t, other=0.0).to(tl.float32), 0)
        tl.store(Gbuf + tok, G, mask=mask_t)
    else:
        G = tl.zeros([C], dtype=tl.float32)
    kk = tl.zeros([C, C], dtype=tl.float32)
    ssq = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):  # K K^T over key tiles
        cols = k0 + tl.arange(0, BK)
        b_k = tl.load(k + tok[:, None] * K + cols[None, :], mask=mask_t[:, None] & (cols < K)[None, :], other=0.0)
        kk += dot(b_k, tl.trans(b_k), MODE)
        if L2NORM:
            ssq += tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), 1)
    if L2NORM:
        rk = 1.0 / tl.sqrt(ssq + EPS)
        tl.store(Rk + tok, rk, mask=mask_t)
    else:
        rk = tl.full([C], 1.0, tl.float32)
    strict = rows_c[:, None] > rows_c[None, :]
    decay = tl.exp(tl.where(strict, G[:, None] - G[None, :], 0.0))
    A = tl.where(strict, (b_b * rk)[:, None] * kk * rk[None, :] * decay, 0.0)
    Tm = _block_inverse(A, C, MODE)
    if STORE_T:
        tl.store(Tbuf + tok[:, None] * C + rows_c[None, :], Tm, mask=mask_t[:, None] & (rows_c[None, :] < C))
    wdt = Wbuf.dtype.element_ty
    Tw = Tm.to(wdt)
    kscale = b_b * tl.exp(G) * rk
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        m = mask_t[:, None] & (cols < K)[None, :]
        b_k = tl.load(k + tok[:, None] * K + cols[None, :], mask=m, other=0.0).to(tl.float32)
        W = dot(Tw, (b_k * kscale[:, None]).to(wdt), MODE)
        tl.store(Wbuf + tok[:, None] * K + cols[None, :], W.to(wdt), mask=m)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        m = mask_t[:, None] & (cols < V)[None, :]
        b_v = tl.load(v + tok[:, None] * V + cols[None, :], mask=m, other=0.0).to(tl.float32)
        U = dot(Tw, (b_v * b_b[:, None]).to(wdt), MODE)
        tl.store(Ubuf + tok[:, None] * V + cols[None, :], U.to(Ubuf.dtype.element_ty), mask=m)


@triton.jit
def _state_tile(ptr, r0, rows, cols_v, mask_v, K: tl.constexpr, V: tl.constexpr):
    # one [BKS, BV] tile (key rows r0 + rows) of a [K, V] state, as fp32
    kr = r0 + rows
    m = (kr < K)[:, None] & mask_v[None, :]
    return tl.load(ptr + kr[:, None].to(tl.int64) * V + cols_v[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _put_state_tile(ptr, S, r0, rows, cols_v, mask_v, K: tl.constexpr, V: tl.constexpr):
    kr = r0 + rows
    m = (kr < K)[:, None] & mask_v[None, :]
    tl.store(ptr + kr[:, None].to(tl.int64) * V + cols_v[None, :], S.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _w_state(Wbuf, tok, mask_t, r0, rows, S, K: tl.constexpr, MODE: tl.constexpr):
    # W[:, r0 + rows] @ S for one state tile S [BKS, BV] (already in the operand dtype): [C, BV]
    kc = r0 + rows
    W = tl.load(Wbuf + tok[:, None] * K + kc[None, :], mask=mask_t[:, None] & (kc < K)[None, :], other=0.0)
    return dot(W.to(S.dtype), S, MODE)


@triton.jit
def _state_step(S, k, tok, mask_t, r0, rows, vs, gamma, K: tl.constexpr, MODE: tl.constexpr):
    # S <- gamma S + K[:, r0 + rows]^T vs: the keys read transposed, [BKS, C]
    kc = r0 + rows
    kT = tl.load(k + tok[None, :] * K + kc[:, None], mask=(kc < K)[:, None] & mask_t[None, :], other=0.0)
    return gamma * S + dot(kT.to(vs.dtype), vs, MODE)


@triton.jit
def chunk_state_kernel(k, Wbuf, Ubuf, Gbuf, Rk, h0, ht, h, vnew, chunk_offsets, cu_seqlens, T, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr, NK: tl.constexpr,
                       BV: tl.constexpr, GATED: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                       STORE_V: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr, MODE: tl.constexpr):
    """Stage 2, per (sequence, head, V block), chunks in order: the state [K, BV] as NK <= 4 fp32 register
    tiles of BKS key rows. Each chunk stores its starting state h_c (in h's dtype, which is also the
    operand dtype of the products), v_new = U' - W h_c (to vnew with STORE_V), then
    h <- e^{G_C} h + (diag(r e^{G_C - G}) K)^T v_new (r the keys' reciprocal norms, 1 without L2NORM)."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, base = _seq_bounds(cu_seqlens, i_n, T, VARLEN)
    rows_c = tl.arange(0, C)
    rows = tl.arange(0, BKS)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_v = cols_v < V
    sdt = h.dtype.element_ty
    head = (i_n * H + i_h).to(tl.int64) * K * V
    h1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NK > 1:
        h2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NK > 2:
        h3 = tl.zeros([BKS, BV], dtype=tl.float32)
    if NK > 3:
        h4 = tl.zeros([BKS, BV], dtype=tl.float32)
    if HAS_H0:
        h1 = _state_tile(h0 + head, 0, rows, cols_v, mask_v, K, V)
        if NK > 1:
            h2 = _state_tile(h0 + head, BKS, rows, cols_v, mask_v, K, V)
        if NK > 2:
            h3 = _state_tile(h0 + head, 2 * BKS, rows, cols_v, mask_v, K, V)
        if NK > 3:
            h4 = _state_tile(h0 + head, 3 * BKS, rows, cols_v, mask_v, K, V)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)

    for c0 in range(bos, eos, C):
        t = c0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)
        m_tv = mask_t[:, None] & mask_v[None, :]
        hc = h + ((first_chunk + (c0 - bos) // C) * H + i_h) * K * V
        # the chunk's starting state, stored and used in the operand dtype
        s1 = h1.to(sdt)
        _put_state_tile(hc, s1, 0, rows, cols_v, mask_v, K, V)
        acc = _w_state(Wbuf, tok, mask_t, 0, rows, s1, K, MODE)
        if NK > 1:
            s2 = h2.to(sdt)
            _put_state_tile(hc, s2, BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(Wbuf, tok, mask_t, BKS, rows, s2, K, MODE)
        if NK > 2:
            s3 = h3.to(sdt)
            _put_state_tile(hc, s3, 2 * BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(Wbuf, tok, mask_t, 2 * BKS, rows, s3, K, MODE)
        if NK > 3:
            s4 = h4.to(sdt)
            _put_state_tile(hc, s4, 3 * BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(Wbuf, tok, mask_t, 3 * BKS, rows, s4, K, MODE)
        v_new = tl.load(Ubuf + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32) - acc
        if STORE_V:
            tl.store(vnew + tok[:, None] * V + cols_v[None, :], v_new.to(vnew.dtype.element_ty), mask=m_tv)
        # padded rows have v_new = 0 (W, U' masked) and zero weight here
        if GATED:
            last = ((base + tl.minimum(c0 + C, eos) - 1) * H + i_h).to(tl.int64)
            G_end = tl.load(Gbuf + last)
            G = tl.load(Gbuf + tok, mask=mask_t, other=0.0)
            w = tl.where(mask_t, tl.exp(G_end - G), 0.0)
            gamma = tl.exp(G_end)
        else:
            w = tl.where(mask_t, 1.0, 0.0)
            gamma = 1.0
        if L2NORM:
            w = w * tl.load(Rk + tok, mask=mask_t, other=0.0)
        vs = (v_new * w[:, None]).to(sdt)
        h1 = _state_step(h1, k, tok, mask_t, 0, rows, vs, gamma, K, MODE)
        if NK > 1:
            h2 = _state_step(h2, k, tok, mask_t, BKS, rows, vs, gamma, K, MODE)
        if NK > 2:
            h3 = _state_step(h3, k, tok, mask_t, 2 * BKS, rows, vs, gamma, K, MODE)
        if NK > 3:
            h4 = _state_step(h4, k, tok, mask_t, 3 * BKS, rows, vs, gamma, K, MODE)

    if STORE_HT:
        _put_state_tile(ht + head, h1, 0, rows, cols_v, mask_v, K, V)
        if NK > 1:
            _put_state_tile(ht + head, h2, BKS, rows, cols_v, mask_v, K, V)
        if NK > 2:
            _put_state_tile(ht + head, h3, 2 * BKS, rows, cols_v, mask_v, K, V)
        if NK > 3:
            _put_state_tile(ht + head, h4, 3 * BKS, rows, cols_v, mask_v, K, V)


@triton.jit
def chunk_out_kernel(q, k, Gbuf, Rk, h, vnew, o, chunk_table, cu_seqlens, T, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, scale, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     GATED: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr, EPS: tl.constexpr,
                     MODE: tl.constexpr):
    """Stage 3, per (chunk, head, V block), every chunk in parallel: with h_c the chunk's starting state,
    o = scale diag(rq) (diag(e^G) Q h_c + ((Q K^T) o D diag(rk)) v_new), D_ij = exp(G_i - G_j) for
    j <= i (rq, rk the reciprocal norms, 1 without L2NORM; q's computed here over the key tiles)."""
    i_s, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_v = cols_v < V
    m_tv = mask_t[:, None] & mask_v[None, :]
    hc = h + (i_s * H + i_h).to(tl.int64) * K * V
    k_end = tl.where(valid, K, 0)  # a spare slot has no state to read
    sdt = h.dtype.element_ty
    acc_o = tl.zeros([C, BV], dtype=tl.float32)
    acc_s = tl.zeros([C, C], dtype=tl.float32)
    ssq = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        mask_k = cols < K
        b_q = tl.load(q + tok[:, None] * K + cols[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        b_kT = tl.load(k + tok[None, :] * K + cols[:, None], mask=mask_k[:, None] & mask_t[None, :], other=0.0)
        m_h = (cols < k_end)[:, None] & mask_v[None, :]
        b_h = tl.load(hc + cols[:, None].to(tl.int64) * V + cols_v[None, :], mask=m_h, other=0.0)
        acc_o += dot(b_q.to(sdt), b_h, MODE)
        acc_s += dot(b_q, b_kT, MODE)
        if L2NORM:
            ssq += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
    causal = rows_c[:, None] >= rows_c[None, :]
    if GATED:
        G = tl.load(Gbuf + tok, mask=mask_t, other=0.0)
        acc_o = acc_o * tl.exp(G)[:, None]
        acc_s = acc_s * tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0))
    if L2NORM:
        acc_s = acc_s * tl.load(Rk + tok, mask=mask_t, other=0.0)[None, :]
    P = tl.where(causal, acc_s, 0.0)
    b_vn = tl.load(vnew + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0)
    out = acc_o + dot(P.to(b_vn.dtype), b_vn, MODE)
    if L2NORM:
        out = out * (1.0 / tl.sqrt(ssq + EPS))[:, None]
    tl.store(o + tok[:, None] * V + cols_v[None, :], (scale * out).to(o.dtype.element_ty), mask=m_tv)


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


def _forward_options(q: Tensor, chunk_size: int, K: int, V: int, rows: int, H: int) -> dict:
    """Tiles of the three forward stages (first settings from sm_90 compiles, not timed on a GPU).

    Chunks of C = 64 (``chunk_size`` rounded to a power of two in [16, 64]); key tiles ``BK`` of 64
    columns and V blocks ``BV`` of 64 in the chunk-parallel stages. Stage 2 holds the state in at most
    four register tiles of ``BKS`` key rows (64 up to K = 256, wider beyond) and V blocks ``BVS``: 64 for
    K <= 128 when that still gives four programs per SM, else 32 (16 for the wider tiles), so the state
    takes at most 64 registers a thread at 4 warps. Stage 2 is a chain of short dependent steps: it
    pipelines its loads (``STAGES``, 2) only when every program fits on the GPU at once (one per SM);
    otherwise several resident programs per SM hide each other's latency better than the extra shared
    memory would. At K = V = 128 in bf16 (B 8, H 16) the three kernels take 154 / 118 / 147 registers and
    32 / 12 / 41 KB of shared memory (sm_90, Triton 3.9; no spills), far under the H200's 227 KB."""
    C = max(16, min(64, triton.next_power_of_2(chunk_size)))
    BK = max(16, min(64, triton.next_power_of_2(K)))  # >= 16: tl.dot's minimum
    BKS = BK if K <= 4 * BK else triton.next_power_of_2(triton.cdiv(K, 4))
    NK = triton.cdiv(K, BKS)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    if BKS > 64:
        BVS = 16
    elif K <= 128 and rows * H * triton.cdiv(V, 64) >= 4 * sms:
        BVS = 64
    else:
        BVS = 32
    BVS = max(16, min(BVS, triton.next_power_of_2(V)))
    stages = 2 if rows * H * triton.cdiv(V, BVS) <= sms else 1
    BV = max(16, min(64, triton.next_power_of_2(V)))
    return {"C": C, "BK": BK, "BKS": BKS, "NK": NK, "BVS": BVS, "STAGES": stages, "BV": BV, "MODE": dot_mode(q)}


def _backward_options(q: Tensor, chunk_size: int, K: int, V: int) -> dict:
    """Tiles of the backward kernels: all of K in one power-of-two tile (>= 16, tl.dot's minimum), V in
    blocks of BV, chunks of C. Wide keys take smaller chunks and V blocks so the fp32 [C, K] and [K, BV]
    dot operands fit in shared memory (first settings, not tuned)."""
    BK = max(16, triton.next_power_of_2(K))
    # Shared memory per program grows with C * BK and BK * BV, and software pipelining multiplies it:
    # at K = V = 128 chunk-64 kernels asked an H200 for 245-303 KB (its limit is 227 KB). Chunks
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


def _operand_dtype(q: Tensor) -> torch.dtype:
    """The dtype of W, U', the chunk states and v_new: bf16 for bf16 inputs (fp32's exponent range, so
    the states fit), else fp32 (fp16 keeps fp32 buffers: a state may outgrow fp16's range)."""
    return torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32


def _wy_stage(k, v, g, beta, cu_seqlens, table, use_qk_l2norm, C, BK, BV, MODE, out_dtype, store_t):
    """Stage 1: (G, rk, T or None, W, U'); G and rk are None when ungated / without the L2 norm."""
    Bsz, T, H, K = k.shape
    V = v.shape[-1]
    f32 = {"device": k.device, "dtype": torch.float32}
    G = torch.empty(Bsz, T, H, **f32) if g is not None else None
    rk = torch.empty(Bsz, T, H, **f32) if use_qk_l2norm else None
    Tbuf = torch.empty(Bsz, T, H, C, **f32) if store_t else None
    W = torch.empty(Bsz, T, H, K, device=k.device, dtype=out_dtype)
    U = torch.empty(Bsz, T, H, V, device=k.device, dtype=out_dtype)
    cu = table if cu_seqlens is None else cu_seqlens  # an unused pointer when dense
    chunk_wy_kernel[(table.shape[0], H)](
        k, v, beta if g is None else g, beta, table, cu, W if G is None else G, W if rk is None else rk,
        W if Tbuf is None else Tbuf, W, U, T, H, K, V, C=C, BK=BK, BV=BV, GATED=g is not None,
        VARLEN=cu_seqlens is not None, L2NORM=use_qk_l2norm, STORE_T=store_t, EPS=L2NORM_EPS, MODE=MODE,
        num_warps=4, num_stages=2)
    return G, rk, Tbuf, W, U


def _state_stage(k, W, U, G, rk, initial_state, cu_seqlens, offsets, slots, N, C, BKS, NK, BV, STAGES, MODE,
                 state_dtype, store_final, store_v):
    """Stage 2: (h [slots, H, K, V] in ``state_dtype``, v_new or None, final state fp32 or None)."""
    Bsz, T, H, K = k.shape
    V = U.shape[-1]
    h = torch.empty(slots, H, K, V, device=k.device, dtype=state_dtype)
    vnew = torch.empty(Bsz, T, H, V, device=k.device, dtype=state_dtype) if store_v else None
    final = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32) if store_final else None
    h0 = None if initial_state is None else initial_state.contiguous().float()
    chunk_state_kernel[(N, H, triton.cdiv(V, BV))](
        k, W, U, W if G is None else G, W if rk is None else rk, h if h0 is None else h0, h if final is None else final,
        h, h if vnew is None else vnew, offsets, offsets if cu_seqlens is None else cu_seqlens, T, H, K, V, C=C,
        BKS=BKS, NK=NK, BV=BV, GATED=G is not None, HAS_H0=h0 is not None, STORE_HT=store_final, STORE_V=store_v,
        VARLEN=cu_seqlens is not None, L2NORM=rk is not None, MODE=MODE, num_warps=4, num_stages=STAGES)
    return h, vnew, final


def _out_stage(q, k, G, rk, h, vnew, cu_seqlens, table, scale, use_qk_l2norm, C, BK, BV, MODE):
    """Stage 3: o [B, T, H, V] in q's dtype."""
    Bsz, T, H, K = q.shape
    V = vnew.shape[-1]
    o = torch.empty(Bsz, T, H, V, device=q.device, dtype=q.dtype)
    chunk_out_kernel[(table.shape[0], H, triton.cdiv(V, BV))](
        q, k, h if G is None else G, h if rk is None else rk, h, vnew, o, table,
        table if cu_seqlens is None else cu_seqlens, T, H, K, V, scale, C=C, BK=BK, BV=BV, GATED=G is not None,
        VARLEN=cu_seqlens is not None, L2NORM=use_qk_l2norm, EPS=L2NORM_EPS, MODE=MODE, num_warps=4, num_stages=2)
    return o


def _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
    """The three forward stages: (o, final state fp32)."""
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    opts = _forward_options(q, chunk_size, K, V, N, H)
    C, MODE = opts["C"], opts["MODE"]
    offsets, table = _chunk_offsets(Bsz, T, C, cu_seqlens, q.device)
    odt = _operand_dtype(q)
    G, rk, _, W, U = _wy_stage(k, v, g, beta, cu_seqlens, table, use_qk_l2norm, C, opts["BK"], opts["BV"], MODE,
                               odt, False)
    h, vnew, final = _state_stage(k, W, U, G, rk, initial_state, cu_seqlens, offsets, table.shape[0], N, C,
                                  opts["BKS"], opts["NK"], opts["BVS"], opts["STAGES"], MODE, odt, True, True)
    del W, U
    o = _out_stage(q, k, G, rk, h, vnew, cu_seqlens, table, scale, use_qk_l2norm, C, opts["BK"], opts["BV"], MODE)
    return o, final


def _chunk_backward(q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm, chunk_size):
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    opts = _backward_options(q, chunk_size, K, V)
    C, NV = opts["C"], triton.cdiv(V, opts["BV"])
    # stages 1-2 again at the backward's chunk, in fp32: T, W, U' and every chunk's starting state
    fwd = _forward_options(q, C, K, V, N, H)
    offsets, table = _chunk_offsets(Bsz, T, C, cu_seqlens, q.device)
    G, rk, Tbuf, Wbuf, Ubuf = _wy_stage(k, v, g, beta, cu_seqlens, table, use_qk_l2norm, C, fwd["BK"], fwd["BV"],
                                        fwd["MODE"], torch.float32, True)
    h, _, _ = _state_stage(k, Wbuf, Ubuf, G, rk, initial_state, cu_seqlens, offsets, table.shape[0], N, C,
                           fwd["BKS"], fwd["NK"], fwd["BVS"], fwd["STAGES"], fwd["MODE"], torch.float32, False, False)
    del G, rk
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
    del h, Wbuf, Ubuf
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
    """The chunked kernels: the three-stage forward (saving only the inputs) and the backward, which
    recomputes the chunk states at its own chunk size."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
        q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
        g = None if g is None else g.contiguous()
        o, final = _chunk_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.options = (scale, use_qk_l2norm, chunk_size)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        scale, use_qk_l2norm, chunk_size = ctx.options
        dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(q, k, v, g, beta, initial_state, cu_seqlens, do.contiguous(),
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
