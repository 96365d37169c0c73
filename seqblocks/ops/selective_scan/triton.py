"""Triton kernels of the selective scan (Mamba S6) fused with its discretisation, forward and backward.

Imported only through the dispatcher in ``seqblocks/ops/selective_scan/__init__.py`` once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module.

Design (see docs/kernels.md):

- One program owns one sequence and a block of ``BLOCK_D`` channels (all inside one group of B / C)
  and walks the sequence in chunks of ``BLOCK_T`` steps. Per chunk it loads [BLOCK_T, BLOCK_D] tiles
  of u, delta (and z, delta_A) and [BLOCK_T, N] tiles of B and C, discretises on chip
  (``Ā = exp(dt_A A)`` or the bilinear ratio, ``B̄u = gamma(dt, A) B u``) into a
  [BLOCK_T, BLOCK_D, N] tile, composes it along time with ``tl.associative_scan`` and applies the
  carried fp32 state. The state lives in registers; the (B, T, D, N) tensor is never written.
- The forward stores only the state at each chunk start ([n_seq, T / BLOCK_T, D, N] fp32, and only
  when gradients are needed). The backward walks the chunks from the end, recomputes the chunk's
  states from that checkpoint (backward by recomputation), runs the adjoint
  ``δ_t = C_t g_t + Ā_{t+1} δ_{t+1}`` as a reverse associative scan and reduces every gradient on chip;
  B, C, A, D and delta_bias, shared across programs, are accumulated with atomic adds in fp32.
- The gradient through ``Ā`` uses ``Ā_t h_{t-1} = h_t - B̄u_t`` (no shifted state, no division for
  the exponential methods; the bilinear one divides by ``(1 + s)(1 - s)``, s = dt_A A / 2).

Real A, B, C (complex systems run on the PyTorch path). Shapes: B batch, T time, D channels,
N state (padded to a power of two on chip), G groups of B / C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["selective_scan_triton", "INTERPRETED", "MAX_D_STATE"]

INTERPRETED = interpreter_enabled()  # the block shapes follow the mode (see seqblocks/ops/scan/triton.py)

_METHODS = {"mamba": 0, "zoh": 1, "bilinear": 2, "dirac": 3}
MAX_D_STATE = 256

# Forward as a time loop (``_ss_fwd_seq_kernel``) rather than chunked scans; benchmarks flip it.
SEQUENTIAL_FORWARD = True
# Backward as time loops (``_ss_bwd_seq_kernel``) rather than chunked scans; benchmarks flip it.
SEQUENTIAL_BACKWARD = True
# Whether the time-loop forward loads the next two steps ahead (loop-carried) or each step in place.
FWD_PREFETCH = True
# (BLOCK_D, num_warps) of the sequential forward, forced by benchmarks; None: the defaults.
FWD_CONFIG_OVERRIDE: tuple[int, int] | None = None
# (BLOCK_T, BLOCK_D, num_warps) forced by benchmarks; None: the defaults in ``_blocks``.
CONFIG_OVERRIDE: tuple[int, int, int] | None = None


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE: tl.constexpr):
    row = pid_s.to(tl.int64)
    start = row * 0
    L = start + T
    if SEQ_MODE == 2:
        start = tl.load(cu_ptr + pid_s).to(tl.int64)
        L = tl.load(cu_ptr + pid_s + 1).to(tl.int64) - start
        row = row * 0
    if SEQ_MODE == 1:
        L = tl.load(lens_ptr + pid_s).to(tl.int64)
    return row, start, L


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _step(delta_ptr, bias_ptr, dA_ptr, off_td, off_dA, m, dd, dmask,
          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr):
    # (raw delta + bias, dt, dt_A) as [BT, BD] fp32 tiles.
    raw = tl.load(delta_ptr + off_td, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + dd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    dtA = dt
    if HAS_DA:
        dtA = tl.load(dA_ptr + off_dA, mask=m, other=0.0).to(tl.float32)
    return raw, dt, dtA


@triton.jit
def _discretize(A3, dt3, dtA3, METHOD: tl.constexpr, HAS_DA: tl.constexpr):
    # A3 [1, BD, BN], dt3 / dtA3 [BT, BD, 1] -> (Ā, gamma, E = exp(dt A) for zoh) [BT, BD, BN]
    if METHOD == 2:
        s = dtA3 * A3 * 0.5
        Abar = (1.0 + s) / (1.0 - s)
        gamma = dt3 / (1.0 - dt3 * A3 * 0.5)
        E = Abar
    else:
        Abar = tl.exp(dtA3 * A3)
        E = Abar
        if METHOD == 1:
            if HAS_DA:
                E = tl.exp(dt3 * A3)
            # (E - 1) / A = dt * expm1(z) / z with z = dt A, as dt (E - 1) / log(E) (accurate to
            # rounding; E == 1 means z underflowed: the ratio is 1).
            lg = tl.log(E)
            safe = tl.where(lg == 0.0, 1.0, lg)
            gamma = tl.where(lg == 0.0, dt3 + 0.0 * A3, dt3 * (E - 1.0) / safe)
        elif METHOD == 3:
            gamma = Abar * 0.0 + 1.0
        else:
            gamma = dt3 + 0.0 * A3
    return Abar, gamma, E


@triton.jit
def _ss_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, h0_ptr,
    y_ptr, hT_ptr, ck_ptr, lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SEQ_MODE: tl.constexpr,
    SAVE: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = _seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    rows = tl.arange(0, BLOCK_T)
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A3 = A[None, :, :]
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + st_off, mask=dn_mask, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_T)
    for c in range(0, n_chunks):
        if SAVE:
            ck = ((pid_s.to(tl.int64) * NC + c) * Dm + dd[:, None]) * N + nn[None, :]
            tl.store(ck_ptr + ck, h, mask=dn_mask)
        s = c * BLOCK_T + rows
        valid = s < L
        t = tl.where(valid, start + s, 0)
        m = valid[:, None] & dmask[None, :]
        off_td = row * s_b + t[:, None] * s_t + dd[None, :]
        off_dA = row * s_dAb + t[:, None] * s_dAt + dd[None, :] * s_dAd
        _raw, dt, dtA = _step(delta_ptr, bias_ptr, dA_ptr, off_td, off_dA, m, dd, dmask,
                              HAS_BIAS, SOFTPLUS, HAS_DA)
        uu = tl.load(u_ptr + off_td, mask=m, other=0.0).to(tl.float32)
        off_bn = row * s_Bb + t[:, None] * s_Bt + grp * s_Bg + nn[None, :]
        mbn = valid[:, None] & nmask[None, :]
        Bt = tl.load(B_ptr + off_bn, mask=mbn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + off_bn, mask=mbn, other=0.0).to(tl.float32)
        Abar, gamma, _E = _discretize(A3, dt[:, :, None], dtA[:, :, None], METHOD, HAS_DA)
        v3 = valid[:, None, None]
        Abar = tl.where(v3, Abar, 1.0)  # padding passes the state through
        x = gamma * Bt[:, None, :] * uu[:, :, None]
        x = tl.where(v3, x, 0.0)
        Ac, Xc = tl.associative_scan((Abar, x), 0, _combine)
        hs = Ac * h[None, :, :] + Xc
        y = tl.sum(Ct[:, None, :] * hs, axis=2)
        if HAS_D:
            y += Dv[None, :] * uu
        if HAS_Z:
            zz = tl.load(z_ptr + off_td, mask=m, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_ptr + off_td, y.to(y_ptr.dtype.element_ty), mask=m)
        h = tl.sum(tl.where(rows[:, None, None] == BLOCK_T - 1, hs, 0.0), axis=0)
    tl.store(hT_ptr + st_off, h, mask=dn_mask)


@triton.jit
def _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start, tt, L, dd, nn, dmask, nmask,
              grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr, HAS_Z: tl.constexpr):
    # One time step's inputs (u, dt, dt_A, z as [BD]; B, C as [BN]); past the end: masked.
    t = tl.where(tt < L, start + tt, 0)
    md = dmask & ((dd * 0 + tt) < L)
    mn = nmask & ((nn * 0 + tt) < L)
    off = row * s_b + t * s_t + dd
    uu = tl.load(u_ptr + off, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + off, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = _softplus(dt)
    dtA = dt
    if HAS_DA:
        dtA = tl.load(dA_ptr + row * s_dAb + t * s_dAt + dd * s_dAd, mask=md, other=0.0).to(tl.float32)
    zz = uu
    if HAS_Z:
        zz = tl.load(z_ptr + off, mask=md, other=0.0).to(tl.float32)
    offn = row * s_Bb + t * s_Bt + grp * s_Bg + nn
    Bt = tl.load(B_ptr + offn, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + offn, mask=mn, other=0.0).to(tl.float32)
    return uu, dt, dtA, zz, Bt, Ct


@triton.jit
def _ss_fwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, h0_ptr,
    y_ptr, hT_ptr, ck_ptr, lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SEQ_MODE: tl.constexpr,
    SAVE: tl.constexpr, PREFETCH: tl.constexpr,
):
    # The forward as a plain time loop: the [BD, BN] state in registers, one step at a time, the
    # inputs of the next two steps already in flight (software pipelining by hand). Fewer
    # instructions per state element than the chunked scan; checkpoints every BLOCK_T steps match the
    # chunked backward.
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = _seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + st_off, mask=dn_mask, other=0.0)
    # Per-step rows are loaded as [BLOCK_D, 1] and [1, BLOCK_N] tiles, so they broadcast against the
    # state without layout conversions (1-D loads cost several shared-memory round trips per step).
    dd2 = dd[:, None]
    nn2 = nn[None, :]
    dmask2 = dmask[:, None]
    nmask2 = nmask[None, :]
    bias = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + dd2, mask=dmask2, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + dd2, mask=dmask2, other=0.0).to(tl.float32)
    u0, dt0, dA0, z0, B0, C0 = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start, 0, L,
                                         dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                         s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
    u1, dt1, dA1, z1, B1, C1 = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start, 1, L,
                                         dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                         s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
    for tt in range(0, L):
        if PREFETCH:
            u2, dt2, dA2, z2, B2, C2 = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start,
                                                 tt + 2, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt,
                                                 s_Bg, s_dAb, s_dAt, s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
        else:
            # loads issued where they are used (the compiler can then place them in the layouts the
            # arithmetic needs); latency is hidden by the other programs on the multiprocessor
            u0, dt0, dA0, z0, B0, C0 = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start,
                                                 tt, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt,
                                                 s_Bg, s_dAb, s_dAt, s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
        if SAVE:
            if tt % BLOCK_T == 0:
                ck = ((pid_s.to(tl.int64) * NC + tt // BLOCK_T) * Dm + dd[:, None]) * N + nn[None, :]
                tl.store(ck_ptr + ck, h, mask=dn_mask)
        Abar, gamma, _E = _discretize(A, dt0, dA0, METHOD, HAS_DA)
        h = Abar * h + gamma * (B0 * u0)
        y = tl.sum(C0 * h, axis=1, keep_dims=True)
        if HAS_D:
            y += Dv * u0
        if HAS_Z:
            y = y * z0 * tl.sigmoid(z0)
        off = row * s_b + (start + tt) * s_t + dd2
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=dmask2)
        if PREFETCH:
            u0, dt0, dA0, z0, B0, C0 = u1, dt1, dA1, z1, B1, C1
            u1, dt1, dA1, z1, B1, C1 = u2, dt2, dA2, z2, B2, C2
    tl.store(hT_ptr + st_off, h, mask=dn_mask)


@triton.jit
def _ss_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, ck_ptr,
    gy_ptr, ghT_ptr,
    du_ptr, ddelta_ptr, dAm_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, ddA_ptr, dh0_ptr,
    lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G, n_rows,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_ddAb, s_ddAt, s_ddAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    DA_SHARED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SEQ_MODE: tl.constexpr,
    HAS_GT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = _seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    rows = tl.arange(0, BLOCK_T)
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A3 = A[None, :, :]
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # δ at the step after the chunk
    if HAS_GT:
        carry = tl.load(ghT_ptr + st_off, mask=dn_mask, other=0.0)
    dh0 = carry
    if HAS_D:
        Dv = tl.load(D_ptr + dd, mask=dmask, other=0.0).to(tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_T)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        s = c * BLOCK_T + rows
        valid = s < L
        vn = (s + 1) < L
        t = tl.where(valid, start + s, 0)
        tn = tl.where(vn, start + s + 1, 0)
        m = valid[:, None] & dmask[None, :]
        mn = vn[:, None] & dmask[None, :]
        off_td = row * s_b + t[:, None] * s_t + dd[None, :]
        off_tdn = row * s_b + tn[:, None] * s_t + dd[None, :]
        off_dA = row * s_dAb + t[:, None] * s_dAt + dd[None, :] * s_dAd
        off_dAn = row * s_dAb + tn[:, None] * s_dAt + dd[None, :] * s_dAd
        raw, dt, dtA = _step(delta_ptr, bias_ptr, dA_ptr, off_td, off_dA, m, dd, dmask,
                             HAS_BIAS, SOFTPLUS, HAS_DA)
        _rawn, _dtn, dtAn = _step(delta_ptr, bias_ptr, dA_ptr, off_tdn, off_dAn, mn, dd, dmask,
                                  HAS_BIAS, SOFTPLUS, HAS_DA)
        uu = tl.load(u_ptr + off_td, mask=m, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + off_td, mask=m, other=0.0).to(tl.float32)
        off_bn = row * s_Bb + t[:, None] * s_Bt + grp * s_Bg + nn[None, :]
        mbn = valid[:, None] & nmask[None, :]
        Bt = tl.load(B_ptr + off_bn, mask=mbn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + off_bn, mask=mbn, other=0.0).to(tl.float32)
        v3 = valid[:, None, None]
        # Recompute the chunk's states from its checkpoint.
        ck = ((pid_s.to(tl.int64) * NC + c) * Dm + dd[:, None]) * N + nn[None, :]
        h_start = tl.load(ck_ptr + ck, mask=dn_mask, other=0.0)
        dt3 = dt[:, :, None]
        dtA3 = dtA[:, :, None]
        Abar, gamma, E = _discretize(A3, dt3, dtA3, METHOD, HAS_DA)
        Abar = tl.where(v3, Abar, 1.0)
        Bu = Bt[:, None, :] * uu[:, :, None]
        x = tl.where(v3, gamma * Bu, 0.0)
        Ac, Xc = tl.associative_scan((Abar, x), 0, _combine)
        hs = Ac * h_start[None, :, :] + Xc
        # Output cotangent through the gate and the skip.
        if HAS_Z:
            zz = tl.load(z_ptr + off_td, mask=m, other=0.0).to(tl.float32)
            sg = tl.sigmoid(zz)
            ypre = tl.sum(Ct[:, None, :] * hs, axis=2)
            if HAS_D:
                ypre += Dv[None, :] * uu
            dz = gy * ypre * sg * (1.0 + zz * (1.0 - sg))
            tl.store(dz_ptr + off_td, dz.to(dz_ptr.dtype.element_ty), mask=m)
            gy = gy * zz * sg
        if HAS_D:
            dD_acc += tl.sum(gy * uu, axis=0)
        # Adjoint: δ_t = C_t g_t + Ā_{t+1} δ_{t+1}, a reverse scan over (Ā_{t+1}, C_t g_t).
        if METHOD == 2:
            sn = dtAn[:, :, None] * A3 * 0.5
            An = (1.0 + sn) / (1.0 - sn)
        else:
            An = tl.exp(dtAn[:, :, None] * A3)
        An = tl.where(vn[:, None, None], An, 1.0)
        cg = Ct[:, None, :] * gy[:, :, None]
        Rn, Gn = tl.associative_scan((An, cg), 0, _combine, reverse=True)
        delta = Rn * carry[None, :, :] + Gn
        delta = tl.where(v3, delta, 0.0)
        # dC[t, n] = sum_d g h; dB[t, n] = sum_d δ gamma u
        dC = tl.sum(gy[:, :, None] * hs, axis=1)
        dB = tl.sum(delta * gamma * uu[:, :, None], axis=1)
        # Partial sums per channel block ([n_dblocks, B, T, N] fp32, summed on the host side): atomic
        # adds from every block onto the same (t, n) serialise in L2 (measured ~50x slower).
        off_part = ((pid_d * n_rows + row) * T + t[:, None]) * N + nn[None, :]
        tl.store(dC_ptr + off_part, dC, mask=mbn)
        tl.store(dB_ptr + off_part, dB, mask=mbn)
        du = tl.sum(delta * gamma * Bt[:, None, :], axis=2)
        if HAS_D:
            du += gy * Dv[None, :]
        tl.store(du_ptr + off_td, du.to(du_ptr.dtype.element_ty), mask=m)
        # Through Ā: δ_t ∂Ā_t h_{t-1} with Ā_t h_{t-1} = h_t - x_t.
        hx = delta * (hs - x)
        if METHOD == 2:
            s_ = dtA3 * A3 * 0.5
            w = hx / ((1.0 + s_) * (1.0 - s_))
            w = tl.where(v3, w, 0.0)
        else:
            w = hx
        ddtA = tl.sum(w * A3, axis=2)
        dA_acc += tl.sum(w * dtA3, axis=0)
        # Through gamma.
        dgam = delta * Bu
        if METHOD == 0:
            ddt = tl.sum(dgam, axis=2)
        elif METHOD == 1:
            # gamma = (E - 1) / A, E = exp(dt A): d/ddt = E; d/dA = (dt E - gamma) / A (series near 0).
            ddt = tl.sum(dgam * E, axis=2)
            zt = dt3 * A3
            small = tl.abs(zt) < 1e-2
            safeA = tl.where(small, 1.0, A3)
            ser = dt3 * dt3 * (0.5 + zt * (1.0 / 3.0 + zt * (0.125 + zt / 30.0)))
            dgdA = tl.where(small, ser, (dt3 * E - gamma) / safeA)
            dA_acc += tl.sum(dgam * dgdA, axis=0)
        elif METHOD == 2:
            q = 1.0 / (1.0 - dt3 * A3 * 0.5)
            ddt = tl.sum(dgam * q * q, axis=2)
            dA_acc += tl.sum(dgam * (0.5 * dt3 * dt3) * q * q, axis=0)
        else:
            ddt = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if HAS_DA:
            if DA_SHARED:
                off_g = row * s_ddAb + t * s_ddAt
                tl.atomic_add(ddA_ptr + off_g, tl.sum(tl.where(m, ddtA, 0.0), axis=1), mask=valid)
            else:
                off_g = row * s_ddAb + t[:, None] * s_ddAt + dd[None, :] * s_ddAd
                tl.store(ddA_ptr + off_g, ddtA.to(ddA_ptr.dtype.element_ty), mask=m)
        else:
            ddt += ddtA
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m, ddt, 0.0)
        tl.store(ddelta_ptr + off_td, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
        carry = tl.sum(tl.where(rows[:, None, None] == 0, delta, 0.0), axis=0)
        dh0 = tl.sum(tl.where(rows[:, None, None] == 0, Abar * delta, 0.0), axis=0)
    tl.store(dh0_ptr + st_off, dh0, mask=dn_mask)
    tl.atomic_add(dAm_ptr + dd[:, None] * N + nn[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + dd, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + dd, dbias_acc, mask=dmask)


@triton.jit
def _ss_bwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, ck_ptr,
    gy_ptr, ghT_ptr, hist_ptr,
    du_ptr, ddelta_ptr, dAm_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, ddA_ptr, dh0_ptr,
    lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G, n_rows,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_ddAb, s_ddAt, s_ddAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    DA_SHARED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SEQ_MODE: tl.constexpr,
    HAS_GT: tl.constexpr,
):
    # The backward as time loops. Per chunk of BLOCK_T steps (walked from the end): recompute the
    # chunk's states from its checkpoint, one step at a time, into this program's private history
    # slot (BLOCK_T x BLOCK_D x BLOCK_N fp32, a few KB rewritten every chunk: it stays in L2), then walk
    # the chunk backwards with the adjoint state in registers.
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = _seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    hist = hist_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_d) * (BLOCK_T * BLOCK_D * BLOCK_N) \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + nn[None, :]
    # carry = Ā_{t+1} δ_{t+1}: what flows into step t from the future (the final state's cotangent
    # at the end).
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_GT:
        carry = tl.load(ghT_ptr + st_off, mask=dn_mask, other=0.0)
    # Rows as [BLOCK_D, 1] / [1, BLOCK_N] tiles: they broadcast against the state without layout
    # conversions (see _ss_fwd_seq_kernel).
    dd2 = dd[:, None]
    nn2 = nn[None, :]
    dmask2 = dmask[:, None]
    nmask2 = nmask[None, :]
    bias = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + dd2, mask=dmask2, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + dd2, mask=dmask2, other=0.0).to(tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
    n_chunks = tl.cdiv(L, BLOCK_T)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * BLOCK_T
        n_steps = tl.minimum(L - t0, BLOCK_T)
        ck = ((pid_s.to(tl.int64) * NC + c) * Dm + dd[:, None]) * N + nn[None, :]
        h = tl.load(ck_ptr + ck, mask=dn_mask, other=0.0)
        for r in range(0, n_steps):
            uu, dt, dtA, zz, Bt, Ct = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start,
                                                t0 + r, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt,
                                                s_Bg, s_dAb, s_dAt, s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
            Abar, gamma, _E = _discretize(A, dt, dtA, METHOD, HAS_DA)
            h = Abar * h + gamma * (Bt * uu)
            tl.store(hist + r * (BLOCK_D * BLOCK_N), h)
        for rr in range(0, n_steps):
            r = n_steps - 1 - rr
            tt = t0 + r
            uu, dt, dtA, zz, Bt, Ct = _row_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, bias, row, start,
                                                tt, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt,
                                                s_Bg, s_dAb, s_dAt, s_dAd, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_Z)
            h = tl.load(hist + r * (BLOCK_D * BLOCK_N))
            t = start + tt
            off = row * s_b + t * s_t + dd2
            gy = tl.load(gy_ptr + off, mask=dmask2, other=0.0).to(tl.float32)
            if HAS_Z:
                sg = tl.sigmoid(zz)
                ypre = tl.sum(Ct * h, axis=1, keep_dims=True)
                if HAS_D:
                    ypre += Dv * uu
                dz = gy * ypre * sg * (1.0 + zz * (1.0 - sg))
                tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=dmask2)
                gy = gy * zz * sg
            if HAS_D:
                dD_acc += gy * uu
            dt2 = dt
            dtA2 = dtA
            Abar, gamma, E = _discretize(A, dt2, dtA2, METHOD, HAS_DA)
            Bu = Bt * uu
            x = gamma * Bu
            delta = Ct * gy + carry
            delta = tl.where(dn_mask, delta, 0.0)
            offn = (pid_d * n_rows + row) * T + t
            tl.store(dC_ptr + offn * N + nn2, tl.sum(gy * h, axis=0, keep_dims=True), mask=nmask2)
            tl.store(dB_ptr + offn * N + nn2, tl.sum(delta * gamma * uu, axis=0, keep_dims=True), mask=nmask2)
            du = tl.sum(delta * gamma * Bt, axis=1, keep_dims=True)
            if HAS_D:
                du += gy * Dv
            tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=dmask2)
            # Through Ā, with Ā_t h_{t-1} = h_t - x_t.
            hx = delta * (h - x)
            if METHOD == 2:
                s_ = dtA2 * A * 0.5
                w = hx / ((1.0 + s_) * (1.0 - s_))
                w = tl.where(dn_mask, w, 0.0)
            else:
                w = hx
            ddtA = tl.sum(w * A, axis=1, keep_dims=True)
            dA_acc += w * dtA2
            dgam = delta * Bu
            if METHOD == 0:
                ddt = tl.sum(dgam, axis=1, keep_dims=True)
            elif METHOD == 1:
                ddt = tl.sum(dgam * E, axis=1, keep_dims=True)
                zt = dt2 * A
                small = tl.abs(zt) < 1e-2
                safeA = tl.where(small, 1.0, A)
                ser = dt2 * dt2 * (0.5 + zt * (1.0 / 3.0 + zt * (0.125 + zt / 30.0)))
                dA_acc += dgam * tl.where(small, ser, (dt2 * E - gamma) / safeA)
            elif METHOD == 2:
                q = 1.0 / (1.0 - dt2 * A * 0.5)
                ddt = tl.sum(dgam * q * q, axis=1, keep_dims=True)
                dA_acc += dgam * (0.5 * dt2 * dt2) * q * q
            else:
                ddt = tl.zeros([BLOCK_D, 1], dtype=tl.float32)
            if HAS_DA:
                if DA_SHARED:
                    tl.atomic_add(ddA_ptr + row * s_ddAb + t * s_ddAt, tl.sum(tl.where(dmask2, ddtA, 0.0)))
                else:
                    tl.store(ddA_ptr + row * s_ddAb + t * s_ddAt + dd2 * s_ddAd,
                             ddtA.to(ddA_ptr.dtype.element_ty), mask=dmask2)
            else:
                ddt += ddtA
            if SOFTPLUS:
                raw = tl.load(delta_ptr + off, mask=dmask2, other=0.0).to(tl.float32) + bias
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(dmask2, ddt, 0.0)
            tl.store(ddelta_ptr + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=dmask2)
            if HAS_BIAS:
                dbias_acc += ddt
            carry = Abar * delta
    tl.store(dh0_ptr + st_off, carry, mask=dn_mask)
    tl.atomic_add(dAm_ptr + dd[:, None] * N + nn[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + dd2, dD_acc, mask=dmask2)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + dd2, dbias_acc, mask=dmask2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _blocks(N: int, ch_per_g: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps); BLOCK_D divides the channels of a group."""
    bn = max(_next_pow2(N), 2)
    if INTERPRETED:
        bt, bd, warps = 8, 4, 1
    elif CONFIG_OVERRIDE is not None:
        bt, bd, warps = CONFIG_OVERRIDE
    elif SEQUENTIAL_BACKWARD:
        # One warp per program holding a [BLOCK_D, BLOCK_N] state; the per-program history slot
        # (BLOCK_T x BLOCK_D x BLOCK_N fp32) stays small enough for all of them to live in L2.
        bt, warps = 16, 1
        bd = max(1, 256 // bn)
        if bn > 64:
            warps = 4
            bd = max(1, 2048 // bn)
    else:
        # About 2048 state elements per chunk tile keeps the tiles in registers.
        bt = 16
        bd = max(1, 2048 // (bt * bn))
        warps = 4
        if bd == 1 and bn > 128:
            bt = max(2, 4096 // bn)
    bd = max(1, min(bd, _largest_pow2_divisor(ch_per_g)))
    return bt, bd, bn, warps


class _Ctx:
    pass


def _prep(u, delta, A, B, C, delta_A, lengths, cu_seqlens):
    p = _Ctx()
    p.Bsz, p.T, p.D = u.shape
    p.N = A.shape[-1]
    grouped = B.dim() == 4
    p.G = B.shape[2] if grouped else 1
    p.ch_per_g = p.D // p.G
    p.Bshape = B.shape
    p.B4 = (B if grouped else B.unsqueeze(2)).contiguous()
    p.C4 = (C if grouped else C.unsqueeze(2)).contiguous()
    if cu_seqlens is not None:
        p.seq_mode, p.n_seq = 2, cu_seqlens.numel() - 1
    elif lengths is not None:
        p.seq_mode, p.n_seq = 1, p.Bsz
    else:
        p.seq_mode, p.n_seq = 0, p.Bsz
    p.bt, p.bd, p.bn, p.warps = _blocks(p.N, p.ch_per_g)
    p.nc = max(1, -(-p.T // p.bt))
    p.grid = (p.n_seq, triton.cdiv(p.D, p.bd))
    dummy = torch.zeros(1, dtype=torch.int64, device=u.device)
    p.lens = lengths if lengths is not None else dummy
    p.cu = cu_seqlens if cu_seqlens is not None else dummy
    p.da_shared = delta_A is not None and delta_A.dim() == 2
    if delta_A is None:
        p.dA3 = dummy
        p.dA_strides = (0, 0, 0)
    else:
        dA3 = delta_A.contiguous()
        if p.da_shared:
            p.dA3 = dA3
            p.dA_strides = (dA3.stride(0), dA3.stride(1), 0)
        else:
            p.dA3 = dA3
            p.dA_strides = dA3.stride()
    return p


def _common_args(p):
    return (p.T, p.D, p.N, p.nc, p.ch_per_g)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_A, h0, opts):
        softplus, method, lengths, cu_seqlens = opts
        p = _prep(u, delta, A, B, C, delta_A, lengths, cu_seqlens)
        u_, delta_ = u.contiguous(), delta.contiguous()
        z_ = z.contiguous() if z is not None else None
        A_ = A.contiguous()
        dummy = p.lens
        alloc = torch.zeros if p.seq_mode == 1 else torch.empty
        y = alloc(u.shape, dtype=u.dtype, device=u.device)
        hT = torch.empty((p.n_seq, p.D, p.N), dtype=torch.float32, device=u.device)
        save = any(ctx.needs_input_grad[:10])
        ck = torch.empty((p.n_seq, p.nc, p.D, p.N), dtype=torch.float32, device=u.device) if save else hT
        h0_ = h0.to(torch.float32).contiguous() if h0 is not None else hT
        if SEQUENTIAL_FORWARD:
            if FWD_CONFIG_OVERRIDE is not None:
                fbd, fwarps = FWD_CONFIG_OVERRIDE
            elif INTERPRETED:
                fbd, fwarps = 4, 1
            elif p.bn <= 64:
                fbd, fwarps = max(1, 512 // p.bn), 1  # (32, 1) at N = 16: the measured best
            else:
                fbd, fwarps = max(1, 2048 // p.bn), 4
            fbd = max(1, min(fbd, _largest_pow2_divisor(p.ch_per_g)))
            kernel, grid, warps = _ss_fwd_seq_kernel, (p.n_seq, triton.cdiv(p.D, fbd)), fwarps
            extra = dict(PREFETCH=FWD_PREFETCH)
        else:
            kernel, grid, fbd, warps = _ss_fwd_kernel, p.grid, p.bd, p.warps
            extra = {}
        kernel[grid](
            u_, delta_, A_, p.B4, p.C4, D if D is not None else dummy, z_ if z_ is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, h0_, y, hT, ck, p.lens, p.cu,
            *_common_args(p), u_.stride(0), u_.stride(1), p.B4.stride(0), p.B4.stride(1), p.B4.stride(2),
            *p.dA_strides,
            BLOCK_T=p.bt, BLOCK_D=fbd, BLOCK_N=p.bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SEQ_MODE=p.seq_mode,
            SAVE=save, num_warps=warps, **extra,
        )
        ctx.save_for_backward(u_, delta_, A_, D, z_, delta_bias, delta_A, h0, ck, lengths, cu_seqlens)
        ctx.Bs = (p.B4, p.C4, B.shape, C.shape, B.dtype, C.dtype)
        ctx.opts = (softplus, method)
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        u, delta, A, D, z, delta_bias, delta_A, h0, ck, lengths, cu_seqlens = ctx.saved_tensors
        B4, C4, Bshape, Cshape, Bdt, Cdt = ctx.Bs
        softplus, method = ctx.opts
        p = _prep(u, delta, A, B4, C4, delta_A, lengths, cu_seqlens)
        dev = u.device
        dummy = p.lens
        f32 = dict(dtype=torch.float32, device=dev)
        alloc = torch.zeros if p.seq_mode == 1 else torch.empty
        gy = gy.contiguous() if gy is not None else torch.zeros_like(u)
        du = alloc(u.shape, dtype=u.dtype, device=dev)
        ddelta = alloc(delta.shape, dtype=delta.dtype, device=dev)
        dz = alloc(z.shape, dtype=z.dtype, device=dev) if z is not None else dummy
        dA = torch.zeros(A.shape, **f32)
        n_db = p.grid[1]
        dB = alloc((n_db, p.Bsz, p.T, p.N), **f32)
        dC = alloc((n_db, p.Bsz, p.T, p.N), **f32)
        dD = torch.zeros(p.D, **f32) if D is not None else dummy
        dbias = torch.zeros(p.D, **f32) if delta_bias is not None else dummy
        if delta_A is None:
            ddA, ddA_strides = dummy, (0, 0, 0)
        elif p.da_shared:
            ddA = torch.zeros(delta_A.shape, **f32)
            ddA_strides = (ddA.stride(0), ddA.stride(1), 0)
        else:
            ddA = alloc(delta_A.shape, dtype=delta_A.dtype, device=dev)
            ddA_strides = ddA.stride()
        dh0 = torch.empty((p.n_seq, p.D, p.N), **f32)
        ghT_ = ghT.to(torch.float32).contiguous() if ghT is not None else dh0
        if SEQUENTIAL_BACKWARD:
            hist = torch.empty((p.grid[0] * p.grid[1], p.bt, p.bd, p.bn), **f32)
            kernel, extra = _ss_bwd_seq_kernel, (hist,)
        else:
            kernel, extra = _ss_bwd_kernel, ()
        kernel[p.grid](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, ck, gy, ghT_, *extra,
            du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, dh0, p.lens, p.cu,
            *_common_args(p), p.Bsz, u.stride(0), u.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
            *p.dA_strides, *ddA_strides,
            BLOCK_T=p.bt, BLOCK_D=p.bd, BLOCK_N=p.bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            DA_SHARED=p.da_shared, HAS_D=D is not None, HAS_Z=z is not None, SEQ_MODE=p.seq_mode,
            HAS_GT=ghT is not None, num_warps=p.warps,
        )
        # [G * blocks per group, B, T, N] -> [B, T, G, N]: the blocks of a group are consecutive.
        dB = dB.view(p.G, -1, p.Bsz, p.T, p.N).sum(1).permute(1, 2, 0, 3)
        dC = dC.view(p.G, -1, p.Bsz, p.T, p.N).sum(1).permute(1, 2, 0, 3)
        grads = [du, ddelta, dA.to(A.dtype), dB.reshape(Bshape).to(Bdt), dC.reshape(Cshape).to(Cdt),
                 dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
                 dbias.to(delta_bias.dtype) if delta_bias is not None else None,
                 ddA.to(delta_A.dtype) if delta_A is not None else None,
                 dh0.to(h0.dtype) if h0 is not None else None, None]
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad + (False,)))


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.selective_scan.selective_scan`` (see there); inputs are
    assumed valid and served (real fp16 / bf16 / fp32, d_state <= MAX_D_STATE; the dispatcher checks)."""
    if u.numel() == 0:
        # nothing to scan: zero outputs, and each sequence's final state is its initial state
        n_seq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        y = torch.zeros_like(u)
        if initial_state is not None:
            return y, initial_state.to(torch.float32)
        return y, torch.zeros(n_seq, u.shape[2], A.shape[-1], dtype=torch.float32, device=u.device)
    opts = (bool(delta_softplus), discretization, lengths, cu_seqlens)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state, opts)
