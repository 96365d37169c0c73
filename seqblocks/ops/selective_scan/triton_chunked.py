"""Chunked Triton kernels of the selective scan: ``SelectiveScanTuning(kernel="chunked")``.

Imported only by ``seqblocks/ops/selective_scan/triton.py`` (``selective_scan_triton``) for a call whose
tuning asks for them; the ring kernels there stay the default. Same contract, same inputs and outputs,
same checkpoint format.

Design (see docs/kernels.md, "Chunked kernels"):

- One program owns one sequence and ``BLOCK_D`` channels (inside one group of B / C) and walks the
  sequence in chunks of ``BLOCK_T`` steps. Per chunk it loads [BLOCK_T, BLOCK_D] tiles of u, delta, z
  (delta_A, dy) and [BLOCK_T, N] tiles of B and C in one go, discretises them into
  [BLOCK_T, BLOCK_N, BLOCK_D] register tiles (time, state, channel) and composes the chunk's steps with
  ``tl.associative_scan`` along time; the carried [BLOCK_N, BLOCK_D] state enters the first step's
  input (``x_0 + Ā_0 h``), so the scan's products of Ā go unused. With the default layout Triton gives
  these tiles (lanes over channels, then states; time inside the thread) the scan runs inside the
  thread, and every sum over the state (the readout, du, ddt) is mostly in-thread; nothing is reduced
  or stored per step. The next chunk's tiles are loaded while one is computed.
- The forward stores the state every ``CKPT_T`` steps (only when gradients are needed).
- The backward walks the chunks from the end. It recomputes a chunk's states with the same scan from
  the chunk's start state, and runs the adjoint ``δ_t = C_t g_t + Ā_{t+1} δ_{t+1}`` as a reverse
  associative scan over (Ā_{t+1}, C_t g_t) (Ā_{t+1} from the delta tile one step later, a second
  exp rather than a shift of the register tile); the δ after the chunk is carried in registers and
  enters the chunk's last row. Every
  gradient of the chunk is then a whole-tile product with one reduction: over the channels for dB and
  dC ([BLOCK_T, N] per chunk, written as per-channel-block partial sums and summed by one torch
  reduction), over the state for du / ddelta / d delta_A, over time for dA, dD, d delta_bias (fp32
  accumulators in registers, added atomically once per program). With checkpoints sparser than the
  chunk (``CKPT_T > BLOCK_T``) the backward first rebuilds the chunk-start states of a checkpoint
  segment in one forward pass into a per-program scratch slot (L2-resident), as the ring backward does.
- The gradient through ``Ā`` uses ``Ā_t h_{t-1} = h_t - B̄u_t`` (no shifted state); ``dh0 = Ā_0 δ_0``
  with ``Ā_0`` recomputed from the first row after the walk.

Block shapes come from the call's ``SelectiveScanTuning`` (defaults in ``chunked_blocks``). Real A,
B, C; shapes: B batch, T time, D channels, N state (padded to a power of two on chip), G groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops.scan.triton import seq_bounds
from seqblocks.ops.selective_scan._triton_common import (
    _METHODS,
    INTERPRETED,
    _discretize_row,
    _ex2,
    _grad_buffers,
    _grads,
    _largest_pow2_divisor,
    _next_pow2,
    _prep,
    _sigmoid_f,
    _softplus_f,
    _z_strides,
)
from seqblocks.ops.selective_scan.tuning import SelectiveScanTuning

__all__ = ["chunked_blocks", "selective_scan_chunked"]


@triton.jit
def _combine(a1, x1, a2, x2):
    # (h -> a2 (a1 h + x1) + x2): the earlier element first (a reverse scan passes the later one first).
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _tile(base, t0, s_t, off, mask):
    # One chunk's tile: base points at the sequence's first step (a scalar), off holds the tile's
    # loop-invariant int32 offsets from the chunk's first step t0; masked elements read 0.
    return tl.load(base + t0 * s_t + off, mask=mask, other=0.0)


@triton.jit
def _raw(u_b, d_b, a_b, z_b, B_b, C_b, t0, L, rows, nmask, s_t, s_dAt, s_zt, s_Bt, off, off_a, off_z, off_n,
         HAS_DA: tl.constexpr, HAS_Z: tl.constexpr, WANT_C: tl.constexpr):
    # The chunk at t0 as loaded (input dtypes, no arithmetic, so that a prefetch waits for nothing):
    # [BLOCK_T, BLOCK_D] rows of u, delta, delta_A, z and [BLOCK_T, BLOCK_N] rows of B, C; rows past
    # the end are 0. Rows not wanted are placeholders of the same type.
    m = (rows < L - t0)[:, None]
    uu = _tile(u_b, t0, s_t, off, m)
    dr = _tile(d_b, t0, s_t, off, m)
    ar = dr
    if HAS_DA:
        ar = _tile(a_b, t0, s_dAt, off_a, m)
    zz = uu
    if HAS_Z:
        zz = _tile(z_b, t0, s_zt, off_z, m)
    mn = m & nmask[None, :]
    Bt = _tile(B_b, t0, s_Bt, off_n, mn)
    Ct = Bt
    if WANT_C:
        Ct = _tile(C_b, t0, s_Bt, off_n, mn)
    return uu, dr, ar, zz, Bt, Ct


@triton.jit
def _steps(dt_raw, dtA_raw, bias, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
           HAS_DA: tl.constexpr, FAST: tl.constexpr):
    # (delta + bias before softplus, dt, dt_A) as fp32 [BLOCK_T, BLOCK_D] tiles; rows past the end get
    # dt = 0 (and a dt_A loaded as 0), so that Ā = 1 and no input: the state passes through them.
    raw = dt_raw.to(tl.float32)
    if HAS_BIAS:
        raw += bias
    d = raw
    if SOFTPLUS:
        d = _softplus_f(raw, FAST)
    d = tl.where(valid[:, None], d, 0.0)
    dA = d
    if HAS_DA:
        dA = dtA_raw.to(tl.float32)
    return raw, d, dA


@triton.jit
def _chunk_states(h, A3, A23, d, dA, u, Bt, rows, METHOD: tl.constexpr, HAS_DA: tl.constexpr,
                  FAST: tl.constexpr):
    # The chunk's states h_t ([BLOCK_T, BLOCK_N, BLOCK_D]) from the start state h ([BLOCK_N, BLOCK_D]),
    # with the per-step (x = γ B u, γ, E). The start state enters the first step's input
    # (x_0 + Ā_0 h), so the scan's products of Ā are never used (and not computed: time lies in
    # the thread).
    Abar, gamma, E = _discretize_row(A3, A23, d[:, None, :], dA[:, None, :], METHOD, HAS_DA, FAST)
    B3 = Bt[:, :, None]
    if METHOD == 0 or METHOD == 3:
        x = B3 * (gamma * u[:, None, :])  # γ per channel: one product per state element
    else:
        x = gamma * (B3 * u[:, None, :])
    x0 = tl.where(rows[:, None, None] == 0, x + Abar * h[None, :, :], x)
    _P, hs = tl.associative_scan((Abar, x0), 0, _combine)
    return hs, x, gamma, E


@triton.jit
def _last_row(x, rows, BLOCK_T: tl.constexpr):
    # x[BLOCK_T - 1] of a [BLOCK_T, ...] tile (time lies inside the thread: no data moves)
    return tl.sum(tl.where(rows[:, None, None] == BLOCK_T - 1, x, 0.0), axis=0)


@triton.jit
def _first_row(x, rows):
    return tl.sum(tl.where(rows[:, None, None] == 0, x, 0.0), axis=0)


@triton.jit
def _abar(A3, A23, dA, METHOD: tl.constexpr, FAST: tl.constexpr):
    # Ā alone ([BLOCK_T, BLOCK_N, BLOCK_D]) for dt_A tiles [BLOCK_T, BLOCK_D], rounded as in _chunk_states
    dA3 = dA[:, None, :]
    if METHOD == 2:
        s = dA3 * A3 * 0.5
        return (1.0 + s) / (1.0 - s)
    elif METHOD == 1:
        return tl.exp(dA3 * A3)
    else:
        return _ex2(dA3 * A23, FAST)


@triton.jit
def _ss_fwd_chunked_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, h0_ptr,
    y_ptr, hT_ptr, ck_ptr, lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt,
    CKPT_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SEQ_MODE: tl.constexpr,
    SAVE: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr,
):
    # The forward over chunks of BLOCK_T steps; the next chunk's tiles are loaded while the current
    # one is computed (loop-carried raw values, a few registers each in their load layout).
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    d0 = pid_d * BLOCK_D
    dd = d0 + tl.arange(0, BLOCK_D)  # BLOCK_D divides the channels of a group: no channel mask
    nn = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    if EVEN_N:
        nmask = nn < BLOCK_N
    else:
        nmask = nn < N
    grp = d0 // CH_PER_G
    sn_off = dd[None, :] * N + nn[:, None]  # [BLOCK_N, BLOCK_D] into a [D, N] tensor
    sn_mask = nmask[:, None]
    A = tl.load(A_ptr + sn_off, mask=sn_mask, other=0.0).to(tl.float32)
    A3 = A[None, :, :]
    A23 = A3 * 1.4426950408889634
    st_off = pid_s.to(tl.int64) * Dm * N + sn_off
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + st_off, mask=sn_mask, other=0.0)
    bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + dd)[None, :].to(tl.float32)
    Dv = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + dd)[None, :].to(tl.float32)
    # the sequence's first step in each tensor, and the tiles' offsets from a chunk's first step
    u_b = u_ptr + row * s_b + start * s_t
    d_b = delta_ptr + row * s_b + start * s_t
    y_b = y_ptr + row * s_b + start * s_t
    a_b = dA_ptr + row * s_dAb + start * s_dAt
    z_b = z_ptr + row * s_zb + start * s_zt
    B_b = B_ptr + row * s_Bb + start * s_Bt + grp * s_Bg
    C_b = C_ptr + row * s_Bb + start * s_Bt + grp * s_Bg
    off = rows[:, None] * s_t + dd[None, :]
    off_a = rows[:, None] * s_dAt + dd[None, :] * s_dAd
    off_z = rows[:, None] * s_zt + dd[None, :]
    off_n = rows[:, None] * s_Bt + nn[None, :]
    u_n, d_n, a_n, z_n, B_n, C_n = _raw(u_b, d_b, a_b, z_b, B_b, C_b, 0, L, rows, nmask, s_t, s_dAt, s_zt, s_Bt,
                                        off, off_a, off_z, off_n, HAS_DA, HAS_Z, True)
    for c in range(0, tl.cdiv(L, BLOCK_T)):
        t0 = c * BLOCK_T
        if SAVE:
            # BLOCK_T divides CKPT_T: a checkpoint falls on the first step of a chunk
            if t0 % CKPT_T == 0:
                tl.store(ck_ptr + (pid_s.to(tl.int64) * NC + t0 // CKPT_T) * Dm * N + sn_off, h, mask=sn_mask)
        uu, dr, ar, zz, Bt, Ct = u_n, d_n, a_n, z_n, B_n, C_n
        # the next chunk (past the end: masked off, never used)
        u_n, d_n, a_n, z_n, B_n, C_n = _raw(u_b, d_b, a_b, z_b, B_b, C_b, t0 + BLOCK_T, L, rows, nmask, s_t, s_dAt,
                                            s_zt, s_Bt, off, off_a, off_z, off_n, HAS_DA, HAS_Z, True)
        valid = rows < L - t0
        u = uu.to(tl.float32)
        _raw_d, d, dA = _steps(dr, ar, bias, valid, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
        hs, _x, _g, _E = _chunk_states(h, A3, A23, d, dA, u, Bt, rows, METHOD, HAS_DA, FAST)
        y = tl.sum(Ct[:, :, None] * hs, axis=1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            zf = zz.to(tl.float32)
            y = y * zf * _sigmoid_f(zf, FAST)
        tl.store(y_b + t0 * s_t + off, y.to(y_ptr.dtype.element_ty), mask=valid[:, None])
        h = _last_row(hs, rows, BLOCK_T)
    tl.store(hT_ptr + st_off, h, mask=sn_mask)


@triton.jit
def _ss_bwd_chunked_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, ck_ptr,
    gy_ptr, ghT_ptr, sub_ptr,
    du_ptr, ddelta_ptr, dAm_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, ddA_ptr, dh0_ptr,
    lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G, n_rows,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt, s_ddAb, s_ddAt, s_ddAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    DA_SHARED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SEQ_MODE: tl.constexpr,
    HAS_GT: tl.constexpr, FAST: tl.constexpr, SUB: tl.constexpr, EVEN_N: tl.constexpr,
):
    # Chunks of BLOCK_T steps from the end; the tiles of the chunk before are loaded while the current
    # one is computed. carry = δ at the step after the chunk (the final state's cotangent after the
    # last one). With SUB > 1 the forward kept the state every SUB chunks; on entering a segment (its
    # last chunk, visited first) its chunk-start states are rebuilt into this program's scratch slot
    # (SUB x BLOCK_N x BLOCK_D fp32, L2-resident) by one forward pass.
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    d0 = pid_d * BLOCK_D
    dd = d0 + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    if EVEN_N:
        nmask = nn < BLOCK_N
    else:
        nmask = nn < N
    grp = d0 // CH_PER_G
    sn_off = dd[None, :] * N + nn[:, None]
    sn_mask = nmask[:, None]
    A = tl.load(A_ptr + sn_off, mask=sn_mask, other=0.0).to(tl.float32)
    A3 = A[None, :, :]
    A23 = A3 * 1.4426950408889634
    st_off = pid_s.to(tl.int64) * Dm * N + sn_off
    ck_b = ck_ptr + pid_s.to(tl.int64) * NC * Dm * N + sn_off
    slot = sub_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_d) * (SUB * BLOCK_N * BLOCK_D) \
        + nn[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    HS: tl.constexpr = BLOCK_N * BLOCK_D
    carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_GT:
        carry = tl.load(ghT_ptr + st_off, mask=sn_mask, other=0.0)
    bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + dd)[None, :].to(tl.float32)
    Dv = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + dd)[None, :].to(tl.float32)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # the sequence's first step in each tensor (du, ddelta, dz, dy are laid out like u), and the
    # tiles' offsets from a chunk's first step
    first = row * s_b + start * s_t
    u_b = u_ptr + first
    d_b = delta_ptr + first
    g_b = gy_ptr + first
    du_b = du_ptr + first
    ddt_b = ddelta_ptr + first
    dz_b = dz_ptr + first
    a_b = dA_ptr + row * s_dAb + start * s_dAt
    dda_b = ddA_ptr + row * s_ddAb + start * s_ddAt
    z_b = z_ptr + row * s_zb + start * s_zt
    B_b = B_ptr + row * s_Bb + start * s_Bt + grp * s_Bg
    C_b = C_ptr + row * s_Bb + start * s_Bt + grp * s_Bg
    part = ((pid_d * n_rows + row) * T + start) * N  # dB / dC partial sums of this channel block
    dB_b = dB_ptr + part
    dC_b = dC_ptr + part
    off = rows[:, None] * s_t + dd[None, :]
    off_a = rows[:, None] * s_dAt + dd[None, :] * s_dAd
    off_z = rows[:, None] * s_zt + dd[None, :]
    off_n = rows[:, None] * s_Bt + nn[None, :]
    off_bn = rows[:, None] * N + nn[None, :]
    off_dda = rows[:, None] * s_ddAt + dd[None, :] * s_ddAd
    n_chunks = tl.cdiv(L, BLOCK_T)
    # the last chunk's tiles: u, delta, delta_A, z, B, C; dy; delta, delta_A one step later (Ā_{t+1})
    tp = tl.maximum(n_chunks - 1, 0) * BLOCK_T  # an empty sequence loads nothing (all masked)
    u_p, d_p, a_p, z_p, B_p, C_p = _raw(u_b, d_b, a_b, z_b, B_b, C_b, tp, L, rows, nmask, s_t, s_dAt, s_zt, s_Bt,
                                        off, off_a, off_z, off_n, HAS_DA, HAS_Z, True)
    g_p = _tile(g_b, tp, s_t, off, (rows < L - tp)[:, None])
    dn_p = _tile(d_b, tp + 1, s_t, off, (rows < L - tp - 1)[:, None])
    an_p = dn_p
    if HAS_DA:
        an_p = _tile(a_b, tp + 1, s_dAt, off_a, (rows < L - tp - 1)[:, None])
    h_p = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if SUB == 1:
        h_p = tl.load(ck_b + tl.maximum(n_chunks - 1, 0) * Dm * N, mask=sn_mask, other=0.0)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * BLOCK_T
        uu, dr, ar, zz, Bt, Ct, gr, dr_n, ar_n, h = u_p, d_p, a_p, z_p, B_p, C_p, g_p, dn_p, an_p, h_p
        # prefetch the chunk before (the first chunk reloads itself: harmless, never used)
        tp = tl.maximum(c - 1, 0) * BLOCK_T
        u_p, d_p, a_p, z_p, B_p, C_p = _raw(u_b, d_b, a_b, z_b, B_b, C_b, tp, L, rows, nmask, s_t, s_dAt, s_zt,
                                            s_Bt, off, off_a, off_z, off_n, HAS_DA, HAS_Z, True)
        g_p = _tile(g_b, tp, s_t, off, (rows < L - tp)[:, None])
        dn_p = _tile(d_b, tp + 1, s_t, off, (rows < L - tp - 1)[:, None])
        if HAS_DA:
            an_p = _tile(a_b, tp + 1, s_dAt, off_a, (rows < L - tp - 1)[:, None])
        if SUB == 1:
            h_p = tl.load(ck_b + tl.maximum(c - 1, 0) * Dm * N, mask=sn_mask, other=0.0)
        else:
            seg0 = (c // SUB) * SUB
            if (c == n_chunks - 1) | (c % SUB == SUB - 1):
                # rebuild the segment's chunk starts (a forward pass over chunks seg0 .. c - 1, whose
                # tiles are prefetched like the forward kernel's)
                hq = tl.load(ck_b + (c // SUB) * Dm * N, mask=sn_mask, other=0.0)
                tl.store(slot, hq)
                q_u, q_d, q_a, _qz, q_B, _qC = _raw(u_b, d_b, a_b, z_b, B_b, C_b, seg0 * BLOCK_T, L, rows, nmask,
                                                    s_t, s_dAt, s_zt, s_Bt, off, off_a, off_z, off_n,
                                                    HAS_DA, False, False)
                for j in range(seg0, c):
                    q0 = j * BLOCK_T
                    uq, dq, aq, Bq = q_u, q_d, q_a, q_B
                    q_u, q_d, q_a, _qz, q_B, _qC = _raw(u_b, d_b, a_b, z_b, B_b, C_b, q0 + BLOCK_T, L, rows, nmask,
                                                        s_t, s_dAt, s_zt, s_Bt, off, off_a, off_z, off_n,
                                                        HAS_DA, False, False)
                    _rq, dq2, aq2 = _steps(dq, aq, bias, rows < L - q0, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
                    hs_q, _xq, _gq, _Eq = _chunk_states(hq, A3, A23, dq2, aq2, uq.to(tl.float32), Bq, rows,
                                                        METHOD, HAS_DA, FAST)
                    hq = _last_row(hs_q, rows, BLOCK_T)
                    tl.store(slot + (j + 1 - seg0) * HS, hq)
            h = tl.load(slot + (c - seg0) * HS)
        valid = rows < L - t0
        u = uu.to(tl.float32)
        g = gr.to(tl.float32)
        raw, d, dA = _steps(dr, ar, bias, valid, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
        hs, x, gamma, E = _chunk_states(h, A3, A23, d, dA, u, Bt, rows, METHOD, HAS_DA, FAST)
        # the output cotangent through the gate and the skip
        C3 = Ct[:, :, None]
        vm = valid[:, None]
        if HAS_Z:
            zf = zz.to(tl.float32)
            sg = _sigmoid_f(zf, FAST)
            ypre = tl.sum(C3 * hs, axis=1)
            if HAS_D:
                ypre += Dv * u
            dz = g * ypre * sg * (1.0 + zf * (1.0 - sg))
            tl.store(dz_b + t0 * s_t + off, dz.to(dz_ptr.dtype.element_ty), mask=vm)
            g = g * zf * sg
        if HAS_D:
            dD_acc += tl.sum(g * u, axis=0)
        # dC[t, n] = sum_d g h: this channel block's partial sum; after it only h - x is needed
        mbn = vm & nmask[None, :]
        tl.store(dC_b + t0 * N + off_bn, tl.sum(g[:, None, :] * hs, axis=2), mask=mbn)
        hmx = hs - x  # Ā_t h_{t-1}
        # adjoint δ_t = C_t g_t + Ā_{t+1} δ_{t+1} (past the end Ā = 1), the carry entering at the
        # chunk's last row
        _rn, _dn, dA_n = _steps(dr_n, ar_n, bias, rows < L - t0 - 1, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
        An = _abar(A3, A23, dA_n, METHOD, FAST)
        cg = C3 * g[:, None, :]
        cg = tl.where(rows[:, None, None] == BLOCK_T - 1, cg + An * carry[None, :, :], cg)
        _R, delta = tl.associative_scan((An, cg), 0, _combine, reverse=True)
        # δ is not masked: on rows past the end u, g and dt_A are 0, so it adds to no gradient but
        # those of the same rows, which are masked (ddelta, d delta_A) or not stored; on padded states
        # C, B, A and the carry are 0, and so is δ.
        # dB[t, n] = sum_d δ γ u: this channel block's partial sum
        if METHOD == 0 or METHOD == 3:
            tl.store(dB_b + t0 * N + off_bn, tl.sum(delta * (gamma * u[:, None, :]), axis=2), mask=mbn)
            S = tl.sum(delta * Bt[:, :, None], axis=1)  # sum_n δ B
            if METHOD == 0:
                du = d * S
            else:
                du = S
        else:
            tl.store(dB_b + t0 * N + off_bn, tl.sum(delta * gamma * u[:, None, :], axis=2), mask=mbn)
            du = tl.sum(delta * gamma * Bt[:, :, None], axis=1)
        if HAS_D:
            du += g * Dv
        tl.store(du_b + t0 * s_t + off, du.to(du_ptr.dtype.element_ty), mask=vm)
        # through Ā, with Ā_t h_{t-1} = h_t - x_t
        hx = delta * hmx
        dA3 = dA[:, None, :]
        if METHOD == 2:
            s_ = dA3 * A3 * 0.5
            w = hx / ((1.0 + s_) * (1.0 - s_))
            w = tl.where(nmask[None, :, None], w, 0.0)  # padded states: 0 / 0
        else:
            w = hx
        ddtA = tl.sum(w * A3, axis=1)
        dA_acc += tl.sum(w * dA3, axis=0)
        # through γ
        if METHOD == 0:
            ddt = u * S
        elif METHOD == 1:
            dgam = delta * (Bt[:, :, None] * u[:, None, :])
            ddt = tl.sum(dgam * E, axis=1)
            d3 = d[:, None, :]
            zt = d3 * A3
            small = tl.abs(zt) < 1e-2
            safeA = tl.where(small, 1.0, A3)
            ser = d3 * d3 * (0.5 + zt * (1.0 / 3.0 + zt * (0.125 + zt / 30.0)))
            dA_acc += tl.sum(dgam * tl.where(small, ser, (d3 * E - gamma) / safeA), axis=0)
        elif METHOD == 2:
            dgam = delta * (Bt[:, :, None] * u[:, None, :])
            d3 = d[:, None, :]
            q = 1.0 / (1.0 - d3 * A3 * 0.5)
            ddt = tl.sum(dgam * q * q, axis=1)
            dA_acc += tl.sum(dgam * (0.5 * d3 * d3) * q * q, axis=0)
        else:
            ddt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if HAS_DA:
            if DA_SHARED:
                tl.atomic_add(dda_b + (t0 + rows) * s_ddAt, tl.sum(ddtA, axis=1), mask=valid)
            else:
                tl.store(dda_b + t0 * s_ddAt + off_dda, ddtA.to(ddA_ptr.dtype.element_ty), mask=vm)
        else:
            ddt += ddtA
        if SOFTPLUS:
            ddt = ddt * _sigmoid_f(raw, FAST)
        ddt = tl.where(vm, ddt, 0.0)
        tl.store(ddt_b + t0 * s_t + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=vm)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
        carry = _first_row(delta, rows)
    # dh0 = Ā_0 δ_0 (an empty sequence passes the final state's cotangent through)
    v0 = rows < tl.minimum(L, 1)
    d0r = _tile(d_b, 0, s_t, off, v0[:, None])
    a0r = d0r
    if HAS_DA:
        a0r = _tile(a_b, 0, s_dAt, off_a, v0[:, None])
    _r0, _d0, dA0 = _steps(d0r, a0r, bias, v0, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
    dh0 = _first_row(_abar(A3, A23, dA0, METHOD, FAST), rows) * carry
    tl.store(dh0_ptr + st_off, dh0, mask=sn_mask)
    tl.atomic_add(dAm_ptr + sn_off, dA_acc, mask=sn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + dd, dD_acc)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + dd, dbias_acc)


def chunked_blocks(N: int, ch_per_g: int, T: int, tuning: SelectiveScanTuning):
    """Launch shapes of the chunked kernels: ``((fwd BLOCK_T, BLOCK_D, warps, maxnreg), (bwd ...),
    BLOCK_N, checkpoint interval)``; ``tuning``'s values, defaults for its None fields.

    Defaults (docs/kernels.md): 8 channels a program, so that the lanes cover 8 channels x 4 state
    groups (a sum over the state is mostly in-thread, one over the channels 3 shuffle levels); one warp
    up to d_state 64 (forward) / 32 (backward); chunks of 32 (forward) / 16 (backward) tile elements
    per thread: 8 / 4 steps at d_state 16, where the backward is capped at 168 registers; checkpoints
    every 128 steps. Interpreted: 4 x 4 tiles, checkpoints every 2 chunks, so that the tests cross
    chunks and segments. Chunks are at most the next power of two >= T; BLOCK_D divides the channels
    of a group."""
    bn = max(_next_pow2(N), 2)
    top = _next_pow2(max(T, 1))
    cap = _largest_pow2_divisor(ch_per_g)
    out = []
    for per_thread, per_warp, fields in (
            (32, 512, (tuning.fwd_chunk_t, tuning.fwd_block_d, tuning.fwd_num_warps, tuning.fwd_maxnreg)),
            (16, 256, (tuning.chunk_t, tuning.bwd_block_d, tuning.bwd_num_warps, tuning.bwd_maxnreg))):
        bt_f, bd_f, w_f, reg_f = fields
        if INTERPRETED:
            bt, bd, warps = 4, 4, 1
        else:
            bd = 8
            warps = max(1, min(8, bn * bd // per_warp))
            bt = max(2, min(64, 32 * per_thread * warps // (bn * bd)))
        bd = max(1, min(bd if bd_f is None else bd_f, cap))
        warps = warps if w_f is None else w_f
        bt = min(bt if bt_f is None else bt_f, top)
        reg = reg_f
        if reg is None and per_thread == 16 and not INTERPRETED and bn == 16 and warps == 1 and bt * bd <= 32:
            reg = 168
        out.append((bt, bd, warps, reg))
    ck = (2 * out[1][0] if INTERPRETED else 128) if tuning.ckpt_t is None else tuning.ckpt_t
    return out[0], out[1], bn, max(ck, out[0][0], out[1][0])


def _reg_option(reg):
    return {} if reg is None else {"maxnreg": reg}


class _SelectiveScanChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_A, h0, opts):
        softplus, method, lengths, cu_seqlens, tuning = opts
        p = _prep(u, delta, A, B, C, delta_A, lengths, cu_seqlens, tuning)
        (bt, bd, warps, reg), bwd, bn, ck_t = chunked_blocks(p.N, p.ch_per_g, p.T, tuning)
        nc = max(1, -(-p.T // ck_t))
        u_, delta_ = u.contiguous(), delta.contiguous()
        z_ = z if z is None or z.stride(-1) == 1 else z.contiguous()  # read through its strides
        A_ = A.contiguous()
        dummy = p.lens
        alloc = torch.zeros if p.seq_mode == 1 else torch.empty
        y = alloc(u.shape, dtype=u.dtype, device=u.device)
        hT = torch.empty((p.n_seq, p.D, p.N), dtype=torch.float32, device=u.device)
        save = any(ctx.needs_input_grad[:10])
        ck = torch.empty((p.n_seq, nc, p.D, p.N), dtype=torch.float32, device=u.device) if save else hT
        h0_ = h0.to(torch.float32).contiguous() if h0 is not None else hT
        _ss_fwd_chunked_kernel[(p.n_seq, p.D // bd)](
            u_, delta_, A_, p.B4, p.C4, D if D is not None else dummy, z_ if z_ is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, h0_, y, hT, ck, p.lens, p.cu,
            p.T, p.D, p.N, nc, p.ch_per_g, u_.stride(0), u_.stride(1), p.B4.stride(0), p.B4.stride(1),
            p.B4.stride(2), *p.dA_strides, *_z_strides(z_),
            CKPT_T=ck_t, BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SEQ_MODE=p.seq_mode,
            SAVE=save, FAST=not INTERPRETED, EVEN_N=p.N == bn, num_warps=warps, **_reg_option(reg),
        )
        ctx.save_for_backward(u_, delta_, A_, D, z_, delta_bias, delta_A, h0, ck, lengths, cu_seqlens)
        ctx.Bs = (p.B4, p.C4, B.shape, C.shape, B.dtype, C.dtype)
        ctx.opts = (softplus, method, tuning, bwd, bn, ck_t, nc)
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        u, delta, A, D, z, delta_bias, delta_A, h0, ck, lengths, cu_seqlens = ctx.saved_tensors
        B4, C4, Bshape, Cshape, Bdt, Cdt = ctx.Bs
        softplus, method, tuning, (bt, bd, warps, reg), bn, ck_t, nc = ctx.opts
        p = _prep(u, delta, A, B4, C4, delta_A, lengths, cu_seqlens, tuning)
        grid = (p.n_seq, p.D // bd)
        gy = gy.contiguous() if gy is not None else torch.zeros_like(u)
        bufs = _grad_buffers(p, u, delta, A, D, z, delta_bias, delta_A, grid[1])
        du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, ddA_strides, dh0 = bufs
        ghT_ = ghT.to(torch.float32).contiguous() if ghT is not None else dh0
        sub_n = ck_t // bt
        sub = torch.empty((grid[0] * grid[1], sub_n, bn, bd), dtype=torch.float32, device=u.device) \
            if sub_n > 1 else dh0
        dummy = p.lens
        _ss_bwd_chunked_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, ck, gy, ghT_, sub,
            du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, dh0, p.lens, p.cu,
            p.T, p.D, p.N, nc, p.ch_per_g, p.Bsz, u.stride(0), u.stride(1), B4.stride(0), B4.stride(1),
            B4.stride(2), *p.dA_strides, *_z_strides(z), *ddA_strides,
            BLOCK_T=bt, BLOCK_D=bd, BLOCK_N=bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            DA_SHARED=p.da_shared, HAS_D=D is not None, HAS_Z=z is not None, SEQ_MODE=p.seq_mode,
            HAS_GT=ghT is not None, FAST=not INTERPRETED, SUB=sub_n, EVEN_N=p.N == bn, num_warps=warps,
            **_reg_option(reg),
        )
        return _grads(ctx, p, bufs, A, D, z, delta_bias, delta_A, h0, Bshape, Cshape, Bdt, Cdt)


def selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state, opts):
    """``_SelectiveScanChunked.apply`` (called by ``selective_scan_triton`` for ``kernel="chunked"``)."""
    return _SelectiveScanChunked.apply(u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state, opts)
