"""Triton kernels of ``mamba3``'s chunked scan, forward and backward (imported only once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module).

The rest of the prologue (masks, trapezoid weights, accumulated angles, the MIMO lift) is ``torch.py``'s,
differentiated by autograd; the kernels replace the bias and rotation of q and k (done on load from the
raw group-level inputs; ``_unrotate_kernel`` is its backward), ``chunk_scan_torch`` and ``epilogue`` (skip,
gate, MIMO fold: the forward kernel applies them before writing y, ``_epilogue_bwd_kernel`` backs
through them). With q, k below the rotated, biased ones:

    y[t, r] = sum_{s < t, r'} exp(cum_t - cum_s) scale_s (q_{t,r} . k_{s,r'}) x_{s,r'}
              + gamma_t sum_{r'} (q_{t,r} . k_{t,r'}) x_{t,r'} + exp(cum_t) H q_{t,r}
    H      <- exp(cum_L) H + sum_{s, r'} exp(cum_L - cum_s) scale_s x_{s,r'} k_{s,r'}^T

One program per (head, batch, slice) walks the chunks in order with its slice of the state in registers
(the forward: a [BLOCK_P, N] slice, the slices of P are independent) or in reverse with the state's
gradient (the backward: a [P, BLOCK_N] slice; dq, dk and dH are exact per slice of N, dx and the
per-step scalar gradients are partial sums, written per slice and summed after the launch). Splitting
the state is what makes the kernels fit sm_90 at N 128, P 64: one program holding the whole state
needed 296 KB of shared memory (limit 227 KB) and spilled registers.
Time and rank are flattened into rows (row = t R + r, R a power of two), so a chunk is BLOCK_T R rows
and MIMO is the same kernel with R > 1. The forward stores each chunk's starting state (fp32) for the
backward. All accumulation is fp32; ``tl.dot`` operands are the inputs' dtype (bf16 / fp16 with
fp32 accumulation, fp32 as IEEE fp32; fp32 always under the CPU interpreter, whose bf16 dot is wrong).
The state's own products (H q, x^T dH, the state update) take fp32 operands (tf32 for bf16 / fp16
inputs on the GPU). Block sizes (``Mamba3Tuning``) are powers of two, every dot dim >= 16.

Shapes: B batch, T time, R rank, H heads, P head width, N state, c chunks, L = BLOCK_T R rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled
from seqblocks.ops.mamba3.tuning import Mamba3Tuning

__all__ = ["chunk_scan_triton"]


def _blocks(R: int, N: int, P: int, chunk_size: int, tuning: Mamba3Tuning) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, the forward's BLOCK_N and BLOCK_P, the backward's BLOCK_N and BLOCK_P)."""
    # Rows per chunk L = BLOCK_T R in [16, tuning.rows]: enough for tl.dot, small enough for the L x L
    # scores and the registers of the backward.
    block_t = triton.next_power_of_2(max(chunk_size, 1))
    block_t = min(max(block_t, 16 // R if R < 16 else 1), max(tuning.rows // R, 1))
    full_n, full_p = max(16, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(P))
    return block_t, full_n, min(tuning.block_p, full_p), min(tuning.block_n, full_n), full_p


@triton.jit
def _pairs(offs_n, N, HALVES: tl.constexpr):
    # Channel n's rotation pair, its partner channel and the rotation's sign on the partner
    # (-1 on a pair's first channel): rot(u)_n = u_n cos + sign_n u_partner sin.
    if HALVES:
        pair = offs_n % (N // 2)
        first = offs_n < N // 2
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
    else:
        pair = offs_n // 2
        first = (offs_n % 2) == 0
        partner = offs_n ^ 1
    return pair, partner, tl.where(first, -1.0, 1.0)


@triton.jit
def _load_rotated(base, bias, th_base, row_off, bias_off, th_off, offs_n, pair, partner, sign, mask, S):
    # [L, BLOCK_N] rows of rot(theta_t, u + bias) from the raw [B, T, R, G, N] input: each channel and its
    # pair partner are loaded (the partner may lie outside this program's slice of N), theta at the pair.
    th = tl.load(th_base + th_off[:, None] + pair[None, :], mask=mask & (pair < S)[None, :], other=0.0)
    u = tl.load(base + row_off[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32) \
        + tl.load(bias + bias_off[:, None] + offs_n[None, :], mask=mask, other=0.0)
    w = tl.load(base + row_off[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32) \
        + tl.load(bias + bias_off[:, None] + partner[None, :], mask=mask, other=0.0)
    return u * tl.cos(th) + sign[None, :] * w * tl.sin(th)


@triton.jit
def _chunk_fwd_kernel(Q, K, QB, KB, TH, X, ADT, SCALE, GAMMA, H0, D, Z, MZ, MO, Y, YPRE, HF, HC, T, H, N, P, G, S,
                      HALVES: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_P: tl.constexpr,
                      STORE_STATES: tl.constexpr, PREC: tl.constexpr, STATE_PREC: tl.constexpr,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, MIMO: tl.constexpr, FOLD: tl.constexpr,
                      STORE_YPRE: tl.constexpr):
    # One program per (head, batch, block of P): the [BLOCK_P, N] slice of the state is independent of
    # the other slices, only the [L, L] scores are recomputed per slice.
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    L: tl.constexpr = BLOCK_T * R
    rows = tl.arange(0, L)
    tr = rows // R                                   # time of each row inside the chunk
    first = (rows % R) == 0                          # a step's decay enters once, at its first rank row
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mn, mp = offs_n < N, offs_p < P
    # q and k are read raw ([B, T R, G, N], head h reads group h // (H / G)) and biased and rotated on load.
    qk_in = pid_b * T * R * G * N + (pid_h // (H // G)) * N
    bias_off = (pid_h * R + rows % R) * N            # [H, R, N]
    pair, partner, sign = _pairs(offs_n, N, HALVES)
    x_base = X + pid_b * T * R * H * P + pid_h * P
    y_base = Y + pid_b * T * R * H * P + pid_h * P
    s_base = pid_b * T * H + pid_h
    bh = pid_b * H + pid_h
    st = offs_p[:, None] * N + offs_n[None, :]
    smask = mp[:, None] & mn[None, :]
    h = tl.load(H0 + bh * P * N + st, mask=smask, other=0.0)
    lower = tr[:, None] > tr[None, :]
    same = tr[:, None] == tr[None, :]
    # The epilogue's per-head parameters: skip D [H], MIMO gate and output projections [H, R, P] per row.
    proj = (pid_h * R + rows % R)[:, None] * P + offs_p[None, :]
    mzt = tl.load(MZ + proj, mask=mp[None, :], other=0.0) if MIMO and HAS_Z else 1.0
    mot = tl.load(MO + proj, mask=mp[None, :], other=0.0) if FOLD else 1.0
    d = tl.load(D + pid_h) if HAS_D else 0.0
    steps = tl.arange(0, BLOCK_T)
    zt_base = pid_b * T * H * P + pid_h * P          # z and the folded y: [B, T, H, P]
    nchunks = tl.cdiv(T, BLOCK_T)
    for c in range(nchunks):
        t = c * BLOCK_T + tr
        row = c * L + rows
        rm = t < T
        mq = rm[:, None] & mn[None, :]
        th_off = (pid_b * T + t) * (H * S) + pid_h * S
        q = _load_rotated(Q + qk_in, QB, TH, row * (G * N), bias_off, th_off, offs_n, pair, partner, sign, mq,
                          S).to(X.dtype.element_ty)
        k = _load_rotated(K + qk_in, KB, TH, row * (G * N), bias_off, th_off, offs_n, pair, partner, sign, mq,
                          S).to(X.dtype.element_ty)
        x = tl.load(x_base + row[:, None] * (H * P) + offs_p[None, :], mask=rm[:, None] & mp[None, :], other=0.0)
        adt = tl.load(ADT + s_base + t * H, mask=rm & first, other=0.0)
        scale = tl.load(SCALE + s_base + t * H, mask=rm, other=0.0)
        gamma = tl.load(GAMMA + s_base + t * H, mask=rm, other=0.0)
        cum = tl.cumsum(adt, 0)
        cum_last = tl.sum(adt, 0)
        if STORE_STATES:
            tl.store(HC + (bh * nchunks + c) * P * N + st, h, mask=smask)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)                          # [L, L]
        w = tl.where(lower, tl.exp(tl.where(lower, cum[:, None] - cum[None, :], 0.0)) * scale[None, :],
                     tl.where(same, gamma[:, None], 0.0))
        y = tl.dot((s * w).to(x.dtype), x, input_precision=PREC)                  # [L, BLOCK_P]
        y += tl.exp(cum)[:, None] * tl.dot(q.to(tl.float32), tl.trans(h), input_precision=STATE_PREC)
        # Epilogue: skip, gate silu(z mimo_z), fold of the ranks with mimo_o.
        if HAS_D:
            y += d * x.to(tl.float32)
        mx = rm[:, None] & mp[None, :]
        if STORE_YPRE:
            tl.store(YPRE + pid_b * T * R * H * P + pid_h * P + row[:, None] * (H * P) + offs_p[None, :], y, mask=mx)
        if HAS_Z:
            zr = tl.load(Z + zt_base + t[:, None] * (H * P) + offs_p[None, :], mask=mx, other=0.0).to(tl.float32) * mzt
            y = y * zr / (1.0 + tl.exp(-zr))
        if FOLD:
            ts = c * BLOCK_T + steps
            yo = tl.sum(tl.reshape(y * mot, (BLOCK_T, R, BLOCK_P)), 1)                # [BLOCK_T, BLOCK_P]
            tl.store(Y + zt_base + ts[:, None] * (H * P) + offs_p[None, :], yo.to(Y.dtype.element_ty),
                     mask=(ts < T)[:, None] & mp[None, :])
        else:
            tl.store(y_base + row[:, None] * (H * P) + offs_p[None, :], y.to(Y.dtype.element_ty), mask=mx)
        u = tl.exp(cum_last - cum) * scale
        h = tl.exp(cum_last) * h + tl.dot(tl.trans(x.to(tl.float32) * u[:, None]), k.to(tl.float32),
                                          input_precision=STATE_PREC)
    tl.store(HF + bh * P * N + st, h, mask=smask)


@triton.jit
def _chunk_bwd_kernel(Q, K, QB, KB, TH, X, ADT, SCALE, GAMMA, HC, D, DY, DHF, DQ, DK, DX, DADT, DSCALE, DGAMMA,
                      DH0, T, H, N, P, G, S, BATCH, HALVES: tl.constexpr, R: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_P: tl.constexpr, PREC: tl.constexpr, STATE_PREC: tl.constexpr, HAS_D: tl.constexpr):
    # One program per (head, batch, block of N): dq, dk and the [P, BLOCK_N] slice of dH are exact per
    # slice; dx and the per-row scalar gradients are sums over the slices (the scores q k^T are), so
    # each slice writes its own partial (DX, DADT, DSCALE, DGAMMA have a leading slice axis). DY is the
    # gradient of the scan's output before the gate and fold (``_epilogue_bwd_kernel``); the skip's share
    # of dx (D dy) is slice 0's.
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    L: tl.constexpr = BLOCK_T * R
    rows = tl.arange(0, L)
    tr = rows // R
    first = (rows % R) == 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mn, mp = offs_n < N, offs_p < P
    qk_off = pid_b * T * R * H * N + pid_h * N       # dq, dk (in the rotated frame): [B, T R, H, N]
    qk_in = pid_b * T * R * G * N + (pid_h // (H // G)) * N
    bias_off = (pid_h * R + rows % R) * N
    pair, partner, sign = _pairs(offs_n, N, HALVES)
    xp_off = pid_b * T * R * H * P + pid_h * P
    part = pid_n.to(tl.int64) * BATCH * T * R           # this slice's partials: [slices, B, T R, H, .]
    s_base = pid_b * T * H + pid_h
    r_base = part * H + pid_b * T * R * H + pid_h     # per-row scalars [slices, B, T R, H]
    bh = pid_b * H + pid_h
    st = offs_p[:, None] * N + offs_n[None, :]
    smask = mp[:, None] & mn[None, :]
    dh = tl.load(DHF + bh * P * N + st, mask=smask, other=0.0)
    lower = tr[:, None] > tr[None, :]
    same = tr[:, None] == tr[None, :]
    lead = offs_p * 0 + pid_n == 0                   # [BLOCK_P]: slice 0 adds the skip's share of dx
    d = tl.load(D + pid_h) if HAS_D else 0.0
    nchunks = tl.cdiv(T, BLOCK_T)
    for cc in range(nchunks):
        c = nchunks - 1 - cc
        t = c * BLOCK_T + tr
        row = c * L + rows
        rm = t < T
        mq = rm[:, None] & mn[None, :]
        mx = rm[:, None] & mp[None, :]
        th_off = (pid_b * T + t) * (H * S) + pid_h * S
        q = _load_rotated(Q + qk_in, QB, TH, row * (G * N), bias_off, th_off, offs_n, pair, partner, sign, mq,
                          S).to(X.dtype.element_ty)
        k = _load_rotated(K + qk_in, KB, TH, row * (G * N), bias_off, th_off, offs_n, pair, partner, sign, mq,
                          S).to(X.dtype.element_ty)
        x = tl.load(X + xp_off + row[:, None] * (H * P) + offs_p[None, :], mask=mx, other=0.0)
        dy = tl.load(DY + xp_off + row[:, None] * (H * P) + offs_p[None, :], mask=mx, other=0.0)
        adt = tl.load(ADT + s_base + t * H, mask=rm & first, other=0.0)
        scale = tl.load(SCALE + s_base + t * H, mask=rm, other=0.0)
        gamma = tl.load(GAMMA + s_base + t * H, mask=rm, other=0.0)
        h_in = tl.load(HC + (bh * nchunks + c) * P * N + st, mask=smask, other=0.0)
        cum = tl.cumsum(adt, 0)
        cum_last = tl.sum(adt, 0)
        e_cum = tl.exp(cum)
        E = tl.where(lower, tl.exp(tl.where(lower, cum[:, None] - cum[None, :], 0.0)), 0.0)
        A = tl.where(lower, E * scale[None, :], tl.where(same, gamma[:, None], 0.0))
        s = tl.dot(q, tl.trans(k), input_precision=PREC)                        # q_i . k_j over this slice
        ds = tl.dot(dy.to(x.dtype), tl.trans(x), input_precision=PREC)          # dy_i . x_j
        dsA = ds * A
        u = tl.exp(cum_last - cum) * scale
        qf, kf, xf = q.to(tl.float32), k.to(tl.float32), x.to(tl.float32)
        xdh = tl.dot(xf, dh, input_precision=STATE_PREC)                        # [L, BLOCK_N]: x_j^T dH
        dq = tl.dot(dsA.to(k.dtype), k, input_precision=PREC) + e_cum[:, None] * tl.dot(
            dy, h_in, input_precision=STATE_PREC)
        tl.store(DQ + qk_off + row[:, None] * (H * N) + offs_n[None, :], dq, mask=mq)
        dk = tl.dot(tl.trans(dsA).to(q.dtype), q, input_precision=PREC) + u[:, None] * xdh
        tl.store(DK + qk_off + row[:, None] * (H * N) + offs_n[None, :], dk, mask=mq)
        dx = tl.dot(tl.trans(s * A).to(x.dtype), dy.to(x.dtype), input_precision=PREC) \
            + u[:, None] * tl.dot(kf, tl.trans(dh), input_precision=STATE_PREC)
        if HAS_D:
            dx += tl.where(lead, d, 0.0)[None, :] * dy
        tl.store(DX + part * H * P + xp_off + row[:, None] * (H * P) + offs_p[None, :], dx, mask=mx)
        dss = ds * s                                                              # d loss / d s
        vj = tl.sum(xdh * kf, 1)                                                 # x_j^T dH k_j
        dscale = tl.sum(dss * E, 0) + tl.exp(cum_last - cum) * vj
        dgamma = tl.sum(tl.where(same, dss, 0.0), 1)
        GA = dss * tl.where(lower, A, 0.0)
        inter = tl.dot(qf, tl.trans(h_in), input_precision=STATE_PREC)          # [L, P]: H q_i
        dcum = tl.sum(GA, 1) - tl.sum(GA, 0) + e_cum * tl.sum(dy * inter, 1) - u * vj
        dcum_last = tl.exp(cum_last) * tl.sum(tl.sum(dh * h_in, 1), 0) + tl.sum(u * vj, 0)
        dcum += tl.where(rows == L - 1, dcum_last, 0.0)
        dadt = tl.sum(dcum, 0) - tl.cumsum(dcum, 0) + dcum                       # reverse cumsum
        tl.store(DADT + r_base + row * H, dadt, mask=rm)
        tl.store(DSCALE + r_base + row * H, dscale, mask=rm)
        tl.store(DGAMMA + r_base + row * H, dgamma, mask=rm)
        dh = tl.exp(cum_last) * dh + tl.dot(tl.trans(dy * e_cum[:, None]), qf, input_precision=STATE_PREC)
    tl.store(DH0 + bh * P * N + st, dh, mask=smask)


@triton.jit
def _epilogue_bwd_kernel(X, D, Z, MZ, MO, YPRE, DY, DYPRE, DZ, DD, DMZ, DMO, T, H, P, R: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         MIMO: tl.constexpr, FOLD: tl.constexpr, WRITE_DYPRE: tl.constexpr):
    # Back through the skip, gate and fold, one program per (head, batch) over its time: the gradient of
    # the scan's own output (DYPRE [B, T R, H, P]), dz, and per-(batch, head) partials of dD, dmimo_z and
    # dmimo_o (summed over the batch after). Kept out of the chunked backward, whose registers are full.
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    L: tl.constexpr = BLOCK_T * R
    rows = tl.arange(0, L)
    tr = rows // R
    steps = tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < P
    bh = pid_b * H + pid_h
    xp_off = pid_b * T * R * H * P + pid_h * P
    zt_base = pid_b * T * H * P + pid_h * P
    proj = (pid_h * R + rows % R)[:, None] * P + offs_p[None, :]
    mzt = tl.load(MZ + proj, mask=mp[None, :], other=0.0) if MIMO and HAS_Z else 1.0
    mot = tl.load(MO + proj, mask=mp[None, :], other=0.0) if FOLD else 1.0
    dd_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    dmz_acc = tl.zeros((R, BLOCK_P), dtype=tl.float32)
    dmo_acc = tl.zeros((R, BLOCK_P), dtype=tl.float32)
    for c in range(tl.cdiv(T, BLOCK_T)):
        t = c * BLOCK_T + tr
        row = c * L + rows
        mx = (t < T)[:, None] & mp[None, :]
        tz = zt_base + t[:, None] * (H * P) + offs_p[None, :]
        rx = xp_off + row[:, None] * (H * P) + offs_p[None, :]
        if FOLD:
            dyt = tl.load(DY + tz, mask=mx, other=0.0)                           # the step's dy, on each rank
            dy = dyt * mot
        else:
            dy = tl.load(DY + rx, mask=mx, other=0.0)
        if HAS_Z or FOLD:
            ypre = tl.load(YPRE + rx, mask=mx, other=0.0)
        if HAS_Z:
            zz = tl.load(Z + tz, mask=mx, other=0.0).to(tl.float32)
            zr = zz * mzt
            sg = 1.0 / (1.0 + tl.exp(-zr))
            gate = zr * sg
            dzr = dy * ypre * sg * (1.0 + zr * (1.0 - sg))
            ts = c * BLOCK_T + steps
            dz = tl.sum(tl.reshape(dzr * mzt, (BLOCK_T, R, BLOCK_P)), 1)
            tl.store(DZ + zt_base + ts[:, None] * (H * P) + offs_p[None, :], dz, mask=(ts < T)[:, None] & mp[None, :])
            if MIMO:
                dmz_acc += tl.sum(tl.reshape(dzr * zz, (BLOCK_T, R, BLOCK_P)), 0)
            if FOLD:
                dmo_acc += tl.sum(tl.reshape(dyt * ypre * gate, (BLOCK_T, R, BLOCK_P)), 0)
            dy = dy * gate
        elif FOLD:
            dmo_acc += tl.sum(tl.reshape(dyt * ypre, (BLOCK_T, R, BLOCK_P)), 0)
        if WRITE_DYPRE:
            tl.store(DYPRE + rx, dy, mask=mx)
        if HAS_D:
            dd_acc += tl.sum(dy * tl.load(X + rx, mask=mx, other=0.0).to(tl.float32), 0)
    ranks = tl.arange(0, R)
    pout = (bh * R + ranks)[:, None] * P + offs_p[None, :]
    if HAS_D:
        dd = tl.sum(dd_acc, 0)
        tl.store(DD + bh + offs_p * 0, tl.zeros((BLOCK_P,), dtype=tl.float32) + dd, mask=offs_p == 0)
    if MIMO and HAS_Z:
        tl.store(DMZ + pout, dmz_acc, mask=mp[None, :])
    if FOLD:
        tl.store(DMO + pout, dmo_acc, mask=mp[None, :])


def _unrotate_rows(R: int) -> int:
    """Steps per program of ``_unrotate_kernel``: 16 rows (32 spill registers at N 128)."""
    return max(1, 16 // R)


@triton.jit
def _unrotate_kernel(Q, K, QB, KB, TH, DQ, DK, DQP, DKP, DTH, T, H, N, G, S, R: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr):
    # Back through r = rot(theta, u + bias), one program per (time block, batch, head): dr (DQ, DK, in the
    # rotated frame) becomes rot(theta)^T dr (DQP, DKP, written elsewhere: other warps may still load a
    # channel as their partner) and dtheta [B, T, H, S] = sum over ranks and q / k of dr_b r_a - dr_a r_b.
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2)
    L: tl.constexpr = BLOCK_T * R
    rows = tl.arange(0, L)
    t = pid_t * BLOCK_T + rows // R
    row = pid_t * L + rows
    offs_n = tl.arange(0, BLOCK_N)
    mask = (t < T)[:, None] & (offs_n < N)[None, :]
    pair, partner, sign = _pairs(offs_n, N, HALVES)
    th = tl.load(TH + ((pid_b * T + t) * (H * S) + pid_h * S)[:, None] + pair[None, :],
                 mask=mask & (pair < S)[None, :], other=0.0)
    cos, sin = tl.cos(th), tl.sin(th)
    qk_in = pid_b * T * R * G * N + (pid_h // (H // G)) * N + row[:, None] * (G * N)
    bias_off = ((pid_h * R + rows % R) * N)[:, None]
    d_off = (pid_b * T * R + row)[:, None] * (H * N) + pid_h * N
    dth = tl.zeros((L, BLOCK_N), dtype=tl.float32)
    for which in tl.static_range(2):
        src, bias, dr, dpre = (Q, QB, DQ, DQP) if which == 0 else (K, KB, DK, DKP)
        u = tl.load(src + qk_in + offs_n[None, :], mask=mask, other=0.0).to(tl.float32) \
            + tl.load(bias + bias_off + offs_n[None, :], mask=mask, other=0.0)
        w = tl.load(src + qk_in + partner[None, :], mask=mask, other=0.0).to(tl.float32) \
            + tl.load(bias + bias_off + partner[None, :], mask=mask, other=0.0)
        r_n = u * cos + sign[None, :] * w * sin                                  # rotated channel n
        r_p = w * cos - sign[None, :] * u * sin                                  # rotated partner
        d_n = tl.load(dr + d_off + offs_n[None, :], mask=mask, other=0.0)
        d_p = tl.load(dr + d_off + partner[None, :], mask=mask, other=0.0)
        tl.store(dpre + d_off + offs_n[None, :], d_n * cos - sign[None, :] * d_p * sin, mask=mask)
        dth += d_p * r_n - d_n * r_p                                             # on a pair's first channel
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dth = tl.sum(tl.reshape(dth, (BLOCK_T, R, BLOCK_N)), 1)
    keep = (ts < T)[:, None] & (offs_n < N)[None, :] & (sign < 0)[None, :] & (pair < S)[None, :]
    tl.store(DTH + ((pid_b * T + ts) * (H * S) + pid_h * S)[:, None] + pair[None, :], dth, mask=keep)


# Triton's CPU interpreter computes bf16 / fp16 tl.dot wrongly (Triton 3.9), so it gets fp32 operands.
INTERPRETED = interpreter_enabled()


def _dot_dtype(dtype: torch.dtype) -> tuple[torch.dtype, str | None, str]:
    # (operand dtype, precision of the chunk's own dots, precision of the state's fp32 dots).
    # bf16 / fp16 inputs feed tl.dot in their own dtype (fp32 accumulation; no input precision to pick)
    # and the fp32 state's products run as tf32 (finer than the bf16 operands mamba_ssm rounds the
    # state to); fp32 inputs are IEEE fp32 throughout.
    if dtype in (torch.bfloat16, torch.float16) and not INTERPRETED:
        return dtype, None, "tf32"
    return torch.float32, "ieee", "ieee"


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_in, k_in, q_bias, k_bias, th, x, adt, scale, gamma, h0, D, z, mimo_z, mimo_o, mimo, chunk_size,
                in_dtype, tuning):
        Bsz, T, R, G, N = q_in.shape
        H, P, S = x.shape[3], x.shape[4], th.shape[-1]
        dev = x.device
        dd, prec, state_prec = _dot_dtype(in_dtype)
        q_, k_, th_ = (t.float().contiguous() for t in (q_in, k_in, th))
        qb_, kb_ = (t.transpose(0, 1).float().contiguous() for t in (q_bias, k_bias))  # [R, H, N] -> [H, R, N]
        x_ = x.to(dd).contiguous()
        adt_, scale_, gamma_ = (t.float().contiguous() for t in (adt, scale, gamma))
        h0_ = h0.float().contiguous()
        D_, mz_, mo_ = (None if t is None else t.float().contiguous() for t in (D, mimo_z, mimo_o))
        z_ = None if z is None else z.contiguous()
        fold = mimo_o is not None
        block_t, fbn, fbp, _, _ = _blocks(R, N, P, chunk_size, tuning)
        nchunks = triton.cdiv(T, block_t)
        y = torch.empty((Bsz, T, H, P) if fold else (Bsz, T, R, H, P), device=dev, dtype=torch.float32)
        hf = torch.empty(Bsz, H, P, N, device=dev, dtype=torch.float32)
        store = any(ctx.needs_input_grad)  # each chunk's starting state, for the backward only
        hc = torch.empty(Bsz, H, nchunks if store else 1, P, N, device=dev, dtype=torch.float32)
        store_ypre = store and (z is not None or fold)  # the scan's output before the gate, for the backward
        ypre = torch.empty(Bsz, T, R, H, P, device=dev) if store_ypre else hf
        none = adt_  # any tensor stands for an absent one (the kernel does not read it)
        _chunk_fwd_kernel[(H, Bsz, triton.cdiv(P, fbp))](
            q_, k_, qb_, kb_, th_, x_, adt_, scale_, gamma_, h0_, D_ if D is not None else none,
            z_ if z is not None else none, mz_ if mimo_z is not None else none, mo_ if fold else none, y, ypre, hf, hc,
            T, H, N, P, G, S, HALVES=mimo, R=R,
            BLOCK_T=block_t, BLOCK_N=fbn, BLOCK_P=fbp, STORE_STATES=store, PREC=prec, STATE_PREC=state_prec,
            HAS_D=D is not None, HAS_Z=z is not None, MIMO=mimo, FOLD=fold, STORE_YPRE=store_ypre,
            num_warps=tuning.fwd_num_warps, num_stages=tuning.num_stages)
        ctx.save_for_backward(q_, k_, qb_, kb_, th_, x_, adt_, scale_, gamma_, hc, D_, z_, mz_, mo_,
                              ypre if store_ypre else None)
        ctx.meta = (chunk_size, tuning, prec, state_prec, q_in.dtype, x.dtype, mimo)
        return y.to(x.dtype), hf.to(h0.dtype)

    @staticmethod
    def backward(ctx, dy, dhf):
        q_, k_, qb_, kb_, th_, x_, adt_, scale_, gamma_, hc, D_, z_, mz_, mo_, ypre = ctx.saved_tensors
        chunk_size, tuning, prec, state_prec, q_dtype, x_dtype, mimo = ctx.meta
        Bsz, T, R, G, N = q_.shape
        H, P, S = x_.shape[3], x_.shape[4], th_.shape[-1]
        fold = mo_ is not None
        block_t, _, _, bbn, bbp = _blocks(R, N, P, chunk_size, tuning)
        slices = triton.cdiv(N, bbn)
        dev = q_.device
        y_shape = (Bsz, T, H, P) if fold else (Bsz, T, R, H, P)
        dy = torch.zeros(y_shape, device=dev) if dy is None else dy.float().contiguous()
        dhf = torch.zeros(Bsz, H, P, N, device=dev) if dhf is None else dhf.float().contiguous()
        dq, dk = (torch.empty(Bsz, T, R, H, N, device=dev) for _ in range(2))
        dx = torch.empty(slices, Bsz, T, R, H, P, device=dev)           # partial sums over the N slices
        dadt, dscale, dgamma = (torch.empty(slices, Bsz, T, R, H, device=dev) for _ in range(3))
        dh0 = torch.empty(Bsz, H, P, N, device=dev)
        dz = None if z_ is None else torch.empty(Bsz, T, H, P, device=dev)
        dD = None if D_ is None else torch.empty(Bsz, H, device=dev)              # per-batch partials
        dmz = None if mz_ is None else torch.empty(Bsz, H, R, P, device=dev)
        dmo = None if mo_ is None else torch.empty(Bsz, H, R, P, device=dev)
        none = adt_
        dypre = dy
        if z_ is not None or fold or D_ is not None:
            write = z_ is not None or fold
            dypre = torch.empty(Bsz, T, R, H, P, device=dev) if write else dy
            _epilogue_bwd_kernel[(H, Bsz)](
                x_, *(none if t is None else t for t in (D_, z_, mz_, mo_, ypre)), dy, dypre,
                *(none if t is None else t for t in (dz, dD, dmz, dmo)), T, H, P, R=R, BLOCK_T=block_t, BLOCK_P=bbp,
                HAS_D=D_ is not None, HAS_Z=z_ is not None, MIMO=mimo, FOLD=fold, WRITE_DYPRE=write,
                num_warps=4)
        _chunk_bwd_kernel[(H, Bsz, slices)](
            q_, k_, qb_, kb_, th_, x_, adt_, scale_, gamma_, hc, none if D_ is None else D_, dypre, dhf, dq, dk, dx,
            dadt, dscale, dgamma, dh0, T, H, N, P, G, S, Bsz, HALVES=mimo, R=R, BLOCK_T=block_t, BLOCK_N=bbn,
            BLOCK_P=bbp, PREC=prec,
            STATE_PREC=state_prec, HAS_D=D_ is not None, num_warps=tuning.bwd_num_warps,
            num_stages=tuning.num_stages)
        dx, dadt, dscale, dgamma = (t[0] if slices == 1 else t.sum(0) for t in (dx, dadt, dscale, dgamma))
        # Back through the bias and rotation (done on load), then the sums over a group's heads and the
        # bias's (B, T).
        dqp, dkp = torch.empty_like(dq), torch.empty_like(dk)
        dth = torch.empty(Bsz, T, H, S, device=dev)
        ub_t = _unrotate_rows(R)
        _unrotate_kernel[(triton.cdiv(T, ub_t), Bsz, H)](
            q_, k_, qb_, kb_, th_, dq, dk, dqp, dkp, dth, T, H, N, G, S, R=R, BLOCK_T=ub_t,
            BLOCK_N=max(16, triton.next_power_of_2(N)), HALVES=mimo, num_warps=4)
        dq_in, dk_in = (t.unflatten(3, (G, H // G)).sum(4) for t in (dqp, dkp))
        dqb, dkb = dqp.sum((0, 1)), dkp.sum((0, 1))                               # [R, H, N]
        return (dq_in.to(q_dtype), dk_in.to(q_dtype), dqb, dkb, dth, dx.to(x_dtype), dadt[:, :, 0],
                dscale.sum(2), dgamma.sum(2), dh0, None if dD is None else dD.sum(0),
                None if dz is None else dz.to(z_.dtype), None if dmz is None else dmz.sum(0),
                None if dmo is None else dmo.sum(0), None, None, None, None)


def chunk_scan_triton(q_in, k_in, q_bias, k_bias, th, x, adt, scale, gamma, h0, chunk_size, D=None, z=None,
                      mimo_z=None, mimo_o=None, mimo=False, in_dtype=None, tuning=None):
    """The rotation of q_in / k_in [B, T, R, G, N] (plus q_bias / k_bias [R, H, N]) by theta [B, T, H, S],
    ``chunk_scan_torch`` and the epilogue by the Triton kernels: the output after the skip ``D`` [H],
    the gate ``silu(z mimo_z)`` (z [B, T, H, P]) and the fold by ``mimo_o`` [H, R, P] (y [B, T, H, P], or
    [B, T, R, H, P] without ``mimo_o``), and the final carried state [B, H, P, N].

    ``in_dtype`` (the op's input dtype) picks the ``tl.dot`` operand dtype (default: qr's); ``tuning``
    the launch (default: ``Mamba3Tuning()``)."""
    return _ChunkScan.apply(q_in, k_in, q_bias, k_bias, th, x, adt, scale, gamma, h0, D, z, mimo_z, mimo_o, mimo,
                            chunk_size, in_dtype or q_in.dtype, tuning or Mamba3Tuning())
