"""Triton kernels of SSD (Mamba-2's scan): the chunked form forward and backward, and the decode step.

The chunked form (see ``torch.py`` for the same math in PyTorch), with chunks of ``L`` steps (256 by
default) worked on in tiles of ``BL`` steps (``TILES``), the log-decay ``a = step * A`` and its
within-chunk running sum ``acs``::

    forward   1. _chunk_state_fwd   per (chunk, row, head): acs, and the chunk's own end state
                                    S = sum_s exp(acs[L-1] - acs[s]) step[s] x[s] B[s]^T     [P, N]
              2. _state_pass_fwd    per (row, head, block of P*N): the sequential pass over chunks,
                                    h_in[c] = h; h = exp(acs_c[L-1]) h + S_c   (written over S, in place)
              3. _chunk_scan_fwd    per (tile, row, head): y = (C B^T * decay mask * step) x over
                                    the tiles up to the diagonal + exp(acs) * C h_in^T + D x
    backward  1. _chunk_dstate_bwd  per chunk: the gradient the outputs send to the incoming state,
                                    sum_l exp(acs[l]) dy[l] C[l]^T
              2. _state_pass_bwd    the reverse pass: g_c, the gradient of chunk c's end state
              3. _chunk_bwd_source  per (block of steps, row, head) as sources: dx, d step, dB, dD
              4. _chunk_bwd_row     the same blocks as output rows: dC
                                    (both give shares of d acs; a reverse cumsum per chunk in PyTorch
                                    turns them into d step and dA)

Steps are processed in PyTorch before the kernels (``dt + dt_bias``, softplus, the limits, zeroed on
padding), so autograd carries d step back to ``dt`` and ``dt_bias``; the z gate is applied after the
kernels the same way. The D skip is fused (output kernel; dD and D dy in the source kernel).
``lengths`` zero the steps of padding (the state passes through unchanged) and the outputs there;
``cu_seqlens`` run as a padded batch (``unpack`` / ``pack``).

``exp(acs[l] - acs[s])`` is taken for ``l >= s`` only (the exponent is then <= 0 for a stable A), so no
masked entry can overflow. Matrix products take the inputs' dtype as operands (bf16 / fp16 on the
tensor cores; fp32 as exact IEEE products) and accumulate in fp32; states, steps and decays are fp32.

Shapes: B batch, T time, H heads, P head width, N state, G groups, c chunks, L chunk length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.ssd._common import process_dt
from seqblocks.ops.triton_dot import dot, dot_mode

__all__ = ["ssd_triton", "ssd_state_update_triton", "DEFAULT_CHUNK", "TILES"]

DEFAULT_CHUNK = 256  # chunks of 256 steps: few states to store and pass (mamba_ssm's choice too)
# A program's tile of time steps, (forward, backward row kernel, backward source kernel), by operand
# dtype. Chosen from an offline sm_90 compile (register use, no or little local memory at P = 64,
# N = 128): the source kernel holds two accumulators (du, dB), and fp32 operands take the FMA path.
TILES = {"half": (64, 64, 32), "fp32": (32, 16, 16)}


def _block(n: int) -> int:
    """A power-of-two tile width >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _chunk_state_fwd(x_ptr, step_ptr, A_ptr, B_ptr, acs_ptr, S_ptr,
                     T, H, G, P, N, Tp, nc,
                     CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    g = h // (H // G)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    A = tl.load(A_ptr + h).to(tl.float32)
    S = tl.zeros([BP, BN], dtype=tl.float32)
    running = tl.sum(tl.zeros([BL], dtype=tl.float32), 0)
    # Blocks of BL steps in order; S is the state at the end of the blocks so far (from a zero start).
    for kb in range(CH // BL):
        t = c * CH + kb * BL + tl.arange(0, BL)
        tm = t < T
        step = tl.load(step_ptr + (b * T + t) * H + h, mask=tm, other=0.0)
        a = step * A
        acs = running + tl.cumsum(a, 0)
        tl.store(acs_ptr + bh * Tp + t, acs, mask=t < Tp)
        end = running + tl.sum(a, 0)
        x = tl.load(x_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=tm[:, None] & (p[None, :] < P),
                    other=0.0)
        Bm = tl.load(B_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :],
                     mask=tm[:, None] & (n[None, :] < N), other=0.0)
        xw = (x.to(tl.float32) * (tl.exp(end - acs) * step)[:, None]).to(x.dtype)
        S = tl.exp(end - running) * S + dot(tl.trans(xw), Bm, IEEE)          # [P, N]
        running = end
    tl.store(S_ptr + (((b * nc + c) * H + h) * P + p[:, None]) * N + n[None, :], S,
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _state_pass_fwd(S_ptr, acs_ptr, h0_ptr, final_ptr, H, PN, Tp, nc,
                    CH: tl.constexpr, BLOCK: tl.constexpr, HAS_H0: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < PN
    if HAS_H0:
        state = tl.load(h0_ptr + bh * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(nc):
        ptr = S_ptr + ((b * nc + c) * H + h) * PN + i
        S = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, state, mask=m)                                          # S_c becomes h_in[c]
        decay = tl.exp(tl.load(acs_ptr + bh * Tp + c * CH + CH - 1))
        state = decay * state + S
    tl.store(final_ptr + bh * PN + i, state, mask=m)


@triton.jit
def _chunk_scan_fwd(x_ptr, step_ptr, B_ptr, C_ptr, D_ptr, acs_ptr, hin_ptr, y_ptr,
                    T, H, G, P, N, Tp, nc,
                    CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                    HAS_D: tl.constexpr, D_PER_P: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    c = pid // (CH // BL)
    j = pid % (CH // BL)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    g = h // (H // G)
    t = c * CH + j * BL + tl.arange(0, BL)                                    # output rows l
    tm = t < T
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    acs = tl.load(acs_ptr + bh * Tp + t, mask=t < Tp, other=0.0)
    Cm = tl.load(C_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=tm[:, None] & nm[None, :], other=0.0)
    hin = tl.load(hin_ptr + (((b * nc + c) * H + h) * P + p[:, None]) * N + n[None, :],
                  mask=pm[:, None] & nm[None, :], other=0.0)                  # [P, N] fp32
    y = dot(Cm, tl.trans(hin.to(Cm.dtype)), IEEE) * tl.exp(acs)[:, None]    # the incoming state
    for i in range(j + 1):                                                    # source blocks s <= l
        s = c * CH + i * BL + tl.arange(0, BL)
        sm = s < T
        step = tl.load(step_ptr + (b * T + s) * H + h, mask=sm, other=0.0)
        acs_s = tl.load(acs_ptr + bh * Tp + s, mask=s < Tp, other=0.0)
        Bm = tl.load(B_ptr + ((b * T + s[:, None]) * G + g) * N + n[None, :], mask=sm[:, None] & nm[None, :],
                     other=0.0)
        xs = tl.load(x_ptr + ((b * T + s[:, None]) * H + h) * P + p[None, :], mask=sm[:, None] & pm[None, :],
                     other=0.0)
        causal = t[:, None] >= s[None, :]
        seg = tl.where(causal, acs[:, None] - acs_s[None, :], -float("inf"))
        # Later sources must not reach row l through 0 * NaN: a non-finite B or step is masked out of
        # the scores, and a non-finite x is zeroed and poisons only rows at or after it (same p).
        scores = tl.where(causal, dot(Cm, tl.trans(Bm), IEEE) * tl.exp(seg) * step[None, :], 0.0)  # [l, s]
        bad = (xs != xs) | (tl.abs(xs.to(tl.float32)) == float("inf"))
        y += dot(scores.to(xs.dtype), tl.where(bad, 0.0, xs).to(xs.dtype), IEEE)
        # bad sources at or before row l: all of an earlier tile, a running count on the diagonal
        seen = tl.cumsum(bad.to(tl.int32), 0)
        seen = tl.where(i < j, tl.sum(bad.to(tl.int32), 0)[None, :], seen)
        y = tl.where(seen > 0, float("nan"), y)
    xp_off = ((b * T + t[:, None]) * H + h) * P + p[None, :]
    xp_m = tm[:, None] & pm[None, :]
    if HAS_D:
        x = tl.load(x_ptr + xp_off, mask=xp_m, other=0.0).to(tl.float32)
        if D_PER_P:
            y += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + xp_off, y.to(y_ptr.dtype.element_ty), mask=xp_m)


@triton.jit
def _chunk_dstate_bwd(dy_ptr, C_ptr, acs_ptr, dS_ptr,
                      T, H, G, P, N, Tp, nc,
                      CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    g = h // (H // G)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    dS = tl.zeros([BP, BN], dtype=tl.float32)
    for kb in range(CH // BL):
        t = c * CH + kb * BL + tl.arange(0, BL)
        tm = t < T
        acs = tl.load(acs_ptr + bh * Tp + t, mask=t < Tp, other=0.0)
        dy = tl.load(dy_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :], mask=tm[:, None] & (p[None, :] < P),
                     other=0.0)
        Cm = tl.load(C_ptr + ((b * T + t[:, None]) * G + g) * N + n[None, :], mask=tm[:, None] & (n[None, :] < N),
                     other=0.0)
        dye = (dy.to(tl.float32) * tl.exp(acs)[:, None]).to(Cm.dtype)
        dS += dot(tl.trans(dye), Cm, IEEE)                                    # [P, N]
    tl.store(dS_ptr + (((b * nc + c) * H + h) * P + p[:, None]) * N + n[None, :], dS,
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _state_pass_bwd(dS_ptr, hin_ptr, acs_ptr, dfinal_ptr, dh0_ptr, ddecay_ptr, H, PN, Tp, nc,
                    CH: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < PN
    if HAS_DFINAL:
        gstate = tl.load(dfinal_ptr + bh * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        gstate = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(nc):
        c = nc - 1 - k
        off = ((b * nc + c) * H + h) * PN + i
        dS = tl.load(dS_ptr + off, mask=m, other=0.0)
        tl.store(dS_ptr + off, gstate, mask=m)                                 # becomes g_c
        decay = tl.exp(tl.load(acs_ptr + bh * Tp + c * CH + CH - 1))
        hin = tl.load(hin_ptr + off, mask=m, other=0.0)
        # d(chunk decay) * decay: this block's share of the gradient of acs at the chunk's end
        tl.store(ddecay_ptr + (blk * tl.num_programs(1) + bh) * nc + c, decay * tl.sum(gstate * hin, 0))
        gstate = decay * gstate + dS
    tl.store(dh0_ptr + bh * PN + i, gstate, mask=m)


@triton.jit
def _chunk_bwd_source(x_ptr, step_ptr, B_ptr, C_ptr, D_ptr, acs_ptr, gout_ptr, dy_ptr,
                      dx_ptr, dstep_ptr, dB_ptr, dacs_ptr, w_ptr, dD_ptr,
                      T, H, G, P, N, Tp, nc,
                      CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
                      HAS_D: tl.constexpr, D_PER_P: tl.constexpr):
    """This block's steps as sources s: what their inputs send to the chunk's end state and to the rows
    l >= s. Writes dx, d step (through u = step * x), dB, and the source share of d acs."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    NB: tl.constexpr = CH // BL
    c = pid // NB
    j = pid % NB
    b = bh // H
    h = bh % H
    g = h // (H // G)
    # One int64 base per tensor (B T H P can pass 2^31); offsets inside a row stay int32 (fewer registers).
    x_ptr += (b.to(tl.int64) * T * H + h) * P
    dy_ptr += (b.to(tl.int64) * T * H + h) * P
    dx_ptr += (b.to(tl.int64) * T * H + h) * P
    B_ptr += (b.to(tl.int64) * T * G + g) * N
    C_ptr += (b.to(tl.int64) * T * G + g) * N
    step_ptr += b.to(tl.int64) * T * H + h
    dstep_ptr += b.to(tl.int64) * T * H + h
    gout_ptr += ((b.to(tl.int64) * nc + c) * H + h) * P * N
    dB_ptr += (b.to(tl.int64) * T * H + h) * N
    t = c * CH + j * BL + tl.arange(0, BL)
    tm = t < T
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    step = tl.load(step_ptr + t * H, mask=tm, other=0.0)
    acs = tl.load(acs_ptr + bh * Tp + t, mask=t < Tp, other=0.0)
    total = tl.load(acs_ptr + bh * Tp + c * CH + CH - 1)
    xp_off = t[:, None] * (H * P) + p[None, :]
    xp_m = tm[:, None] & pm[None, :]
    x = tl.load(x_ptr + xp_off, mask=xp_m, other=0.0)
    bc_m = tm[:, None] & nm[None, :]
    Bm = tl.load(B_ptr + t[:, None] * (G * N) + n[None, :], mask=bc_m, other=0.0)
    u = (x.to(tl.float32) * step[:, None]).to(x.dtype)                       # [s, P] step * x
    gout = tl.load(gout_ptr + p[:, None] * N + n[None, :],
                   mask=pm[:, None] & nm[None, :], other=0.0).to(x.dtype)     # [P, N]
    e_out = tl.exp(total - acs)
    du = dot(Bm, tl.trans(gout), IEEE) * e_out[:, None]                      # [s, P]
    dB = dot(u, gout, IEEE) * e_out[:, None]                                 # [s, N]
    w = tl.sum(dB * Bm.to(tl.float32), 1)                                     # feeds d acs[CH - 1]
    dacs = -w
    for i in range(j, NB):                                                    # rows l >= s
        lt = c * CH + i * BL + tl.arange(0, BL)
        lm = lt < T
        acs_l = tl.load(acs_ptr + bh * Tp + lt, mask=lt < Tp, other=0.0)
        Cl = tl.load(C_ptr + lt[:, None] * (G * N) + n[None, :], mask=lm[:, None] & nm[None, :],
                     other=0.0)
        dyl = tl.load(dy_ptr + lt[:, None] * (H * P) + p[None, :], mask=lm[:, None] & pm[None, :],
                      other=0.0).to(x.dtype)
        dec = tl.exp(tl.where(lt[None, :] >= t[:, None], acs_l[None, :] - acs[:, None], -float("inf")))  # [s, l]
        CBd = dot(Bm, tl.trans(Cl), IEEE) * dec
        DU = dot(u, tl.trans(dyl), IEEE)                                     # [s, l]: dy[l] . u[s]
        du += dot(CBd.to(x.dtype), dyl, IEEE)
        dB += dot((DU * dec).to(Cl.dtype), Cl, IEEE)
        dacs -= tl.sum(CBd * DU, 1)
    dx = du * step[:, None]
    dstep = tl.sum(du * x.to(tl.float32), 1)
    if HAS_D:
        dyf = tl.load(dy_ptr + xp_off, mask=xp_m, other=0.0).to(tl.float32)
        if D_PER_P:
            dx += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * dyf
        else:
            dx += tl.load(D_ptr + h).to(tl.float32) * dyf
        tl.store(dD_ptr + (((b * nc + c) * NB + j) * H + h) * P + p, tl.sum(dyf * x.to(tl.float32), 0), mask=pm)
    tl.store(dx_ptr + xp_off, dx.to(dx_ptr.dtype.element_ty), mask=xp_m)
    tl.store(dstep_ptr + t * H, dstep, mask=tm)
    tl.store(dB_ptr + t[:, None] * (H * N) + n[None, :], dB, mask=bc_m)
    tl.store(dacs_ptr + bh * Tp + t, dacs, mask=t < Tp)
    tl.store(w_ptr + bh * Tp + t, w, mask=t < Tp)


@triton.jit
def _chunk_bwd_row(x_ptr, step_ptr, B_ptr, C_ptr, acs_ptr, hin_ptr, dy_ptr, dC_ptr, dacs_ptr,
                   T, H, G, P, N, Tp, nc,
                   CH: tl.constexpr, BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """This block's steps as rows l: what they read from the sources s <= l and from the incoming
    state. Writes dC and the row share of d acs."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    NB: tl.constexpr = CH // BL
    c = pid // NB
    j = pid % NB
    b = bh // H
    h = bh % H
    g = h // (H // G)
    # One int64 base per tensor (B T H P can pass 2^31); offsets inside a row stay int32 (fewer registers).
    x_ptr += (b.to(tl.int64) * T * H + h) * P
    dy_ptr += (b.to(tl.int64) * T * H + h) * P
    B_ptr += (b.to(tl.int64) * T * G + g) * N
    C_ptr += (b.to(tl.int64) * T * G + g) * N
    step_ptr += b.to(tl.int64) * T * H + h
    hin_ptr += ((b.to(tl.int64) * nc + c) * H + h) * P * N
    dC_ptr += (b.to(tl.int64) * T * H + h) * N
    t = c * CH + j * BL + tl.arange(0, BL)
    tm = t < T
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    acs = tl.load(acs_ptr + bh * Tp + t, mask=t < Tp, other=0.0)
    bc_m = tm[:, None] & nm[None, :]
    Cm = tl.load(C_ptr + t[:, None] * (G * N) + n[None, :], mask=bc_m, other=0.0)
    dy = tl.load(dy_ptr + t[:, None] * (H * P) + p[None, :], mask=tm[:, None] & pm[None, :],
                 other=0.0).to(Cm.dtype)
    hin = tl.load(hin_ptr + p[:, None] * N + n[None, :],
                  mask=pm[:, None] & nm[None, :], other=0.0).to(Cm.dtype)     # [P, N]
    dC = dot(dy, hin, IEEE) * tl.exp(acs)[:, None]                           # [l, N]
    dacs = tl.sum(dC * Cm.to(tl.float32), 1)
    for i in range(j + 1):                                                    # sources s <= l
        s = c * CH + i * BL + tl.arange(0, BL)
        sm = s < T
        acs_s = tl.load(acs_ptr + bh * Tp + s, mask=s < Tp, other=0.0)
        step_s = tl.load(step_ptr + s * H, mask=sm, other=0.0)
        Bs = tl.load(B_ptr + s[:, None] * (G * N) + n[None, :], mask=sm[:, None] & nm[None, :],
                     other=0.0)
        xs = tl.load(x_ptr + s[:, None] * (H * P) + p[None, :], mask=sm[:, None] & pm[None, :],
                     other=0.0)
        us = (xs.to(tl.float32) * step_s[:, None]).to(Cm.dtype)
        dec = tl.exp(tl.where(t[:, None] >= s[None, :], acs[:, None] - acs_s[None, :], -float("inf")))  # [l, s]
        DUd = dot(dy, tl.trans(us), IEEE) * dec
        dC += dot(DUd.to(Bs.dtype), Bs, IEEE)
        dacs += tl.sum(DUd * dot(Cm, tl.trans(Bs), IEEE), 1)
    tl.store(dC_ptr + t[:, None] * (H * N) + n[None, :], dC, mask=bc_m)
    tl.store(dacs_ptr + bh * Tp + t, dacs, mask=t < Tp)


def _launch_shape(x: torch.Tensor, B: torch.Tensor, CH: int):
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(T, CH)
    return Bsz, T, H, P, G, N, nc, nc * CH


def _state_block(PN: int) -> int:
    return min(1024, triton.next_power_of_2(PN))


class _SSDCore(torch.autograd.Function):
    """(x, step, A, B, C, D, h0) -> (y, final fp32): the chunked scan with steps already processed and
    the D skip fused; y in ``out_dtype``."""

    @staticmethod
    def forward(ctx, x, step, A, B, C, D, h0, CH, tiles, out_dtype):
        BL = tiles[0]
        Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
        BP, BN, PN = _block(P), _block(N), P * N
        dev = x.device
        acs = torch.empty(Bsz, H, Tp, dtype=torch.float32, device=dev)
        states = torch.empty(Bsz, nc, H, P, N, dtype=torch.float32, device=dev)
        final = torch.empty(Bsz, H, P, N, dtype=torch.float32, device=dev)
        y = torch.empty(Bsz, T, H, P, dtype=out_dtype, device=dev)
        ieee = dot_mode(x)
        meta = dict(CH=CH, BL=BL, BP=BP, BN=BN, IEEE=ieee)
        _chunk_state_fwd[(nc, Bsz * H)](x, step, A, B, acs, states, T, H, G, P, N, Tp, nc, **meta, num_warps=8)
        SB = _state_block(PN)
        _state_pass_fwd[(triton.cdiv(PN, SB), Bsz * H)](states, acs, h0 if h0 is not None else final, final,
                                                        H, PN, Tp, nc, CH=CH, BLOCK=SB, HAS_H0=h0 is not None,
                                                        num_warps=4)
        _chunk_scan_fwd[(nc * (CH // BL), Bsz * H)](x, step, B, C, D if D is not None else A, acs, states, y,
                                                    T, H, G, P, N, Tp, nc, **meta, HAS_D=D is not None,
                                                    D_PER_P=D is not None and D.dim() == 2, num_warps=4)
        ctx.save_for_backward(x, step, A, B, C, D, acs, states)
        ctx.CH, ctx.tiles, ctx.has_h0 = CH, tiles, h0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, step, A, B, C, D, acs, states = ctx.saved_tensors
        CH, (_, BL, BLs) = ctx.CH, ctx.tiles
        Bsz, T, H, P, G, N, nc, Tp = _launch_shape(x, B, CH)
        BP, BN, PN = _block(P), _block(N), P * N
        NB = CH // BL
        dev = x.device
        f32 = dict(dtype=torch.float32, device=dev)
        dy = torch.zeros(x.shape, **f32) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        ieee = dot_mode(x)
        meta = dict(CH=CH, BL=BL, BP=BP, BN=BN, IEEE=ieee)
        gout = torch.empty(Bsz, nc, H, P, N, **f32)
        dh0 = torch.empty(Bsz, H, P, N, **f32)
        _chunk_dstate_bwd[(nc, Bsz * H)](dy, C, acs, gout, T, H, G, P, N, Tp, nc, **meta, num_warps=8)
        SB = _state_block(PN)
        nblk = triton.cdiv(PN, SB)
        ddecay = torch.empty(nblk, Bsz, H, nc, **f32)
        _state_pass_bwd[(nblk, Bsz * H)](gout, states, acs, dfinal if dfinal is not None else dh0, dh0, ddecay,
                                         H, PN, Tp, nc, CH=CH, BLOCK=SB, HAS_DFINAL=dfinal is not None,
                                         num_warps=4)
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
        dstep = torch.empty(Bsz, T, H, **f32)
        dBh = torch.empty(Bsz, T, H, N, **f32)
        dCh = torch.empty(Bsz, T, H, N, **f32)
        dacs_src, dacs_row = torch.empty(2, Bsz, H, Tp, **f32).unbind(0)
        w = torch.empty(Bsz, H, Tp, **f32)
        dD = torch.empty(Bsz, nc * (CH // BLs), H, P, **f32) if D is not None else w
        _chunk_bwd_source[(nc * (CH // BLs), Bsz * H)](x, step, B, C, D if D is not None else A, acs, gout, dy, dx,
                                                       dstep, dBh, dacs_src, w, dD, T, H, G, P, N, Tp, nc,
                                                       **dict(meta, BL=BLs), HAS_D=D is not None,
                                                       D_PER_P=D is not None and D.dim() == 2, num_warps=8)
        _chunk_bwd_row[(nc * NB, Bsz * H)](x, step, B, C, acs, states, dy, dCh, dacs_row, T, H, G, P, N, Tp, nc,
                                           **meta, num_warps=8)
        dacs = dacs_src + dacs_row
        # d acs -> d a: a reverse cumsum inside each chunk, plus the gradient of the chunk's end value.
        dlast = w.view(Bsz, H, nc, CH).sum(-1) + ddecay.sum(0)                # [B, H, c]
        da = dacs.view(Bsz, H, nc, CH).flip(-1).cumsum(-1).flip(-1) + dlast.unsqueeze(-1)
        da = da.view(Bsz, H, Tp)[..., :T].transpose(1, 2)                      # [B, T, H]
        dstep = dstep + da * A
        dA = (da * step).sum((0, 1))
        dB = dBh.view(Bsz, T, G, H // G, N).sum(3).to(B.dtype)
        dC = dCh.view(Bsz, T, G, H // G, N).sum(3).to(C.dtype)
        dDout = None
        if D is not None:
            dDout = dD.sum((0, 1))
            dDout = (dDout if D.dim() == 2 else dDout.sum(-1)).to(D.dtype)
        return dx, dstep, dA.to(A.dtype), dB, dC, dDout, dh0 if ctx.has_h0 else None, None, None, None


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    block_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD through the Triton kernels; see ``seqblocks.ops.ssd.ssd`` for the contract (inputs valid,
    fp16 / bf16 / fp32). ``chunk_size`` is rounded up to a power of two in [16, 256]; ``block_len``
    (default ``TILES`` by dtype, at most the chunk) is the tile of time steps of every kernel."""
    if cu_seqlens is not None:
        xx, dd, BB, CC = (unpack(t, cu_seqlens)[0] for t in (x, dt, B, C))
        zz = None if z is None else unpack(z, cu_seqlens)[0]
        y, final = ssd_triton(xx, dd, A, BB, CC, D, zz, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                              initial_state=initial_state, return_final_state=True, lengths=cu_seqlens.diff(),
                              chunk_size=chunk_size, block_len=block_len)
        y = pack(y, cu_seqlens)
        return (y, final) if return_final_state else y

    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    if Bsz == 0 or T == 0:
        h0 = torch.zeros(Bsz, H, P, N, dtype=torch.float32, device=x.device) if initial_state is None \
            else initial_state.float()
        y = x.new_zeros(x.shape)
        return (y, h0.clone()) if return_final_state else y
    CH = _block(min(chunk_size, 256))
    tiles = TILES["fp32" if x.dtype == torch.float32 else "half"] if block_len is None else (_block(block_len),) * 3
    tiles = tuple(min(CH, t) for t in tiles)
    step = process_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)       # [B, T, H]
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=x.device) < lengths.to(x.device).unsqueeze(1)  # [B, T]
        step = torch.where(valid.unsqueeze(-1), step, torch.zeros((), device=x.device))
    if valid is not None:  # padding never reads x or B (0 * NaN would reach the state and earlier rows)
        x = torch.where(valid[..., None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        B = torch.where(valid[..., None, None], B, torch.zeros((), dtype=B.dtype, device=B.device))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    # Without a gate or padding to apply afterwards, the kernel writes y in x's dtype directly.
    out_dtype = x.dtype if z is None and valid is None else torch.float32
    y, final = _SSDCore.apply(x.contiguous(), step.contiguous(), A.float().contiguous(), B.contiguous(),
                              C.contiguous(), None if D is None else D.contiguous(), h0, CH, tiles, out_dtype)
    if z is not None:
        y = y * F.silu(z.float())
    if valid is not None:
        y = torch.where(valid[..., None, None], y, torch.zeros((), device=x.device))
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y


@triton.jit
def _state_update(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                  H, G, P, N, lo, hi,
                  BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
                  HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B T H P passes 2^31 at long contexts
    h = bh % H
    g = h // (H // G)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pm = p < P
    nm = n < N
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))), dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + (b * G + g) * N + n, mask=nm, other=0.0).to(tl.float32)
    s_off = (bh * P + p[:, None]) * N + n[None, :]
    s_m = pm[:, None] & nm[None, :]
    s = tl.load(state_ptr + s_off, mask=s_m, other=0.0).to(tl.float32)
    s = decay * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + s_off, s.to(state_ptr.dtype.element_ty), mask=s_m)
    y = tl.sum(s * Cv[None, :], 1)
    if HAS_D:
        if D_PER_P:
            y += tl.load(D_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + bh * P + p, mask=pm, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(y_ptr + bh * P + p, y, mask=pm)


def ssd_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """The decode step in one kernel (grid: rows x heads x blocks of P); ``state`` must be contiguous
    and is overwritten in place. See ``seqblocks.ops.ssd.ssd_state_update``."""
    Bsz, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    D = None if D is None else D.contiguous()
    y = torch.empty_like(x)
    BN = triton.next_power_of_2(N)
    BP = min(triton.next_power_of_2(P), max(1, 4096 // BN))
    lo, hi = dt_limit
    clamp = lo > 0 or hi < math.inf
    _state_update[(Bsz * H, triton.cdiv(P, BP))](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else dt, y, H, G, P, N, float(lo), float(min(hi, 3.0e38)),
        BP=BP, BN=BN, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp, num_warps=4)
    return y
