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

Backward: the forward saves only its inputs. The backward recomputes stages 1-2 at the forward's chunk
and precision (T, W, U', every chunk's starting state h_c and v_new; T kept this time), then four
kernels, with dS the cotangent of the state a chunk ends in (a chunk's ``dh``):

1. ``chunk_bwd_dv_local_kernel``, per (chunk, head), every chunk in parallel: the output stage's part of
   dv_new, ``P^T do`` with ``P = scale ((Q K^T) o D)`` causal, and the queries' reciprocal norms.
2. ``chunk_bwd_dh_kernel``, per (sequence, head, V block), chunks in reverse, stage 2's layout (dS as up to
   four fp32 register tiles): stores dS per chunk, completes ``dv_new += diag(e^{G_C - G}) K dS`` in
   place, ``dS <- e^{G_C} dS + Q^T diag(scale e^G) do - W^T dv_new``; dS ends as the initial state's
   cotangent. The only sequential kernel, two dependent products per chunk as in stage 2.
3. ``chunk_bwd_dqk_kernel``, per (chunk, head, key block), in parallel: over V tiles ``do v_new^T``,
   ``do h_c^T``, ``v_new dS^T``, ``dv_new h_c^T``; then dq (finished, but for the L2 norm over several key
   blocks: backward 4), dk outside the UT transform, dW and the row sums the gate and the L2 norm need.
4. ``chunk_bwd_wy_kernel``, per (chunk, head), in parallel: the UT transform's backward (``dT`` from dW
   and dU' = dv_new, ``dA = -T^T dT T^T``, through ``A`` and W's factor), dv, dk through the L2 norm,
   dbeta and dg (a reverse cumulative sum inside the chunk).

