"""Triton kernels of the selective scan (Mamba S6) fused with its discretisation, forward and backward.

Imported only through the dispatcher in ``seqblocks/ops/selective_scan/__init__.py`` once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module.

Design (see docs/kernels.md). The kernels are time loops (``_ss_fwd_ring_kernel``,
``_ss_bwd_ring_kernel``):

- One program owns one sequence and ``BLOCK_D`` channels (all inside one group of B / C), with the
  [BLOCK_D, N] fp32 state in registers (one channel per thread, its N states in the thread), and steps
  through time one step at a time. The (B, T, D, N) state is never written to memory.
- Loads run a ring of register slots: the loop body runs RING steps, each slot holds one step's
  inputs as loaded (no arithmetic on them, so nothing waits for them) and is refilled with the step
  RING ahead right after its step consumed it. Per step the kernels issue few instructions: ``exp`` as
  one flush-to-zero ``ex2`` (``_ex2``), γ per channel where it does not depend on A, B and C in fp32
  (no per-step conversions), loaded unmasked when N is a power of two.
- The forward stores only the state at each chunk start ([n_seq, T / BLOCK_T, D, N] fp32, and only
  when gradients are needed). The backward walks the chunks from the end, recomputes each chunk's
  states from that checkpoint (backward by recomputation) and runs the adjoint
  ``δ_t = C_t g_t + Ā_{t+1} δ_{t+1}`` with the adjoint state in registers; gradients of B and C are
  written per channel block and summed afterwards; those of A, D and delta_bias are accumulated with
  atomic adds in fp32.
- The gradient through ``Ā`` uses ``Ā_t h_{t-1} = h_t - B̄u_t`` (no shifted state, no division for
  the exponential methods; the bilinear one divides by ``(1 + s)(1 - s)``, s = dt_A A / 2).

Block shapes, warps and the ring options come from the call's ``SelectiveScanTuning`` (``tuning.py``;
None fields: the defaults in ``_blocks`` / ``_fwd_blocks``); no module-level setting changes them.
``SelectiveScanTuning(kernel="chunked")`` runs the chunked kernels of ``triton_chunked.py`` instead
(associative scans over chunk tiles; same contract, checkpoints and gradient buffers).

Real A, B, C (complex systems run on the PyTorch path). Shapes: B batch, T time, D channels,
N state (padded to a power of two on chip), G groups of B / C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops.scan.triton import seq_bounds  # one definition of a sequence's bounds
from seqblocks.ops.selective_scan._triton_common import (  # noqa: F401 (INTERPRETED is public here)
    _METHODS,
    INTERPRETED,
    _blocks,
    _ckpt_interval,
    _Ctx,
    _discretize_row,
    _ex2,
    _grad_buffers,
    _grads,
    _largest_pow2_divisor,
    _lg2,
    _next_pow2,
    _prep,
    _rcp,
    _sigmoid_f,
    _softplus_f,
    _z_strides,
)
from seqblocks.ops.selective_scan.tuning import SelectiveScanTuning

__all__ = ["selective_scan_triton", "INTERPRETED", "MAX_D_STATE"]


MAX_D_STATE = 256
# A call without a tuning runs the chunked kernels when compiled (H200, (8, 2048, 1536, 16) bf16, 2026-12-03:
# fwd 0.344 / fwd+bwd 2.70 ms against the ring's 0.652 / 4.05 ms, docs/benchmarks.md) and the ring kernels
# under the interpreter, where the CPU tests exercise each design explicitly.
_DEFAULT_TUNING = SelectiveScanTuning(kernel="ring" if INTERPRETED else "chunked")


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


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
def _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt, L, dd, nn, dmask, nmask,
              grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt,
              HAS_DA: tl.constexpr, HAS_Z: tl.constexpr,
              WANT_C: tl.constexpr = True, WANT_B: tl.constexpr = True, EVEN_N: tl.constexpr = False):
    # One time step's inputs as loaded (input dtype, no arithmetic), so that nothing waits for them
    # before their step is computed; past the end: masked (zeros).
    t = tl.where(tt < L, start + tt, 0)
    md = dmask & ((dd * 0 + tt) < L)
    mn = nmask & ((nn * 0 + tt) < L)
    off = row * s_b + t * s_t + dd
    uu = tl.load(u_ptr + off, mask=md, other=0.0)
    dt = tl.load(delta_ptr + off, mask=md, other=0.0)
    dtA = dt
    if HAS_DA:
        dtA = tl.load(dA_ptr + row * s_dAb + t * s_dAt + dd * s_dAd, mask=md, other=0.0)
    zz = uu
    if HAS_Z:
        zz = tl.load(z_ptr + row * s_zb + t * s_zt + dd, mask=md, other=0.0)  # z may be a view (x, z of in_proj)
    offn = row * s_Bb + t * s_Bt + grp * s_Bg + nn
    Bt = uu  # placeholders for rows not wanted
    Ct = uu
    if EVEN_N:
        # t is clamped to a row of the sequence: in bounds (a row past the end is never used)
        if WANT_B:
            Bt = tl.load(B_ptr + offn)
        if WANT_C:
            Ct = tl.load(C_ptr + offn)
    else:
        if WANT_B:
            Bt = tl.load(B_ptr + offn, mask=mn, other=0.0)
        if WANT_C:
            Ct = tl.load(C_ptr + offn, mask=mn, other=0.0)
    return uu, dt, dtA, zz, Bt, Ct


@triton.jit
def _bc_load(B_ptr, C_ptr, row, start, tt, L, nn, nmask, grp, s_Bb, s_Bt, s_Bg, EVEN_N: tl.constexpr = False):
    # One time step's rows of B and C (input dtype); past the end: masked (zeros), or with EVEN_N
    # a clamped row.
    t = tl.where(tt < L, start + tt, 0)
    mn = nmask & ((nn * 0 + tt) < L)
    offn = row * s_Bb + t * s_Bt + grp * s_Bg + nn
    if EVEN_N:
        return tl.load(B_ptr + offn), tl.load(C_ptr + offn)
    else:
        return tl.load(B_ptr + offn, mask=mn, other=0.0), tl.load(C_ptr + offn, mask=mn, other=0.0)


@triton.jit
def _fwd_step(h, A, A2, bias, Dv, uu, dt, dtA, zz, Bt, Ct, tt, L, y_ptr, row, start, s_b, s_t, dd, dmask,
              METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, FAST: tl.constexpr):
    # One step of the recurrence from raw inputs; a step past the end leaves h unchanged (dt = dt_A
    # = 0 gives Ā = 1 and, with u = B = 0, no input) and stores nothing.
    ok = (dd * 0 + tt) < L  # [BD, 1]
    u = uu.to(tl.float32)
    d = dt.to(tl.float32)
    if HAS_BIAS:
        d += bias
    if SOFTPLUS:
        d = _softplus_f(d, FAST)
    d = tl.where(ok, d, 0.0)
    dA = d
    if HAS_DA:
        dA = dtA.to(tl.float32)
    Abar, gamma, _E = _discretize_row(A, A2, d, dA, METHOD, HAS_DA, FAST)
    if METHOD == 0 or METHOD == 3:
        h = Abar * h + Bt.to(tl.float32) * (gamma * u)  # γ per channel: one [BD, 1] product
    else:
        h = Abar * h + gamma * (Bt.to(tl.float32) * u)
    y = tl.sum(Ct.to(tl.float32) * h, axis=1, keep_dims=True)
    if HAS_D:
        y += Dv * u
    if HAS_Z:
        z = zz.to(tl.float32)
        y = y * z * _sigmoid_f(z, FAST)
    off = row * s_b + (start + tl.where(tt < L, tt, 0)) * s_t + dd
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=dmask & ok)
    return h


@triton.jit
def _ss_fwd_ring_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, h0_ptr,
    y_ptr, hT_ptr, ck_ptr, lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt,
    CKPT_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, SEQ_MODE: tl.constexpr,
    SAVE: tl.constexpr, RING: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr,
):
    # The forward as a time loop over a ring of RING (2 or 4) register slots: the loop body runs RING
    # steps; each slot holds one step's raw inputs and is refilled with the step RING ahead right after
    # its step consumed it. Loads then stay in flight for RING steps of work (their values are first
    # touched, converted and transformed, where their step runs), and the loop needs no register
    # rotation (a rotation would copy, i.e. wait for, the values just loaded).
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + st_off, mask=dn_mask, other=0.0)
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
    u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, 0, L, dd2, nn2,
                                       dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
                                       s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
    u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, 1, L, dd2, nn2,
                                       dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
                                       s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
    if RING == 4:
        u2, d2, a2, z2, b2, c2 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, 2, L, dd2,
                                           nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
        u3, d3, a3, z3, b3, c3 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, 3, L, dd2,
                                           nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
    for it in range(0, tl.cdiv(L, RING)):
        tt = it * RING
        if SAVE:
            # RING divides CKPT_T: a checkpoint falls on the first step of an iteration
            if tt % CKPT_T == 0:
                ck = ((pid_s.to(tl.int64) * NC + tt // CKPT_T) * Dm + dd[:, None]) * N + nn[None, :]
                tl.store(ck_ptr + ck, h, mask=dn_mask)
        h = _fwd_step(h, A, A2, bias, Dv, u0, d0, a0, z0, b0, c0, tt, L, y_ptr, row, start, s_b, s_t, dd2, dmask2,
                      METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_D, HAS_Z, FAST)
        u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + RING, L,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
        h = _fwd_step(h, A, A2, bias, Dv, u1, d1, a1, z1, b1, c1, tt + 1, L, y_ptr, row, start, s_b, s_t, dd2, dmask2,
                      METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_D, HAS_Z, FAST)
        u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start,
                                           tt + RING + 1, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt,
                                           s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
        if RING == 4:
            h = _fwd_step(h, A, A2, bias, Dv, u2, d2, a2, z2, b2, c2, tt + 2, L, y_ptr, row, start, s_b, s_t, dd2,
                          dmask2, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_D, HAS_Z, FAST)
            u2, d2, a2, z2, b2, c2 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 6,
                                               L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
            h = _fwd_step(h, A, A2, bias, Dv, u3, d3, a3, z3, b3, c3, tt + 3, L, y_ptr, row, start, s_b, s_t, dd2,
                          dmask2, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, HAS_D, HAS_Z, FAST)
            u3, d3, a3, z3, b3, c3 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 7,
                                               L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
    tl.store(hT_ptr + st_off, h, mask=dn_mask)


@triton.jit
def _state_step(h, A, A2, bias, uu, dt, dtA, Bt, tt, L,
                METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
                FAST: tl.constexpr):
    # One step of the backward's state recomputation from raw inputs; a step past L leaves h unchanged.
    ok = (uu * 0 + tt) < L
    d = dt.to(tl.float32)
    if HAS_BIAS:
        d += bias
    if SOFTPLUS:
        d = _softplus_f(d, FAST)
    d = tl.where(ok, d, 0.0)
    dA = d
    if HAS_DA:
        dA = dtA.to(tl.float32)
    Abar, gamma, _E = _discretize_row(A, A2, d, dA, METHOD, HAS_DA, FAST)
    if METHOD == 0 or METHOD == 3:
        h = Abar * h + Bt.to(tl.float32) * (gamma * uu.to(tl.float32))
    else:
        h = Abar * h + gamma * (Bt.to(tl.float32) * uu.to(tl.float32))
    return h


@triton.jit
def _rec_step(h, A, A2, bias, uu, dt, dtA, Bt, tt, L, hist_r,
              METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
              FAST: tl.constexpr):
    # _state_step into the history slot (a step past the end of the chunk: its row is never read).
    h = _state_step(h, A, A2, bias, uu, dt, dtA, Bt, tt, L, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, FAST)
    tl.store(hist_r, h)
    return h


@triton.jit
def _bwd_step(carry, dA_acc, dD_acc, dbias_acc, A, A2, bias, Dv, uu, dt, dtA, zz, Bt, Ct, gy, h, tt,
              row, start, pid_d, n_rows, T, N, s_b, s_t, s_ddAb, s_ddAt, s_ddAd, dd2, nn2, dmask2, nmask2, dn_mask,
              dz_ptr, dC_ptr, dB_ptr, du_ptr, ddelta_ptr, ddA_ptr,
              BLOCK_D: tl.constexpr, METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              HAS_DA: tl.constexpr, DA_SHARED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
              FAST: tl.constexpr):
    # One step of the adjoint walk (see _ss_bwd_ring_kernel) from raw inputs, h = the recomputed h_t.
    uu = uu.to(tl.float32)
    raw = dt.to(tl.float32)
    if HAS_BIAS:
        raw += bias
    dt2 = raw
    if SOFTPLUS:
        dt2 = _softplus_f(raw, FAST)
    dtA2 = dt2
    if HAS_DA:
        dtA2 = dtA.to(tl.float32)
    Bt = Bt.to(tl.float32)
    Ct = Ct.to(tl.float32)
    gy = gy.to(tl.float32)
    t = start + tt
    off = row * s_b + t * s_t + dd2
    if HAS_Z:
        zz = zz.to(tl.float32)
        sg = _sigmoid_f(zz, FAST)
        ypre = tl.sum(Ct * h, axis=1, keep_dims=True)
        if HAS_D:
            ypre += Dv * uu
        dz = gy * ypre * sg * (1.0 + zz * (1.0 - sg))
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=dmask2)
        gy = gy * zz * sg
    if HAS_D:
        dD_acc += gy * uu
    Abar, gamma, E = _discretize_row(A, A2, dt2, dtA2, METHOD, HAS_DA, FAST)
    Bu = Bt * uu
    if METHOD == 0 or METHOD == 3:
        x = Bt * (gamma * uu)  # rounded as in _rec_step, so h - x is exact when h_{t-1} = 0
    else:
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
        ddt = ddt * _sigmoid_f(raw, FAST)
    ddt = tl.where(dmask2, ddt, 0.0)
    tl.store(ddelta_ptr + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=dmask2)
    if HAS_BIAS:
        dbias_acc += ddt
    carry = Abar * delta
    return carry, dA_acc, dD_acc, dbias_acc


@triton.jit
def _ss_bwd_ring_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dA_ptr, ck_ptr,
    gy_ptr, ghT_ptr, hist_ptr, sub_ptr,
    du_ptr, ddelta_ptr, dAm_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, ddA_ptr, dh0_ptr,
    lens_ptr, cu_ptr,
    T, Dm, N, NC, CH_PER_G, n_rows,
    s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt, s_ddAb, s_ddAt, s_ddAd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DA: tl.constexpr,
    DA_SHARED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SEQ_MODE: tl.constexpr,
    HAS_GT: tl.constexpr, FULL: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr, SUB: tl.constexpr,
):
    # The backward as time loops. Per chunk of BLOCK_T steps (walked from the end): recompute the
    # chunk's states from its checkpoint, one step at a time, into this program's private history
    # slot (BLOCK_T x BLOCK_D x BLOCK_N fp32, a few KB rewritten every chunk: it stays in L2), then walk
    # the chunk backwards with the adjoint state in registers; carry = Ā_{t+1} δ_{t+1} is what flows
    # into step t from the future (the final state's cotangent at the end). Loads are pipelined like
    # _ss_fwd_ring_kernel's: the recomputation runs over a ring of 4 register slots of raw inputs, the
    # adjoint walk over a ring of 2 slots (its steps are long; each slot also holds the step's output
    # cotangent and recomputed state). Each slot is refilled with the step a full ring ahead right after
    # its step consumed it.
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    row, start, L = seq_bounds(pid_s, lens_ptr, cu_ptr, T, SEQ_MODE)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < Dm
    nmask = nn < N
    grp = (pid_d * BLOCK_D) // CH_PER_G
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    st_off = (pid_s.to(tl.int64) * Dm + dd[:, None]) * N + nn[None, :]
    hist = hist_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_d) * (BLOCK_T * BLOCK_D * BLOCK_N) \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + nn[None, :]
    sub = sub_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_d) * (SUB * BLOCK_D * BLOCK_N) \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + nn[None, :]
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_GT:
        carry = tl.load(ghT_ptr + st_off, mask=dn_mask, other=0.0)
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
    HS: tl.constexpr = BLOCK_D * BLOCK_N
    n_chunks = tl.cdiv(L, BLOCK_T)
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * BLOCK_T
        n_steps = tl.minimum(L - t0, BLOCK_T)
        Lc = t0 + n_steps  # loads past the chunk are masked off
        if SUB == 1:
            ck = ((pid_s.to(tl.int64) * NC + c) * Dm + dd[:, None]) * N + nn[None, :]
            h = tl.load(ck_ptr + ck, mask=dn_mask, other=0.0)
        else:
            # Two-level checkpoints: the forward kept the state every SUB chunks. On entering a
            # segment (its last chunk, walked first) rebuild the start states of all its chunks from
            # the segment's checkpoint into this program's sub-checkpoint slot (SUB x BLOCK_D x BLOCK_N
            # fp32, L2-resident), one forward pass over a ring of 2 register slots; every chunk then
            # starts from its slot row.
            seg0 = (c // SUB) * SUB
            if (c == n_chunks - 1) | (c % SUB == SUB - 1):
                ck = ((pid_s.to(tl.int64) * NC + c // SUB) * Dm + dd[:, None]) * N + nn[None, :]
                hs = tl.load(ck_ptr + ck, mask=dn_mask, other=0.0)
                tl.store(sub, hs)
                q0 = seg0 * BLOCK_T
                qu0, qd0, qa0, qz0, qb0, qc0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, q0,
                                                         L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg,
                                                         s_dAb, s_dAt, s_dAd, s_zb, s_zt,
                                                         HAS_DA, False, False, EVEN_N=EVEN_N)
                qu1, qd1, qa1, qz1, qb1, qc1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start,
                                                         q0 + 1, L, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb,
                                                         s_Bt, s_Bg, s_dAb, s_dAt, s_dAd, s_zb, s_zt,
                                                         HAS_DA, False, False,
                                                         EVEN_N=EVEN_N)
                for q in range(0, (c - seg0) * BLOCK_T, 2):  # BLOCK_T is even: pairs never straddle a chunk
                    hs = _state_step(hs, A, A2, bias, qu0, qd0, qa0, qb0, q0 + q, L, METHOD, HAS_BIAS, SOFTPLUS,
                                     HAS_DA, FAST)
                    qu0, qd0, qa0, qz0, qb0, qc0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row,
                                                             start, q0 + q + 2, L, dd2, nn2, dmask2, nmask2, grp,
                                                             s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
                                                             s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
                    hs = _state_step(hs, A, A2, bias, qu1, qd1, qa1, qb1, q0 + q + 1, L, METHOD, HAS_BIAS,
                                     SOFTPLUS, HAS_DA, FAST)
                    qu1, qd1, qa1, qz1, qb1, qc1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row,
                                                             start, q0 + q + 3, L, dd2, nn2, dmask2, nmask2, grp,
                                                             s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt, s_dAd,
                                                             s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
                    if (q + 2) % BLOCK_T == 0:
                        tl.store(sub + ((q + 2) // BLOCK_T) * HS, hs)
            h = tl.load(sub + (c - seg0) * HS)
        # Recompute the chunk's states (ring of 4; BLOCK_T is a multiple of 4).
        u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0, Lc, dd2,
                                           nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
        u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + 1, Lc,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
        u2, d2, a2, z2, b2, c2 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + 2, Lc,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
        u3, d3, a3, z3, b3, c3 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + 3, Lc,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
        for r in range(0, n_steps, 4):
            tt = t0 + r
            h = _rec_step(h, A, A2, bias, u0, d0, a0, b0, tt, Lc, hist + r * HS, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA,
                          FAST)
            u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 4,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
            h = _rec_step(h, A, A2, bias, u1, d1, a1, b1, tt + 1, Lc, hist + (r + 1) * HS, METHOD, HAS_BIAS,
                          SOFTPLUS, HAS_DA, FAST)
            u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 5,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
            h = _rec_step(h, A, A2, bias, u2, d2, a2, b2, tt + 2, Lc, hist + (r + 2) * HS, METHOD, HAS_BIAS,
                          SOFTPLUS, HAS_DA, FAST)
            u2, d2, a2, z2, b2, c2 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 6,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
            h = _rec_step(h, A, A2, bias, u3, d3, a3, b3, tt + 3, Lc, hist + (r + 3) * HS, METHOD, HAS_BIAS,
                          SOFTPLUS, HAS_DA, FAST)
            u3, d3, a3, z3, b3, c3 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt + 7,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, False, False, EVEN_N=EVEN_N)
        # Walk the chunk backwards (ring of 2): an odd step count runs its last step first, alone.
        m = n_steps
        if n_steps % 2 == 1:
            m = n_steps - 1
            tt = t0 + m
            uo, do_, ao, zo, bo, co = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, tt, Lc,
                                                dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                                s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, EVEN_N=EVEN_N)
            go = tl.load(gy_ptr + row * s_b + (start + tt) * s_t + dd2, mask=dmask2, other=0.0)
            ho = tl.load(hist + m * HS)
            carry, dA_acc, dD_acc, dbias_acc = _bwd_step(
                carry, dA_acc, dD_acc, dbias_acc, A, A2, bias, Dv, uo, do_, ao, zo, bo, co, go, ho, tt,
                row, start, pid_d, n_rows, T, N, s_b, s_t, s_ddAb, s_ddAt, s_ddAd, dd2, nn2, dmask2, nmask2,
                dn_mask, dz_ptr, dC_ptr, dB_ptr, du_ptr, ddelta_ptr, ddA_ptr,
                BLOCK_D, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, DA_SHARED, HAS_D, HAS_Z, FAST)
        # slots: steps m - 1 and m - 2 (chunk-relative); m - 2 may be -1 (m = 0 runs no pair)
        r0 = tl.maximum(m - 1, 0)
        r1 = tl.maximum(m - 2, 0)
        u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + r0, Lc,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, FULL, FULL, EVEN_N=EVEN_N)
        g0 = tl.load(gy_ptr + row * s_b + (start + t0 + r0) * s_t + dd2, mask=dmask2, other=0.0)
        h0 = g0
        if FULL:
            h0 = tl.load(hist + r0 * HS)
        u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + r1, Lc,
                                           dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb, s_dAt,
                                           s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, FULL, FULL, EVEN_N=EVEN_N)
        g1 = tl.load(gy_ptr + row * s_b + (start + t0 + r1) * s_t + dd2, mask=dmask2, other=0.0)
        h1 = g0
        if FULL:
            h1 = tl.load(hist + r1 * HS)
        for i in range(0, m // 2):
            r = m - 1 - 2 * i
            tt = t0 + r
            bs0, cs0, hs0 = b0, c0, h0
            if not FULL:
                bs0, cs0 = _bc_load(B_ptr, C_ptr, row, start, tt, Lc, nn2, nmask2, grp, s_Bb, s_Bt,
                                      s_Bg, EVEN_N=EVEN_N)
                hs0 = tl.load(hist + r * HS)
            carry, dA_acc, dD_acc, dbias_acc = _bwd_step(
                carry, dA_acc, dD_acc, dbias_acc, A, A2, bias, Dv, u0, d0, a0, z0, bs0, cs0, g0, hs0, tt,
                row, start, pid_d, n_rows, T, N, s_b, s_t, s_ddAb, s_ddAt, s_ddAd, dd2, nn2, dmask2, nmask2,
                dn_mask, dz_ptr, dC_ptr, dB_ptr, du_ptr, ddelta_ptr, ddA_ptr,
                BLOCK_D, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, DA_SHARED, HAS_D, HAS_Z, FAST)
            rn = tl.maximum(r - 2, 0)  # past the chunk's start: a harmless reload, never used
            u0, d0, a0, z0, b0, c0 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + rn,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, FULL, FULL, EVEN_N=EVEN_N)
            g0 = tl.load(gy_ptr + row * s_b + (start + t0 + rn) * s_t + dd2, mask=dmask2, other=0.0)
            h0 = g0
            if FULL:
                h0 = tl.load(hist + rn * HS)
            bs1, cs1, hs1 = b1, c1, h1
            if not FULL:
                bs1, cs1 = _bc_load(B_ptr, C_ptr, row, start, tt - 1, Lc, nn2, nmask2, grp, s_Bb, s_Bt,
                                      s_Bg, EVEN_N=EVEN_N)
                hs1 = tl.load(hist + (r - 1) * HS)
            carry, dA_acc, dD_acc, dbias_acc = _bwd_step(
                carry, dA_acc, dD_acc, dbias_acc, A, A2, bias, Dv, u1, d1, a1, z1, bs1, cs1, g1, hs1, tt - 1,
                row, start, pid_d, n_rows, T, N, s_b, s_t, s_ddAb, s_ddAt, s_ddAd, dd2, nn2, dmask2, nmask2,
                dn_mask, dz_ptr, dC_ptr, dB_ptr, du_ptr, ddelta_ptr, ddA_ptr,
                BLOCK_D, METHOD, HAS_BIAS, SOFTPLUS, HAS_DA, DA_SHARED, HAS_D, HAS_Z, FAST)
            rn1 = tl.maximum(r - 3, 0)
            u1, d1, a1, z1, b1, c1 = _raw_load(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dA_ptr, row, start, t0 + rn1,
                                               Lc, dd2, nn2, dmask2, nmask2, grp, s_b, s_t, s_Bb, s_Bt, s_Bg, s_dAb,
                                               s_dAt, s_dAd, s_zb, s_zt, HAS_DA, HAS_Z, FULL, FULL, EVEN_N=EVEN_N)
            g1 = tl.load(gy_ptr + row * s_b + (start + t0 + rn1) * s_t + dd2, mask=dmask2, other=0.0)
            h1 = g0
            if FULL:
                h1 = tl.load(hist + rn1 * HS)
    tl.store(dh0_ptr + st_off, carry, mask=dn_mask)
    tl.atomic_add(dAm_ptr + dd[:, None] * N + nn[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD_ptr + dd2, dD_acc, mask=dmask2)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + dd2, dbias_acc, mask=dmask2)


def _fwd_blocks(p, tuning: SelectiveScanTuning) -> tuple[int, int]:
    """(BLOCK_D, num_warps) of the forward time loop; BLOCK_D divides the channels of a group."""
    if INTERPRETED:
        fbd, fwarps = 4, 1
    elif p.bn <= 64:
        fbd, fwarps = max(1, 512 // p.bn), 1  # (32, 1) at N = 16: the measured best
    else:
        fbd, fwarps = max(1, 2048 // p.bn), 4
    fbd = fbd if tuning.fwd_block_d is None else tuning.fwd_block_d
    fwarps = fwarps if tuning.fwd_num_warps is None else tuning.fwd_num_warps
    return max(1, min(fbd, _largest_pow2_divisor(p.ch_per_g))), fwarps


def _common_args(p):
    return (p.T, p.D, p.N, p.nc, p.ch_per_g)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_A, h0, opts):
        softplus, method, lengths, cu_seqlens, tuning = opts
        p = _prep(u, delta, A, B, C, delta_A, lengths, cu_seqlens, tuning)
        u_, delta_ = u.contiguous(), delta.contiguous()
        # z is read through its own strides: in Mamba it is a view of in_proj's output, and a copy
        # would be one more [B, T, D] activation saved for the backward
        z_ = z if z is None or z.stride(-1) == 1 else z.contiguous()
        A_ = A.contiguous()
        dummy = p.lens
        alloc = torch.zeros if p.seq_mode == 1 else torch.empty
        y = alloc(u.shape, dtype=u.dtype, device=u.device)
        hT = torch.empty((p.n_seq, p.D, p.N), dtype=torch.float32, device=u.device)
        save = any(ctx.needs_input_grad[:10])
        ck = torch.empty((p.n_seq, p.nc, p.D, p.N), dtype=torch.float32, device=u.device) if save else hT
        h0_ = h0.to(torch.float32).contiguous() if h0 is not None else hT
        fbd, warps = _fwd_blocks(p, tuning)
        grid = (p.n_seq, triton.cdiv(p.D, fbd))
        ring = min(tuning.fwd_ring, p.bt)  # the ring divides CKPT_T (powers of two, CKPT_T >= BLOCK_T >= 8)
        kernel, extra = _ss_fwd_ring_kernel, dict(RING=ring, FAST=not INTERPRETED, EVEN_N=p.N == p.bn)
        kernel[grid](
            u_, delta_, A_, p.B4, p.C4, D if D is not None else dummy, z_ if z_ is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, h0_, y, hT, ck, p.lens, p.cu,
            *_common_args(p), u_.stride(0), u_.stride(1), p.B4.stride(0), p.B4.stride(1), p.B4.stride(2),
            *p.dA_strides, *_z_strides(z_),
            CKPT_T=p.ck_t, BLOCK_D=fbd, BLOCK_N=p.bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SEQ_MODE=p.seq_mode,
            SAVE=save, num_warps=warps, **extra,
        )
        ctx.save_for_backward(u_, delta_, A_, D, z_, delta_bias, delta_A, h0, ck, lengths, cu_seqlens)
        ctx.Bs = (p.B4, p.C4, B.shape, C.shape, B.dtype, C.dtype)
        ctx.opts = (softplus, method, tuning)
        return y, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT):
        u, delta, A, D, z, delta_bias, delta_A, h0, ck, lengths, cu_seqlens = ctx.saved_tensors
        B4, C4, Bshape, Cshape, Bdt, Cdt = ctx.Bs
        softplus, method, tuning = ctx.opts
        p = _prep(u, delta, A, B4, C4, delta_A, lengths, cu_seqlens, tuning)
        dev = u.device
        dummy = p.lens
        f32 = dict(dtype=torch.float32, device=dev)
        gy = gy.contiguous() if gy is not None else torch.zeros_like(u)
        bufs = _grad_buffers(p, u, delta, A, D, z, delta_bias, delta_A, p.grid[1])
        du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, ddA_strides, dh0 = bufs
        ghT_ = ghT.to(torch.float32).contiguous() if ghT is not None else dh0
        hist = torch.empty((p.grid[0] * p.grid[1], p.bt, p.bd, p.bn), **f32)
        sub_n = p.ck_t // p.bt
        sub = torch.empty((p.grid[0] * p.grid[1], sub_n, p.bd, p.bn), **f32) if sub_n > 1 else dh0
        kernel, extra = _ss_bwd_ring_kernel, (hist, sub)
        full = p.bn <= 16 if tuning.bwd_prefetch is None else tuning.bwd_prefetch
        kw = dict(FULL=full, FAST=not INTERPRETED, EVEN_N=p.N == p.bn, SUB=sub_n)
        kernel[p.grid](
            u, delta, A, B4, C4, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, p.dA3, ck, gy, ghT_, *extra,
            du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, dh0, p.lens, p.cu,
            *_common_args(p), p.Bsz, u.stride(0), u.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
            *p.dA_strides, *_z_strides(z), *ddA_strides,
            BLOCK_T=p.bt, BLOCK_D=p.bd, BLOCK_N=p.bn, METHOD=_METHODS[method],
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_DA=delta_A is not None,
            DA_SHARED=p.da_shared, HAS_D=D is not None, HAS_Z=z is not None, SEQ_MODE=p.seq_mode,
            HAS_GT=ghT is not None, num_warps=p.warps, **kw,
        )
        return _grads(ctx, p, bufs, A, D, z, delta_bias, delta_A, h0, Bshape, Cshape, Bdt, Cdt)


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
    tuning: SelectiveScanTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.selective_scan.selective_scan`` (see there); inputs are
    assumed valid and served (real fp16 / bf16 / fp32, d_state <= MAX_D_STATE; the dispatcher checks).
    ``tuning``: the kernel design and its block shapes, warps and ring options (None: the defaults)."""
    if tuning is None:
        tuning = _DEFAULT_TUNING
    elif not isinstance(tuning, SelectiveScanTuning):
        raise TypeError(f"selective_scan: tuning must be a SelectiveScanTuning or None, got "
                        f"{type(tuning).__name__}")
    if u.numel() == 0:
        # nothing to scan: zero outputs, and each sequence's final state is its initial state
        n_seq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        y = torch.zeros_like(u)
        if initial_state is not None:
            return y, initial_state.to(torch.float32)
        return y, torch.zeros(n_seq, u.shape[2], A.shape[-1], dtype=torch.float32, device=u.device)
    opts = (bool(delta_softplus), discretization, lengths, cu_seqlens, tuning)
    if tuning.kernel == "chunked":
        from seqblocks.ops.selective_scan.triton_chunked import selective_scan_chunked

        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state, opts)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state, opts)
