"""Triton kernels of ``gla`` / ``simple_gla``: a chunked forward and backward, and a fused decode step.

Imported only through the dispatcher in ``seqblocks/ops/gla/__init__.py`` once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module.

Design (docs/kernels.md, "GLA"): batch rows and packed sequences are one thing here, sequences of a
flattened [B * T] token axis with bounds ``cu``; every chunk of ``BT`` tokens of every sequence gets a
*slot* (slots are numbered sequence by sequence, so slot = first slot of its sequence + chunk). The
slot map is built on the device from the bounds, and the grid size comes from the shapes alone
(``cdiv(B T, BT) + N`` slots bound the chunks of N sequences), so there is no host sync.

Forward, four launches:
  1. ``_chunk_prepare``: b = the log-decay summed from the chunk start (fp32), the chunk's total decay,
     and the decayed ``q e^b`` and ``k e^{b_C - b}`` (exponents <= 0) in q's dtype, so that the chunk
     walks below load two 16-bit tiles instead of computing them from three fp32 tiles (fewer spills).
  2. ``_intra_scores``: A [BT, BT] per chunk, ``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` for j <= i, in
     sub-blocks of ``BC`` rows. Block pairs I > J are one ``tl.dot`` with both factors taken relative to
     block I's first row (exponents <= 0); the diagonal blocks are built column by column with the
     exponent masked to -inf above the diagonal, so a chunk that decays by thousands of nats stays
     finite. (The scalar decay needs no sub-blocks for stability but takes the same path.)
  3. ``_fwd_state``: one program per (sequence, head, block of V) walks its chunks with the [K, BV]
     state in fp32 registers: ``o = scale (A v + (q e^b) S)``, ``S <- e^{b_C} S + (k e^{b_C - b})^T v``;
     it stores the state entering each chunk for the backward.
Backward, three launches plus one cumulative sum:
  4. ``_bwd_dstate``: the reverse walk of the state's adjoint, ``dS <- e^{b_C} dS + scale (q e^b)^T do``,
     storing the adjoint leaving each chunk (and d initial_state).
  5. ``_bwd_inter``: per chunk, dv complete, dA = scale do v^T, and the inter-chunk parts of dq, dk.
  6. ``_bwd_intra``: per sub-block, the intra-chunk parts of dq and dk through dA (the same stable
     sub-block decomposition as 2).
  dg follows without a kernel from the identity ``dG_t = q_t dq_t - k_t dk_t`` (+ ``sum_v S_T dS_T``
  at the last token) for the log-decay G summed from the sequence start, and ``dg_t = sum_{s >= t} dG_s``
  (a reverse cumulative sum per sequence); the scalar decay sums it over K.
The decode step ``_step_kernel`` reads and writes the state once, in place.

Every ``tl.dot`` accumulates in fp32; 16-bit inputs feed it bf16 operands, fp32 inputs use IEEE fp32
products. K <= 256 and every block dimension is a power of two >= 16.

Shapes: B batch, T time, H heads, K key width, V value width, N sequences, BT chunk, BC sub-block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["gla_triton", "gla_step_triton", "MAX_K"]

MAX_K = 256
_BT, _BC = 64, 16
# The chunk-walking kernels hold several [64, K] tiles and a [K, 32] fp32 state: 8 warps (an untuned
# choice, the fewest spills at K = 128 by cuobjdump; the sub-block kernels keep Triton's default of 4).
_WARPS = 8
# Triton 3.9's CPU interpreter computes a bf16 x bf16 ``tl.dot`` wrongly (values ~1e10 off); there the
# operands are rounded to bf16 and multiplied in fp32, which is what the tensor cores compute.
_INTERPRETED = tl.constexpr(interpreter_enabled())


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    # one return statement: the branches are constexpr, resolved when the kernel is compiled
    if LOWP:
        if _INTERPRETED:
            c = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def _exp_where(mask, x):
    # exp(x) where mask, else 0, without forming exp of a masked (possibly huge) exponent
    return tl.exp(tl.where(mask, x, float("-inf")))


@triton.jit
def _load_tile(ptr, t, tm, h, H, K, cols, cm):
    # rows t of a [TT, H, K] tensor at head h, in its own dtype [len(t), len(cols)]; masked entries 0
    return tl.load(ptr + (t[:, None] * H + h) * K + cols[None, :], mask=tm[:, None] & cm[None, :], other=0.0)


@triton.jit
def _load_rows(ptr, t, tm, h, H, K, cols, cm):
    # ``_load_tile`` as fp32
    return _load_tile(ptr, t, tm, h, H, K, cols, cm).to(tl.float32)


@triton.jit
def _load_b(b, t, tm, h, H, K, kk, km, SCALAR: tl.constexpr):
    # the chunk-local log-decay of rows t: [len(t), BK] (per key) or [len(t), 1] (scalar)
    if SCALAR:
        x = tl.load(b + t * H + h, mask=tm, other=0.0)[:, None]
    else:
        x = _load_rows(b, t, tm, h, H, K, kk, km)
    return x


@triton.jit
def _load_b_row(b, t, valid, h, H, K, kk, km, SCALAR: tl.constexpr):
    # the log-decay of one token t: [1, BK] (per key) or [1, 1] (scalar); 0 unless ``valid`` (a scalar
    # bool, folded into an index bound: the interpreter refuses a block mask & a scalar mask)
    if SCALAR:
        zero = tl.zeros([1], tl.int32)
        x = tl.load(b + t * H + h + zero, mask=zero < tl.where(valid, 1, 0), other=0.0)[:, None]
    else:
        x = tl.load(b + (t * H + h) * K + kk, mask=kk < tl.where(valid, K, 0), other=0.0)[None, :]
    return x


@triton.jit
def _chunk_prepare(q, k, g, b, qg, kg, blast, slot_seq, slot_chunk, cu, N, H, K, BT: tl.constexpr,
                   BK: tl.constexpr, SCALAR: tl.constexpr):
    # b = cumsum of g from the chunk start; blast = the chunk's total log-decay [K]; the decayed
    # qg = q e^b and kg = k e^(blast - b) (exponents <= 0), in q's dtype, for the chunk walks
    p, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_seq + p)
    if n < N:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        t = bos + c * BT + tl.arange(0, BT)
        tm = t < eos
        kk = tl.arange(0, BK)
        km = kk < K
        if SCALAR:
            x = tl.cumsum(tl.load(g + t * H + h, mask=tm, other=0.0).to(tl.float32), 0)
            tl.store(b + t * H + h, x, mask=tm)
            total = tl.sum(tl.where(t == tl.minimum(bos + c * BT + BT, eos) - 1, x, 0.0), 0)
            x = x[:, None]
            tl.store(blast + (p * H + h) * K + kk, total + tl.zeros([BK], tl.float32), mask=km)
            tot = total
        else:
            x = tl.cumsum(_load_rows(g, t, tm, h, H, K, kk, km), 0)
            tl.store(b + (t[:, None] * H + h) * K + kk[None, :], x, mask=tm[:, None] & km[None, :])
            tot = tl.sum(tl.where((t == tl.minimum(bos + c * BT + BT, eos) - 1)[:, None], x, 0.0), 0)
            tl.store(blast + (p * H + h) * K + kk, tot, mask=km)
            tot = tot[None, :]
        off = (t[:, None] * H + h) * K + kk[None, :]
        rows = tm[:, None] & km[None, :]
        q_c = _load_rows(q, t, tm, h, H, K, kk, km)
        k_c = _load_rows(k, t, tm, h, H, K, kk, km)
        tl.store(qg + off, (q_c * _exp_where(tm[:, None], x)).to(qg.dtype.element_ty), mask=rows)
        tl.store(kg + off, (k_c * _exp_where(tm[:, None], tot - x)).to(kg.dtype.element_ty), mask=rows)


@triton.jit
def _intra_scores(q, k, b, A, slot_seq, slot_chunk, cu, N, H, K, BT: tl.constexpr, BC: tl.constexpr,
                  BK: tl.constexpr, SCALAR: tl.constexpr, LOWP: tl.constexpr):
    NC: tl.constexpr = BT // BC
    pid, h = tl.program_id(0), tl.program_id(1)
    p, I = pid // NC, pid % NC
    n = tl.load(slot_seq + p)
    if n < N:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        t0 = bos + c * BT
        r = tl.arange(0, BC)
        ti = t0 + I * BC + r
        mi = ti < eos
        kk = tl.arange(0, BK)
        km = kk < K
        q_i = _load_rows(q, ti, mi, h, H, K, kk, km)
        b_i = _load_b(b, ti, mi, h, H, K, kk, km, SCALAR)
        b_ref = _load_b_row(b, t0 + I * BC, t0 + I * BC < eos, h, H, K, kk, km, SCALAR)
        q_n = q_i * _exp_where(mi[:, None], b_i - b_ref)
        for J in range(0, tl.where(t0 + I * BC < eos, I, 0)):  # none for a block past the end
            tj = t0 + J * BC + r
            mj = tj < eos
            k_j = _load_rows(k, tj, mj, h, H, K, kk, km)
            b_j = _load_b(b, tj, mj, h, H, K, kk, km, SCALAR)
            k_n = k_j * _exp_where(mj[:, None], b_ref - b_j)
            a = _dot(q_n, tl.trans(k_n), LOWP)
            tl.store(A + (ti[:, None] * H + h) * BT + J * BC + r[None, :], a, mask=mi[:, None])
        k_i = _load_rows(k, ti, mi, h, H, K, kk, km)
        lower = (r[:, None] >= r[None, :]) & mi[:, None] & mi[None, :]
        if SCALAR:
            e = tl.where(lower, b_i - tl.trans(b_i), float("-inf"))
            acc = _dot(q_i, tl.trans(k_i), LOWP) * tl.exp(e)
        else:
            acc = tl.zeros([BC, BC], dtype=tl.float32)
            for j in range(0, BC):
                tj = t0 + I * BC + j
                k_j = tl.load(k + (tj * H + h) * K + kk, mask=kk < tl.where(tj < eos, K, 0), other=0.0).to(tl.float32)
                b_j = tl.load(b + (tj * H + h) * K + kk, mask=kk < tl.where(tj < eos, K, 0), other=0.0)
                e = tl.where(((r >= j) & mi)[:, None], b_i - b_j[None, :], float("-inf"))
                col = tl.sum(q_i * k_j[None, :] * tl.exp(e), axis=1)
                acc = tl.where(r[None, :] == j, col[:, None], acc)
        tl.store(A + (ti[:, None] * H + h) * BT + I * BC + r[None, :], acc, mask=mi[:, None])


@triton.jit
def _fwd_state(qg, kg, v, blast, A, o, h0, ht, states, cu, coff, scale, H, K, V, BT: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, SCALAR: tl.constexpr, HAS_H0: tl.constexpr, HAS_HT: tl.constexpr,
               SAVE: tl.constexpr, LOWP: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
    p0 = tl.load(coff + n)
    kk, vv, rt = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    km, vm = kk < K, vv < V
    s_off = (h * K + kk[:, None]) * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + n * H * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        t = bos + c * BT + rt
        tm = t < eos
        if SAVE:  # the state entering each chunk, for the backward (skipped without gradients)
            tl.store(states + (p0 + c) * H * K * V + s_off, S, mask=s_mask)
        q_g = _load_tile(qg, t, tm, h, H, K, kk, km)
        k_g = _load_tile(kg, t, tm, h, H, K, kk, km)
        v_c = _load_tile(v, t, tm, h, H, V, vv, vm)
        a = tl.load(A + (t[:, None] * H + h) * BT + rt[None, :], mask=tm[:, None], other=0.0)
        out = (_dot(a, v_c, LOWP) + _dot(q_g, S, LOWP)) * scale
        tl.store(o + (t[:, None] * H + h) * V + vv[None, :], out.to(o.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])
        decay = tl.exp(tl.load(blast + ((p0 + c) * H + h) * K + kk, mask=km, other=0.0))
        S = S * decay[:, None] + _dot(tl.trans(k_g), v_c, LOWP)
    if HAS_HT:
        tl.store(ht + n * H * K * V + s_off, S, mask=s_mask)


@triton.jit
def _bwd_dstate(qg, blast, do, dht, dh0, dstates, cu, coff, scale, H, K, V, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, SCALAR: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DH0: tl.constexpr,
                LOWP: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
    p0 = tl.load(coff + n)
    kk, vv, rt = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    km, vm = kk < K, vv < V
    s_off = (h * K + kk[:, None]) * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + n * H * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    nc = tl.cdiv(eos - bos, BT)
    for ci in range(0, nc):
        c = nc - 1 - ci
        t = bos + c * BT + rt
        tm = t < eos
        tl.store(dstates + (p0 + c) * H * K * V + s_off, dS, mask=s_mask)
        q_g = _load_tile(qg, t, tm, h, H, K, kk, km)
        do_c = _load_tile(do, t, tm, h, H, V, vv, vm)
        decay = tl.exp(tl.load(blast + ((p0 + c) * H + h) * K + kk, mask=km, other=0.0))
        dS = dS * decay[:, None] + _dot(tl.trans(q_g), do_c, LOWP) * scale
    if HAS_DH0:
        tl.store(dh0 + n * H * K * V + s_off, dS, mask=s_mask)


@triton.jit
def _bwd_inter(kg, v, b, blast, A, do, states, dstates, dq, dk, dv, dA, slot_seq, slot_chunk, cu, N, scale, H, K, V,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr, LOWP: tl.constexpr):
    p, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_seq + p)
    if n < N:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        kk, rt = tl.arange(0, BK), tl.arange(0, BT)
        km = kk < K
        t = bos + c * BT + rt
        tm = t < eos
        k_g = _load_tile(kg, t, tm, h, H, K, kk, km)
        a = tl.load(A + (t[:, None] * H + h) * BT + rt[None, :], mask=tm[:, None], other=0.0)
        acc_q = tl.zeros([BT, BK], dtype=tl.float32)
        acc_k = tl.zeros([BT, BK], dtype=tl.float32)
        acc_a = tl.zeros([BT, BT], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            vv = iv * BV + tl.arange(0, BV)
            vm = vv < V
            s_off = (h * K + kk[:, None]) * V + vv[None, :]
            s_mask = km[:, None] & vm[None, :]
            S = tl.load(states + p * H * K * V + s_off, mask=s_mask, other=0.0)
            dS = tl.load(dstates + p * H * K * V + s_off, mask=s_mask, other=0.0)
            do_c = _load_tile(do, t, tm, h, H, V, vv, vm)
            v_c = _load_tile(v, t, tm, h, H, V, vv, vm)
            acc_q += _dot(do_c, tl.trans(S), LOWP)
            acc_k += _dot(v_c, tl.trans(dS), LOWP)
            acc_a += _dot(do_c, tl.trans(v_c), LOWP)
            dv_c = _dot(tl.trans(a), do_c, LOWP) * scale + _dot(k_g, dS, LOWP)
            tl.store(dv + (t[:, None] * H + h) * V + vv[None, :], dv_c, mask=tm[:, None] & vm[None, :])
        row_mask = tm[:, None] & km[None, :]
        b_c = _load_b(b, t, tm, h, H, K, kk, km, SCALAR)
        b_l = tl.load(blast + (p * H + h) * K + kk, mask=km, other=0.0)[None, :]
        dq_c = acc_q * _exp_where(tm[:, None], b_c) * scale
        dk_c = acc_k * _exp_where(tm[:, None], b_l - b_c)
        tl.store(dq + (t[:, None] * H + h) * K + kk[None, :], dq_c, mask=row_mask)
        tl.store(dk + (t[:, None] * H + h) * K + kk[None, :], dk_c, mask=row_mask)
        lower = (rt[:, None] >= rt[None, :]) & tm[:, None] & tm[None, :]
        tl.store(dA + (t[:, None] * H + h) * BT + rt[None, :], tl.where(lower, acc_a * scale, 0.0),
                 mask=tm[:, None])


@triton.jit
def _bwd_intra(q, k, b, dA, dq, dk, slot_seq, slot_chunk, cu, N, H, K, BT: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, SCALAR: tl.constexpr, LOWP: tl.constexpr):
    NC: tl.constexpr = BT // BC
    pid, h = tl.program_id(0), tl.program_id(1)
    p, I = pid // NC, pid % NC
    n = tl.load(slot_seq + p)
    if n < N:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        t0 = bos + c * BT
        r = tl.arange(0, BC)
        ti = t0 + I * BC + r
        mi = ti < eos
        kk = tl.arange(0, BK)
        km = kk < K
        q_i = _load_rows(q, ti, mi, h, H, K, kk, km)
        k_i = _load_rows(k, ti, mi, h, H, K, kk, km)
        b_i = _load_b(b, ti, mi, h, H, K, kk, km, SCALAR)
        da_ii = tl.load(dA + (ti[:, None] * H + h) * BT + I * BC + r[None, :], mask=mi[:, None], other=0.0)
        # dq_i += sum_{j <= i} dA_ij k_j exp(b_i - b_j)
        b_ref = _load_b_row(b, t0 + I * BC, t0 + I * BC < eos, h, H, K, kk, km, SCALAR)
        acc_q = tl.zeros([BC, BK], dtype=tl.float32)
        for J in range(0, tl.where(t0 + I * BC < eos, I, 0)):  # none for a block past the end
            tj = t0 + J * BC + r
            mj = tj < eos
            k_j = _load_rows(k, tj, mj, h, H, K, kk, km)
            b_j = _load_b(b, tj, mj, h, H, K, kk, km, SCALAR)
            da = tl.load(dA + (ti[:, None] * H + h) * BT + J * BC + r[None, :], mask=mi[:, None], other=0.0)
            acc_q += _dot(da, k_j * _exp_where(mj[:, None], b_ref - b_j), LOWP)
        dq_i = acc_q * _exp_where(mi[:, None], b_i - b_ref)
        # dk_j += sum_{i >= j} dA_ij q_i exp(b_i - b_j), relative to block I's last valid row
        t_end = tl.minimum(t0 + I * BC + BC, eos) - 1
        b_end = _load_b_row(b, t_end, t_end >= t0 + I * BC, h, H, K, kk, km, SCALAR)
        acc_k = tl.zeros([BC, BK], dtype=tl.float32)
        for J in range(I + 1, NC):
            tj = t0 + J * BC + r
            mj = tj < eos
            q_j = _load_rows(q, tj, mj, h, H, K, kk, km)
            b_j = _load_b(b, tj, mj, h, H, K, kk, km, SCALAR)
            da = tl.load(dA + (tj[:, None] * H + h) * BT + I * BC + r[None, :], mask=mj[:, None], other=0.0)
            acc_k += _dot(tl.trans(da), q_j * _exp_where(mj[:, None], b_j - b_end), LOWP)
        dk_i = acc_k * _exp_where(mi[:, None], b_end - b_i)
        lower = (r[:, None] >= r[None, :]) & mi[:, None] & mi[None, :]
        if SCALAR:
            w = da_ii * tl.exp(tl.where(lower, b_i - tl.trans(b_i), float("-inf")))
            dq_i += _dot(w, k_i, LOWP)
            dk_i += _dot(tl.trans(w), q_i, LOWP)
        else:
            for j in range(0, BC):
                tj = t0 + I * BC + j
                ok = kk < tl.where(tj < eos, K, 0)
                # column j of the diagonal block feeds dq; row j feeds dk
                k_j = tl.load(k + (tj * H + h) * K + kk, mask=ok, other=0.0).to(tl.float32)
                q_j = tl.load(q + (tj * H + h) * K + kk, mask=ok, other=0.0).to(tl.float32)
                b_j = tl.load(b + (tj * H + h) * K + kk, mask=ok, other=0.0)
                col = tl.sum(tl.where(r[None, :] == j, da_ii, 0.0), axis=1)  # dA_{i j}, i in block
                row = tl.sum(tl.where(r[:, None] == j, da_ii, 0.0), axis=0)  # dA_{j i'}, i' in block
                e_q = tl.where(((r >= j) & mi)[:, None], b_i - b_j[None, :], float("-inf"))
                # a padded token j (b_j read as 0) must not meet a decayed b_i: exp would overflow
                e_k = tl.where(((r <= tl.where(tj < eos, j, -1)) & mi)[:, None], b_j[None, :] - b_i,
                               float("-inf"))
                dq_i += col[:, None] * k_j[None, :] * tl.exp(e_q)
                dk_i += row[:, None] * q_j[None, :] * tl.exp(e_k)
        row_mask = mi[:, None] & km[None, :]
        off = (ti[:, None] * H + h) * K + kk[None, :]
        tl.store(dq + off, tl.load(dq + off, mask=row_mask, other=0.0) + dq_i, mask=row_mask)
        tl.store(dk + off, tl.load(dk + off, mask=row_mask, other=0.0) + dk_i, mask=row_mask)


@triton.jit
def _step_kernel(state, q, k, v, g, o, scale, H, K, V, BK: tl.constexpr, BV: tl.constexpr,
                 SCALAR: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    kk, vv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    km, vm = kk < K, vv < V
    s_ptr = state + bh * K * V + kk[:, None] * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    S = tl.load(s_ptr, mask=s_mask, other=0.0).to(tl.float32)
    q_t = tl.load(q + bh * K + kk, mask=km, other=0.0).to(tl.float32)
    k_t = tl.load(k + bh * K + kk, mask=km, other=0.0).to(tl.float32)
    v_t = tl.load(v + bh * V + vv, mask=vm, other=0.0).to(tl.float32)
    if SCALAR:
        decay = tl.exp(tl.load(g + bh + tl.zeros([1], tl.int32)).to(tl.float32))[:, None]
    else:
        decay = tl.exp(tl.load(g + bh * K + kk, mask=km, other=0.0).to(tl.float32))[:, None]
    S = S * decay + k_t[:, None] * v_t[None, :]
    tl.store(s_ptr, S, mask=s_mask)
    out = tl.sum(q_t[:, None] * S, axis=0) * scale
    tl.store(o + bh * V + vv, out.to(o.dtype.element_ty), mask=vm)


def _blocks(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    return BK, BV


def _plan(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple:
    """Sequence bounds and the chunk-slot map, built on the device (no host sync).

    Returns (cu [N + 1] int32, coff [N + 1] int32 first slot of each sequence, slot_seq, slot_chunk
    [num_slots] int32 (slot_seq = N for unused slots), N, num_slots)."""
    if cu_seqlens is None:
        N = B
        cu = torch.arange(0, B + 1, device=device, dtype=torch.int64) * T
        num_slots = B * triton.cdiv(T, _BT)
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        num_slots = triton.cdiv(T, _BT) + N
    chunks = torch.div(cu[1:] - cu[:-1] + _BT - 1, _BT, rounding_mode="floor")
    coff = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    num_slots = max(num_slots, 1)  # an empty input still launches one (idle) program
    slots = torch.arange(num_slots, device=device, dtype=torch.int64)
    slot_seq = torch.searchsorted(coff[1:].contiguous(), slots, right=True)
    slot_chunk = slots - coff[slot_seq.clamp(max=N - 1)]
    i32 = torch.int32
    return cu.to(i32), coff.to(i32), slot_seq.to(i32), slot_chunk.to(i32), N, num_slots


def _segment_reverse_cumsum(x: torch.Tensor, B: int, T: int, cu: torch.Tensor, packed: bool) -> torch.Tensor:
    """Suffix sums of x [B * T, ...] within each sequence (a reverse cumulative sum per sequence)."""
    if not packed:
        return x.view(B, T, *x.shape[1:]).flip(1).cumsum(1).flip(1).reshape(x.shape)
    # one packed row: suffix sums of the whole row minus the suffix at each sequence's end (float64
    # keeps the difference exact enough over long rows)
    total = x.double().flip(0).cumsum(0).flip(0)
    total = torch.cat([total, total.new_zeros(1, *total.shape[1:])])
    t = torch.arange(x.shape[0], device=x.device)
    ends = cu[1:].to(torch.long)[torch.searchsorted(cu[1:].to(torch.long), t, right=True)]
    return (total[:-1] - total[ends]).to(x.dtype)


class _GLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, output_final_state, cu_seqlens, scalar):
        B, T, H, K = q.shape
        V = v.shape[-1]
        TT = B * T
        dev = q.device
        BK, BV = _blocks(K, V)
        lowp = q.dtype in (torch.bfloat16, torch.float16)
        cu, coff, slot_seq, slot_chunk, N, S_n = _plan(B, T, cu_seqlens, dev)
        q2, k2 = q.reshape(TT, H, K).contiguous(), k.reshape(TT, H, K).contiguous()
        v2 = v.reshape(TT, H, V).contiguous()
        g2 = g.reshape((TT, H) if scalar else (TT, H, K)).contiguous()
        f32 = torch.float32
        b = torch.empty((TT, H) if scalar else (TT, H, K), device=dev, dtype=f32)
        qg, kg = torch.empty_like(q2), torch.empty_like(k2)
        blast = torch.empty(S_n, H, K, device=dev, dtype=f32)
        _chunk_prepare[(S_n, H)](q2, k2, g2, b, qg, kg, blast, slot_seq, slot_chunk, cu, N, H, K, BT=_BT, BK=BK,
                                 SCALAR=scalar, num_warps=_WARPS)
        A = torch.zeros(TT, H, _BT, device=dev, dtype=f32)
        _intra_scores[(S_n * (_BT // _BC), H)](q2, k2, b, A, slot_seq, slot_chunk, cu, N, H, K, BT=_BT, BC=_BC,
                                               BK=BK, SCALAR=scalar, LOWP=lowp)
        o = torch.empty(TT, H, V, device=dev, dtype=q.dtype)
        save = any(ctx.needs_input_grad[:5])
        ht = torch.empty(N, H, K, V, device=dev, dtype=f32)
        states = torch.empty(S_n, H, K, V, device=dev, dtype=f32) if save else ht
        h0c = None if h0 is None else h0.to(f32).contiguous()
        _fwd_state[(triton.cdiv(V, BV), N * H)](qg, kg, v2, blast, A, o, h0c if h0c is not None else ht, ht, states,
                                               cu, coff, scale, H, K, V, BT=_BT, BK=BK, BV=BV, SCALAR=scalar,
                                               HAS_H0=h0 is not None, HAS_HT=True, SAVE=save, LOWP=lowp,
                                               num_warps=_WARPS)
        ctx.save_for_backward(q2, k2, v2, b, qg, kg, blast, A, states, ht, cu, coff, slot_seq, slot_chunk)
        ctx.meta = (B, T, H, K, V, N, S_n, scale, scalar, lowp, h0 is not None, cu_seqlens is not None, g.dtype,
                    v.dtype, None if h0 is None else h0.dtype)
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o.view(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q2, k2, v2, b, qg, kg, blast, A, states, ht, cu, coff, slot_seq, slot_chunk = ctx.saved_tensors
        B, T, H, K, V, N, S_n, scale, scalar, lowp, has_h0, packed, g_dtype, v_dtype, h0_dtype = ctx.meta
        TT, dev, f32 = B * T, q2.device, torch.float32
        BK, BV = _blocks(K, V)
        do2 = do.reshape(TT, H, V).contiguous()
        dstates = torch.empty(S_n, H, K, V, device=dev, dtype=f32)
        dh0 = torch.empty(N, H, K, V, device=dev, dtype=f32) if has_h0 else None
        dhtc = None if dht is None else dht.to(f32).contiguous()
        _bwd_dstate[(triton.cdiv(V, BV), N * H)](qg, blast, do2, dhtc if dhtc is not None else dstates,
                                                dh0 if dh0 is not None else dstates, dstates, cu, coff, scale,
                                                H, K, V, BT=_BT, BK=BK, BV=BV, SCALAR=scalar,
                                                HAS_DHT=dht is not None, HAS_DH0=has_h0, LOWP=lowp,
                                                num_warps=_WARPS)
        dq = torch.empty(TT, H, K, device=dev, dtype=f32)
        dk = torch.empty(TT, H, K, device=dev, dtype=f32)
        dv = torch.empty(TT, H, V, device=dev, dtype=f32)
        dA = torch.zeros(TT, H, _BT, device=dev, dtype=f32)
        _bwd_inter[(S_n, H)](kg, v2, b, blast, A, do2, states, dstates, dq, dk, dv, dA, slot_seq, slot_chunk, cu, N,
                             scale, H, K, V, BT=_BT, BK=BK, BV=BV, SCALAR=scalar, LOWP=lowp, num_warps=_WARPS)
        _bwd_intra[(S_n * (_BT // _BC), H)](q2, k2, b, dA, dq, dk, slot_seq, slot_chunk, cu, N, H, K, BT=_BT,
                                           BC=_BC, BK=BK, SCALAR=scalar, LOWP=lowp)
        # dg: dG_t = q_t dq_t - k_t dk_t, plus sum_v S_T dS_T at each sequence's last token; dg = suffix sums.
        dG = q2.float() * dq - k2.float() * dk  # [TT, H, K]
        dg = _segment_reverse_cumsum(dG, B, T, cu, packed)
        if dht is not None:
            final = (ht * dhtc).sum(-1)  # [N, H, K]: reaches every token of its sequence
            seq = torch.searchsorted(cu[1:].to(torch.long), torch.arange(TT, device=dev), right=True)
            dg = dg + final[seq.clamp(max=N - 1)]
        if scalar:
            dg = dg.sum(-1)
        shape = (B, T, H)
        return (dq.view(*shape, K).to(q2.dtype), dk.view(*shape, K).to(k2.dtype), dv.view(*shape, V).to(v_dtype),
                dg.reshape(*shape, *([] if scalar else [K])).to(g_dtype),
                None if dh0 is None else dh0.to(h0_dtype), None, None, None, None)


def gla_triton(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None, scalar=False):
    """``gla`` / ``simple_gla`` on the kernels (inputs already checked). Returns (o, final state or None)."""
    o, ht = _GLATriton.apply(q, k, v, g, initial_state, scale, output_final_state, cu_seqlens, scalar)
    return o, (ht if output_final_state else None)


def gla_step_triton(state, q, k, v, g, *, scale):
    """One decode token on ``_step_kernel``: ``state`` [B, H, K, V] fp32 updated in place; returns o [B, H, V]."""
    B, H, K, V = state.shape
    BK, BV = _blocks(K, V)
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    work = state if state.is_contiguous() else state.contiguous()
    _step_kernel[(triton.cdiv(V, BV), B * H)](work, q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                             o, scale, H, K, V, BK=BK, BV=BV, SCALAR=g.dim() == 2)
    if work is not state:
        state.copy_(work)
    return o