``step_kernel`` is one decode token: per (row, head, V block), ``S <- e^g S``, ``u = b (v - S^T k)``,
``S += k u^T``, ``o = scale S^T q``, with the state updated in place.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk, N sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from seqblocks.ops.delta_rule._checks import L2NORM_EPS, first_bad, nan_to_zero, nonfinite_flags, poison
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
def _load_G(Gbuf, tok, mask_t):
    """The chunk's cumulative log decay G, its padded rows (t >= the sequence end, a suffix of the chunk)
    continuing the last valid row's value, as if g = 0 there (stage 1's cumsum gives them that too). With
    0 there instead, G_i - G_j of a padded row i and a valid j is -G_j > 0, whose exp overflows under
    strong decay (G below -88 within a chunk) and turns the padded rows' zeros into NaN, which the
    backward's sums over rows then carry into valid gradients."""
    G = tl.load(Gbuf + tok, mask=mask_t, other=0.0)
    n_valid = tl.sum(mask_t.to(tl.int32), 0)
    G_last = tl.sum(tl.where(tl.arange(0, G.shape[0]) == n_valid - 1, G, 0.0), 0)
    return tl.where(mask_t, G, G_last)


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
        tl.store(Tbuf + tok[:, None] * C + rows_c[None, :], Tm.to(Tbuf.dtype.element_ty),
                 mask=mask_t[:, None] & (rows_c[None, :] < C))
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
            G = _load_G(Gbuf, tok, mask_t)
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
        G = _load_G(Gbuf, tok, mask_t)
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
def chunk_bwd_dv_local_kernel(q, k, Gbuf, Rk, do, dvl, Rq, chunk_table, cu_seqlens, T, H: tl.constexpr,
                              K: tl.constexpr, V: tl.constexpr, scale, C: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr,
                              EPS: tl.constexpr, MODE: tl.constexpr):
    """Backward 1, per (chunk, head), every chunk in parallel: the output stage's part of dv_new,
    ``P^T do`` with ``P = scale diag(rq) ((Q K^T) o D) diag(rk)`` causal (to dvl in its dtype), and the
    queries' reciprocal norms (to Rq, with L2NORM) for the later kernels."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    pt = tl.zeros([C, C], dtype=tl.float32)  # K Q^T: row j key, column i query
    ssq = tl.zeros([C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        m = mask_t[:, None] & (cols < K)[None, :]
        b_q = tl.load(q + tok[:, None] * K + cols[None, :], mask=m, other=0.0)
        b_k = tl.load(k + tok[:, None] * K + cols[None, :], mask=m, other=0.0)
        pt += dot(b_k, tl.trans(b_q), MODE)
        if L2NORM:
            ssq += tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1)
    later = rows_c[None, :] >= rows_c[:, None]  # query i at or after key j
    w_q = tl.full([C], 1.0, tl.float32) * scale
    if L2NORM:
        rq = 1.0 / tl.sqrt(ssq + EPS)
        tl.store(Rq + tok, rq, mask=mask_t)
        w_q = w_q * rq
        pt = pt * tl.load(Rk + tok, mask=mask_t, other=0.0)[:, None]
    pt = pt * w_q[None, :]
    if GATED:
        G = _load_G(Gbuf, tok, mask_t)
        pt = pt * tl.exp(tl.where(later, G[None, :] - G[:, None], 0.0))
    odt = dvl.dtype.element_ty
    Pt = tl.where(later, pt, 0.0).to(odt)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        m = mask_t[:, None] & (cols < V)[None, :]
        b_do = tl.load(do + tok[:, None] * V + cols[None, :], mask=m, other=0.0)
        tl.store(dvl + tok[:, None] * V + cols[None, :], dot(Pt, b_do.to(odt), MODE).to(odt), mask=m)


@triton.jit
def chunk_bwd_dh_kernel(q, k, Wbuf, Gbuf, Rq, Rk, do, dht, dh0, dh, dv, chunk_offsets, cu_seqlens, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, scale, C: tl.constexpr,
                        BKS: tl.constexpr, NK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                        STORE_DH0: tl.constexpr, VARLEN: tl.constexpr, L2NORM: tl.constexpr, MODE: tl.constexpr):
    """Backward 2, per (sequence, head, V block), chunks in reverse: the state cotangent dS [K, BV] as
    NK <= 4 fp32 register tiles (stage 2's layout), starting from the final state's cotangent. Each
    chunk stores dS (the cotangent of the state the chunk ends in, in dh's dtype, also the products'
    operand dtype), completes dv_new = dvl + diag(r e^{G_C - G}) K dS in place in dv, then
    dS <- e^{G_C} dS + Q^T diag(scale rq e^G) do - W^T dv_new. Finally dS is the initial state's
    cotangent (to dh0 with STORE_DH0)."""
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, base = _seq_bounds(cu_seqlens, i_n, T, VARLEN)
    rows_c = tl.arange(0, C)
    rows = tl.arange(0, BKS)
    cols_v = i_v * BV + tl.arange(0, BV)
    mask_v = cols_v < V
    sdt = dh.dtype.element_ty
    head = (i_n * H + i_h).to(tl.int64) * K * V
    d1 = _state_tile(dht + head, 0, rows, cols_v, mask_v, K, V)
    if NK > 1:
        d2 = _state_tile(dht + head, BKS, rows, cols_v, mask_v, K, V)
    if NK > 2:
        d3 = _state_tile(dht + head, 2 * BKS, rows, cols_v, mask_v, K, V)
    if NK > 3:
        d4 = _state_tile(dht + head, 3 * BKS, rows, cols_v, mask_v, K, V)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    n_chunks = (eos - bos + C - 1) // C
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        c0 = bos + i_c * C
        t = c0 + rows_c
        mask_t = t < eos
        tok = ((base + t) * H + i_h).to(tl.int64)
        m_tv = mask_t[:, None] & mask_v[None, :]
        dhc = dh + ((first_chunk + i_c) * H + i_h) * K * V
        s1 = d1.to(sdt)
        _put_state_tile(dhc, s1, 0, rows, cols_v, mask_v, K, V)
        acc = _w_state(k, tok, mask_t, 0, rows, s1, K, MODE)
        if NK > 1:
            s2 = d2.to(sdt)
            _put_state_tile(dhc, s2, BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(k, tok, mask_t, BKS, rows, s2, K, MODE)
        if NK > 2:
            s3 = d3.to(sdt)
            _put_state_tile(dhc, s3, 2 * BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(k, tok, mask_t, 2 * BKS, rows, s3, K, MODE)
        if NK > 3:
            s4 = d4.to(sdt)
            _put_state_tile(dhc, s4, 3 * BKS, rows, cols_v, mask_v, K, V)
            acc += _w_state(k, tok, mask_t, 3 * BKS, rows, s4, K, MODE)
        if GATED:
            last = ((base + tl.minimum(c0 + C, eos) - 1) * H + i_h).to(tl.int64)
            G_end = tl.load(Gbuf + last)
            G = _load_G(Gbuf, tok, mask_t)
            w_k = tl.where(mask_t, tl.exp(G_end - G), 0.0)
            w_q = tl.where(mask_t, tl.exp(G), 0.0) * scale
            gamma = tl.exp(G_end)
        else:
            w_k = tl.where(mask_t, 1.0, 0.0)
            w_q = w_k * scale
            gamma = 1.0
        if L2NORM:
            w_k = w_k * tl.load(Rk + tok, mask=mask_t, other=0.0)
            w_q = w_q * tl.load(Rq + tok, mask=mask_t, other=0.0)
        p_dv = dv + tok[:, None] * V + cols_v[None, :]
        b_dv = tl.load(p_dv, mask=m_tv, other=0.0).to(tl.float32) + acc * w_k[:, None]
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        dvs = (-b_dv).to(sdt)
        dos = (tl.load(do + tok[:, None] * V + cols_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
               * w_q[:, None]).to(sdt)
        # dS <- gamma dS + Q^T dos, then + W^T (-dv_new): stage 2's update twice
        d1 = _state_step(_state_step(d1, q, tok, mask_t, 0, rows, dos, gamma, K, MODE), Wbuf, tok, mask_t, 0, rows,
                         dvs, 1.0, K, MODE)
        if NK > 1:
            d2 = _state_step(_state_step(d2, q, tok, mask_t, BKS, rows, dos, gamma, K, MODE), Wbuf, tok, mask_t,
                             BKS, rows, dvs, 1.0, K, MODE)
        if NK > 2:
            d3 = _state_step(_state_step(d3, q, tok, mask_t, 2 * BKS, rows, dos, gamma, K, MODE), Wbuf, tok,
                             mask_t, 2 * BKS, rows, dvs, 1.0, K, MODE)
        if NK > 3:
            d4 = _state_step(_state_step(d4, q, tok, mask_t, 3 * BKS, rows, dos, gamma, K, MODE), Wbuf, tok,
                             mask_t, 3 * BKS, rows, dvs, 1.0, K, MODE)
    if STORE_DH0:
        _put_state_tile(dh0 + head, d1, 0, rows, cols_v, mask_v, K, V)
        if NK > 1:
            _put_state_tile(dh0 + head, d2, BKS, rows, cols_v, mask_v, K, V)
        if NK > 2:
            _put_state_tile(dh0 + head, d3, 2 * BKS, rows, cols_v, mask_v, K, V)
        if NK > 3:
            _put_state_tile(dh0 + head, d4, 3 * BKS, rows, cols_v, mask_v, K, V)


@triton.jit
def chunk_bwd_dqk_kernel(q, k, vnew, h, dh, dv, do, Gbuf, Rq, Rk, dq, dk, dw, rs, chunk_table, cu_seqlens, T, BTH,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, scale, C: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr,
                         L2NORM: tl.constexpr, FINISH_DQ: tl.constexpr, MODE: tl.constexpr):
    """Backward 3, per (chunk, head, key block of BK columns), every chunk in parallel. Over V tiles:
    dP = do v_new^T, do h_c^T, v_new dS^T and dv_new h_c^T, with dS the cotangent of the state the
    chunk ends in. Then the cotangents of the normalised q and k outside the UT transform:
    dq^ = diag(scale e^G) do h_c^T + (scale dP o D) K^, dk^ = diag(e^{G_C - G}) v_new dS^T + (scale dP o D)^T Q^
    (dk^ to dk, the UT transform's part comes in backward 4), dW = -dv_new h_c^T (to dw). dq goes to dq
    finished (through the L2 norm when FINISH_DQ, or without L2NORM), else dq^ to dq (fp32 scratch).
    Per row into rs[key block]: (q^ . dq^, k^ . dk^, the terms of dG_C), the gate's and the L2 norm's
    row sums, summed over key blocks in backward 4."""
    i_s, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    cols_k = i_k * BK + tl.arange(0, BK)
    mask_k = cols_k < K
    m_tk = mask_t[:, None] & mask_k[None, :]
    m_hk = cols_k < tl.where(valid, K, 0)  # a spare slot has no states to read
    off = (i_s * H + i_h).to(tl.int64) * K * V
    sdt = h.dtype.element_ty
    dP = tl.zeros([C, C], dtype=tl.float32)
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    b_dw = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        mask_v = cols_v < V
        m_tv = mask_t[:, None] & mask_v[None, :]
        p_tv = tok[:, None] * V + cols_v[None, :]
        b_vn = tl.load(vnew + p_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0).to(sdt)
        b_dv = tl.load(dv + p_tv, mask=m_tv, other=0.0)
        p_kv = off + cols_k[:, None].to(tl.int64) * V + cols_v[None, :]
        m_kv = m_hk[:, None] & mask_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0)
        dP += dot(b_do, tl.trans(b_vn), MODE)
        b_dq += dot(b_do, tl.trans(b_h), MODE)
        b_dk += dot(b_vn, tl.trans(b_dh), MODE)
        b_dw += dot(b_dv, tl.trans(b_h), MODE)
        if GATED:
            hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    p_tk = tok[:, None] * K + cols_k[None, :]
    tl.store(dw + p_tk, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    # the epilogue keeps few [C, BK] tiles live: k^ (operand dtype), then q^
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    if L2NORM:
        b_k = b_k * tl.load(Rk + tok, mask=mask_t, other=0.0)[:, None]
    b_k = b_k.to(sdt)
    causal = rows_c[:, None] >= rows_c[None, :]
    if GATED:
        last = tl.minimum(eos - t0, C) - 1
        G = _load_G(Gbuf, tok, mask_t)
        G_end = tl.sum(tl.where(rows_c == last, G, 0.0), 0)
        b_dq = b_dq * (scale * tl.exp(G))[:, None]
        b_dk = b_dk * tl.where(mask_t, tl.exp(G_end - G), 0.0)[:, None]
        dP = dP * tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0))
    else:
        b_dq = b_dq * scale
    dPs = tl.where(causal, dP * scale, 0.0).to(sdt)
    b_dq += dot(dPs, b_k, MODE)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    if L2NORM:
        rq = tl.load(Rq + tok, mask=mask_t, other=0.0)
        b_q = b_q * rq[:, None]
    sq = tl.sum(b_dq * b_q, 1)
    if L2NORM and FINISH_DQ:
        b_dq = rq[:, None] * (b_dq - b_q * sq[:, None])
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    if GATED:  # dG_C gets e^{G_C} (h_c . dS) and the state write's k^ . dk^ (each row's -dG of it)
        r = tl.sum(b_dk * b_k.to(tl.float32), 1) + tl.where(rows_c == last, tl.exp(G_end) * tl.sum(hdh, 0), 0.0)
    else:
        r = tl.zeros([C], dtype=tl.float32)
    b_dk += dot(tl.trans(dPs), b_q.to(sdt), MODE)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    p_r = rs + ((i_k * BTH + tok) * 3).to(tl.int64)
    tl.store(p_r, sq, mask=mask_t)
    tl.store(p_r + 1, tl.sum(b_dk * b_k.to(tl.float32), 1), mask=mask_t)
    tl.store(p_r + 2, r, mask=mask_t)


@triton.jit
def chunk_bwd_wy_kernel(q, k, v, beta, Gbuf, Rq, Rk, Tbuf, dv, dw, dk3, rs, dqs, dq, dk, dvo, dbeta, dg, chunk_table,
                        cu_seqlens, T, BTH, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr, GATED: tl.constexpr,
                        VARLEN: tl.constexpr, L2NORM: tl.constexpr, DQ_LEFT: tl.constexpr, MODE: tl.constexpr):
    """Backward 4, per (chunk, head), every chunk in parallel: the UT transform's backward and the ends.
    From dU' = dv_new and dW: dT = dU' (diag(b) V)^T + dW (diag(b e^G) K^)^T, dv = diag(b) T^T dU' (to dvo),
    dA = -T^T dT T^T (strictly lower), then through A = diag(b) (K^ K^T o D) and W's factor to
    dk = dk^ (backward 3's) + diag(b e^G) T^T dW + (M + M^T) K^ with M = diag(b) dA o D, through the L2
    norm (to dk); dbeta; dG from every part (backward 3's row sums included) and dg its reverse
    cumulative sum in the chunk. With DQ_LEFT, dq^ (dqs) through the L2 norm to dq."""
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    valid, t0, eos, base = _slot(chunk_table, cu_seqlens, i_s, T, VARLEN)
    rows_c = tl.arange(0, C)
    t = t0 + rows_c
    mask_t = t < eos
    tok = ((base + t) * H + i_h).to(tl.int64)
    odt = Tbuf.dtype.element_ty
    b_b = tl.load(beta + tok, mask=mask_t, other=0.0).to(tl.float32)
    strict = rows_c[:, None] > rows_c[None, :]
    if GATED:
        G = _load_G(Gbuf, tok, mask_t)
        eG = tl.exp(G)
    else:
        G = tl.zeros([C], dtype=tl.float32)
        eG = tl.full([C], 1.0, tl.float32)
    if L2NORM:
        rk = tl.load(Rk + tok, mask=mask_t, other=0.0)
    else:
        rk = tl.full([C], 1.0, tl.float32)
    Tt = tl.load(Tbuf + tok[None, :] * C + rows_c[:, None], mask=mask_t[None, :], other=0.0)  # T^T
    dT = tl.zeros([C, C], dtype=tl.float32)
    d_b = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, V, BV):  # U' = T diag(b) V
        cols = v0 + tl.arange(0, BV)
        m = mask_t[:, None] & (cols < V)[None, :]
        b_du = tl.load(dv + tok[:, None] * V + cols[None, :], mask=m, other=0.0).to(odt)
        b_v = tl.load(v + tok[:, None] * V + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dT += dot(b_du, tl.trans((b_v * b_b[:, None]).to(odt)), MODE)
        dvb = dot(Tt, b_du, MODE)
        tl.store(dvo + tok[:, None] * V + cols[None, :], (dvb * b_b[:, None]).to(dvo.dtype.element_ty), mask=m)
        d_b += tl.sum(dvb * b_v, 1)
    kk = tl.zeros([C, C], dtype=tl.float32)
    wb = b_b * eG * rk  # W = T diag(wb) K (raw keys)
    t_w = tl.zeros([C], dtype=tl.float32)  # rows of (T^T dW) . K (raw keys)
    for k0 in range(0, K, BK):  # W = T diag(b e^G) K^
        cols = k0 + tl.arange(0, BK)
        m = mask_t[:, None] & (cols < K)[None, :]
        b_k = tl.load(k + tok[:, None] * K + cols[None, :], mask=m, other=0.0)
        b_dw = tl.load(dw + tok[:, None] * K + cols[None, :], mask=m, other=0.0).to(odt)
        kk += dot(b_k, tl.trans(b_k), MODE)
        dT += dot(b_dw, tl.trans((b_k.to(tl.float32) * wb[:, None]).to(odt)), MODE)
        d_kw = dot(Tt, b_dw, MODE)  # d(diag(b e^G) K^) = T^T dW
        t_w += tl.sum(d_kw * b_k.to(tl.float32), 1)
        # dk^ += diag(b e^G) T^T dW, in place (the second key pass adds the rest)
        p = tok[:, None] * K + cols[None, :]
        d_k = tl.load(dk3 + p, mask=m, other=0.0).to(tl.float32) + d_kw * (b_b * eG)[:, None]
        tl.store(dk3 + p, d_k.to(dk3.dtype.element_ty), mask=m)
    t_w = t_w * rk * eG  # e^G (T^T dW) . k^
    d_b += t_w
    d_kw = b_b * t_w  # (diag(b e^G) T^T dW) . k^: W's part of dG and of k^ . dk^
    dT = tl.where(strict, dT, 0.0).to(odt)
    dA = -dot(dot(Tt, dT, MODE).to(odt), Tt, MODE)
    kk = kk * rk[:, None] * rk[None, :]
    dAD = tl.where(strict, dA * tl.exp(tl.where(strict, G[:, None] - G[None, :], 0.0)), 0.0)
    d_b += tl.sum(dAD * kk, 1)
    M = dAD * b_b[:, None]  # the cotangent of K^ K^T
    AdA = M * kk  # dA o A
    s_a = tl.sum(AdA, 1)
    s_at = tl.sum(AdA, 0)
    # backward 3's row sums, over its key blocks
    sq = tl.zeros([C], dtype=tl.float32)
    sk = tl.zeros([C], dtype=tl.float32)
    r = tl.zeros([C], dtype=tl.float32)
    for i_k in tl.static_range(NKB):
        p_r = rs + ((i_k * BTH + tok) * 3).to(tl.int64)
        sq += tl.load(p_r, mask=mask_t, other=0.0)
        sk += tl.load(p_r + 1, mask=mask_t, other=0.0)
        r += tl.load(p_r + 2, mask=mask_t, other=0.0)
    s_k = sk + d_kw + s_a + s_at  # k^ . dk^ for the L2 norm
    Mo = M.to(odt)
    tl.debug_barrier()  # the first key pass's dk stores before the second pass reads them
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        m = mask_t[:, None] & (cols < K)[None, :]
        p = tok[:, None] * K + cols[None, :]
        b_k = tl.load(k + p, mask=m, other=0.0).to(tl.float32) * rk[:, None]
        kn = b_k.to(odt)
        d_k = tl.load(dk3 + p, mask=m, other=0.0).to(tl.float32) + dot(Mo, kn, MODE) + dot(tl.trans(Mo), kn, MODE)
        if L2NORM:
            d_k = rk[:, None] * (d_k - b_k * s_k[:, None])
        tl.store(dk + p, d_k.to(dk.dtype.element_ty), mask=m)
    if DQ_LEFT:
        rq = tl.load(Rq + tok, mask=mask_t, other=0.0)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            m = mask_t[:, None] & (cols < K)[None, :]
            p = tok[:, None] * K + cols[None, :]
            b_q = tl.load(q + p, mask=m, other=0.0).to(tl.float32) * rq[:, None]
            d_q = tl.load(dqs + p, mask=m, other=0.0)
            tl.store(dq + p, (rq[:, None] * (d_q - b_q * sq[:, None])).to(dq.dtype.element_ty), mask=m)
    tl.store(dbeta + tok, d_b.to(dbeta.dtype.element_ty), mask=mask_t)
    if GATED:  # g -> G is a cumulative sum inside the chunk: dg_t = sum_{s >= t} dG_s
        d_G = sq - sk + d_kw + s_a - s_at + tl.where(rows_c == C - 1, tl.sum(r, 0), 0.0)
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
    tl.debug_barrier()  # every thread holding a copy of a state element has read it before it is overwritten
    tl.store(p_s, S.to(state.dtype.element_ty), mask=m_s)
    b_o = scale * tl.sum(S * b_q[:, None], 0)
    tl.store(o + bh * V + cols_v, b_o.to(o.dtype.element_ty), mask=mask_v)


# The narrowest key / value tile of the chunked kernels. tl.dot takes 16, but with 16-column tiles (heads of
# K = V = 16) Triton 3.6's sm_90 code for chunk_wy_kernel's W = T diag(.) K product addressed shared memory
# out of range ("illegal memory access"; compute-sanitizer, H200, 2026-12-04; K = 32 ran clean): narrower
# heads take masked 32-wide tiles instead. Backward 3's V tile (BVQ) keeps its floor of 16: it ran clean at V = 16
# (tests/test_delta_rule_gpu.py) and V = 32 (the same call's one-off K = V = 32 runs).
_MIN_TILE = 32


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
    BK = max(_MIN_TILE, min(64, triton.next_power_of_2(K)))
    BKS = BK if K <= 4 * BK else triton.next_power_of_2(triton.cdiv(K, 4))
    NK = triton.cdiv(K, BKS)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    if BKS > 64:
        BVS = 16
    elif K <= 128 and rows * H * triton.cdiv(V, 64) >= 4 * sms:
        BVS = 64
    else:
        BVS = 32
    BVS = max(_MIN_TILE, min(BVS, triton.next_power_of_2(V)))
    stages = 2 if rows * H * triton.cdiv(V, BVS) <= sms else 1
    BV = max(_MIN_TILE, min(64, triton.next_power_of_2(V)))
    return {"C": C, "BK": BK, "BKS": BKS, "NK": NK, "BVS": BVS, "STAGES": stages, "BV": BV, "MODE": dot_mode(q)}


def _backward_options(q: Tensor, chunk_size: int, K: int, V: int, rows: int, H: int) -> dict:
    """Tiles of the backward (first settings from sm_90 compiles, not timed on a GPU).

    The forward's (``_forward_options``): its chunk; the recomputed stages 1-2; backward 1 at its
    ``BK`` / ``BV``; backward 2 at stage 2's ``BKS`` / ``NK`` / ``BVS`` / ``STAGES`` (8 warps for its wider
    state tiles past K = 256). Backward 3 takes key blocks ``BKQ`` of all of K up to 64 and at K = 128
    (so its dq leaves finished, through the L2 norm too), else 128 for multiples of 128 and 64 for the
    rest (a masked 128-wide block spills), and V tiles ``BVQ`` of 64 but at least two of them (a
    one-tile loop is unrolled and its loads kept live: 255 registers at K = V = 64), at 8 warps;
    backward 4 (``BKW`` / ``BVW``) at 8 warps too (at 4 its [C, C] tiles spill at K = 64). fp32 buffers
    (fp16 / fp32 inputs) halve backward 3's V tile and backward 4's tiles. At K = V = 128 in bf16 the
    four kernels take 109 / 130 / 240 / 212 registers and 24 / 16 / 80 / 40 KB of shared memory (sm_90,
    Triton 3.9; no spills)."""
    opts = _forward_options(q, chunk_size, K, V, rows, H)
    wide = _operand_dtype(q) == torch.float32  # 4-byte buffers and operands: half the tiles
    BKQ = max(_MIN_TILE, triton.next_power_of_2(K)) if K <= 64 else 128 if K % 128 == 0 else 64
    BVQ = max(16, min(32 if wide else 64, triton.next_power_of_2(V) // 2))  # >= 2 V tiles: see the docstring
    BKW = _MIN_TILE if wide else opts["BK"]
    BVW = _MIN_TILE if wide else opts["BV"]
    return opts | {"BKQ": BKQ, "BVQ": BVQ, "WARPS_Q": 8, "BKW": BKW, "BVW": BVW, "WARPS_WY": 8,
                   "WARPS_DH": 8 if opts["BKS"] > 64 else 4}


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
    """Stage 1: (G, rk, T or None, W, U'), T, W and U' in ``out_dtype``; G and rk are None when ungated /
    without the L2 norm."""
    Bsz, T, H, K = k.shape
    V = v.shape[-1]
    f32 = {"device": k.device, "dtype": torch.float32}
    G = torch.empty(Bsz, T, H, **f32) if g is not None else None
    rk = torch.empty(Bsz, T, H, **f32) if use_qk_l2norm else None
    Tbuf = torch.empty(Bsz, T, H, C, device=k.device, dtype=out_dtype) if store_t else None
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
    """The backward pipeline: stages 1-2 again (T, W, U', h_c, v_new), then backward 1-4:
    (dq, dk, dv, dg or None, dbeta, dh0 fp32 or None)."""
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    N = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    opts = _backward_options(q, chunk_size, K, V, N, H)
    C, BK, BV, MODE = opts["C"], opts["BK"], opts["BV"], opts["MODE"]
    offsets, table = _chunk_offsets(Bsz, T, C, cu_seqlens, q.device)
    slots = table.shape[0]
    odt = _operand_dtype(q)
    G, rk, Tbuf, W, U = _wy_stage(k, v, g, beta, cu_seqlens, table, use_qk_l2norm, C, BK, BV, MODE, odt, True)
    h, vnew, _ = _state_stage(k, W, U, G, rk, initial_state, cu_seqlens, offsets, slots, N, C, opts["BKS"],
                              opts["NK"], opts["BVS"], opts["STAGES"], MODE, odt, False, True)
    del U
    f32 = {"device": q.device, "dtype": torch.float32}
    rq = torch.empty(Bsz, T, H, **f32) if use_qk_l2norm else None
    G_, rq_, rk_ = (W if t is None else t for t in (G, rq, rk))  # unused pointers stand in for absent ones
    cu = table if cu_seqlens is None else cu_seqlens
    flags = {"GATED": g is not None, "VARLEN": cu_seqlens is not None, "L2NORM": use_qk_l2norm, "MODE": MODE}
    # backward 1: the output stage's part of dv_new
    dvn = torch.empty(Bsz, T, H, V, device=q.device, dtype=odt)
    chunk_bwd_dv_local_kernel[(slots, H)](q, k, G_, rk_, do, dvn, rq_, table, cu, T, H, K, V, scale, C=C, BK=BK,
                                          BV=BV, EPS=L2NORM_EPS, **flags, num_warps=4, num_stages=2)
    # backward 2: the state cotangents in reverse, dv_new completed in place
    dh = torch.empty(slots, H, K, V, device=q.device, dtype=odt)
    dh0 = None if initial_state is None else torch.empty(N, H, K, V, **f32)
    chunk_bwd_dh_kernel[(N, H, triton.cdiv(V, opts["BVS"]))](
        q, k, W, G_, rq_, rk_, do, dht, dh if dh0 is None else dh0, dh, dvn, offsets,
        offsets if cu_seqlens is None else cu_seqlens, T, H, K, V, scale, C=C, BKS=opts["BKS"], NK=opts["NK"],
        BV=opts["BVS"], STORE_DH0=dh0 is not None, **flags, num_warps=opts["WARPS_DH"], num_stages=opts["STAGES"])
    del W
    # backward 3: dq, dk and dW outside the UT transform, per key block
    BKQ = opts["BKQ"]
    NKB = triton.cdiv(K, BKQ)
    dq_left = use_qk_l2norm and NKB > 1  # dq's L2 norm needs whole rows: backward 4 finishes it
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dqs = torch.empty(Bsz, T, H, K, **f32) if dq_left else dq
    dk3 = torch.empty(Bsz, T, H, K, device=q.device, dtype=odt)
    dw = torch.empty(Bsz, T, H, K, device=q.device, dtype=odt)
    rs = torch.empty(NKB, Bsz * T * H, 3, **f32)
    chunk_bwd_dqk_kernel[(slots, H, NKB)](
        q, k, vnew, h, dh, dvn, do, G_, rq_, rk_, dqs, dk3, dw, rs, table, cu, T, Bsz * T * H, H, K, V, scale, C=C,
        BK=BKQ, BV=opts["BVQ"], FINISH_DQ=not dq_left, **flags, num_warps=opts["WARPS_Q"], num_stages=2)
    del h, dh, vnew
    # backward 4: the UT transform, dv, dbeta, dg and the L2 norm of dk (and of dq when left)
    dv, dbeta = torch.empty_like(v), torch.empty_like(beta)
    dg = None if g is None else torch.empty_like(g)
    chunk_bwd_wy_kernel[(slots, H)](
        q, k, v, beta, G_, rq_, rk_, Tbuf, dvn, dw, dk3, rs, dqs, dq, dk, dv, dbeta, dbeta if dg is None else dg,
        table, cu, T, Bsz * T * H, H, K, V, C=C, BK=opts["BKW"], BV=opts["BVW"], NKB=NKB, DQ_LEFT=dq_left, **flags,
        num_warps=opts["WARPS_WY"], num_stages=2)
    return dq, dk, dv, dg, dbeta, dh0


class DeltaRuleTriton(torch.autograd.Function):
    """The chunked kernels: the three-stage forward (saving only the inputs) and the backward pipeline,
    which recomputes stages 1-2 first."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, chunk_size):
        # Non-finite entries become 0 here (their gradients vanish: every output they reach is poisoned
        # by the caller); the copies are contiguous.
        q, k, v, g, beta = nan_to_zero(q, k, v, g, beta)
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

    Non-finite inputs follow the PyTorch path's rule (zeroed inside the autograd function, their outputs
    NaN after).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    bad_q, bad = nonfinite_flags(q, k, v, g, beta)
    o, final = DeltaRuleTriton.apply(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
                                     chunk_size)
    o, final = poison(o, final, bad_q, first_bad(bad, cu_seqlens), cu_seqlens)
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
