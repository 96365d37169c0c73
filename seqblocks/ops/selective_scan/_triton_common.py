"""Helpers shared by the two Triton designs of the selective scan (``triton.py``, the ring kernels,
and ``triton_chunked.py``, the chunked ones): the discretisation and fast-math device functions, the
launch-shape defaults, input preparation and the gradient buffers. Imported only by those two modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled
from seqblocks.ops.selective_scan.tuning import SelectiveScanTuning


class _Ctx:
    """A plain namespace for one call's shapes, strides and options."""


# The default block shapes follow the mode (see seqblocks/ops/scan/triton.py); explicit tuning wins in both.
INTERPRETED = interpreter_enabled()


_METHODS = {"mamba": 0, "zoh": 1, "bilinear": 2, "dirac": 3}


@triton.jit
def _ex2(x, FAST: tl.constexpr):
    # 2^x. On the GPU the flush-to-zero approximation, one MUFU instruction: the default lowering adds
    # a four-instruction range fix-up for results under 2^-126, which are zeros for every use here.
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softplus_f(x, FAST: tl.constexpr):
    # _softplus through _ex2 / _lg2 (the time-loop kernels, one value per channel and step)
    e = _ex2(x * 1.4426950408889634, FAST)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, _lg2(1.0 + e, FAST) * 0.6931471805599453))


@triton.jit
def _sigmoid_f(x, FAST: tl.constexpr):
    return _rcp(1.0 + _ex2(x * -1.4426950408889634, FAST), FAST)


@triton.jit
def _discretize_row(A, A2, dt, dtA, METHOD: tl.constexpr, HAS_DA: tl.constexpr, FAST: tl.constexpr):
    # _discretize for one step of the time-loop kernels: A, A2 = A log2(e) [BD, BN]; dt, dt_A [BD, 1].
    # Returns (Ā, γ, E); γ stays [BD, 1] where it does not depend on A (mamba: dt, dirac: 1), which
    # saves a [BD, BN] multiply per use. The exponential methods go through _ex2 (ZOH keeps the
    # precise exp: its γ = dt (E - 1) / log E needs E above the flush-to-zero range).
    if METHOD == 2:
        s = dtA * A * 0.5
        Abar = (1.0 + s) / (1.0 - s)
        gamma = dt / (1.0 - dt * A * 0.5)
        E = Abar
    elif METHOD == 1:
        Abar = tl.exp(dtA * A)
        E = Abar
        if HAS_DA:
            E = tl.exp(dt * A)
        lg = tl.log(E)
        safe = tl.where(lg == 0.0, 1.0, lg)
        gamma = tl.where(lg == 0.0, dt + 0.0 * A, dt * (E - 1.0) / safe)
    else:
        Abar = _ex2(dtA * A2, FAST)
        E = Abar
        if METHOD == 3:
            gamma = dt * 0.0 + 1.0
        else:
            gamma = dt
    return Abar, gamma, E


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _blocks(N: int, ch_per_g: int, tuning: SelectiveScanTuning) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N, num_warps) of the backward (BLOCK_T is also the forward's checkpoint
    interval): ``tuning``'s values, defaults for its None fields; BLOCK_D divides the channels of a group."""
    bn = max(_next_pow2(N), 2)
    if INTERPRETED:
        bt, bd, warps = 8, 4, 1
    else:
        # One warp per program holding a [BLOCK_D, BLOCK_N] state; the per-program history slot
        # (BLOCK_T x BLOCK_D x BLOCK_N fp32) stays small enough for all of them to live in L2.
        bt, warps = 16, 1
        bd = max(1, 256 // bn)
        if bn > 64:
            warps = 4
            bd = max(1, 2048 // bn)
    bt = bt if tuning.block_t is None else tuning.block_t
    bd = bd if tuning.bwd_block_d is None else tuning.bwd_block_d
    warps = warps if tuning.bwd_num_warps is None else tuning.bwd_num_warps
    bd = max(1, min(bd, _largest_pow2_divisor(ch_per_g)))
    return bt, bd, bn, warps


def _ckpt_interval(bt: int, tuning: SelectiveScanTuning) -> int:
    """The forward's checkpoint interval: a power-of-two multiple of ``bt`` (a smaller ``ckpt_t`` is
    raised to ``bt``); by default 8 chunks (2 interpreted, so that the tests cross segments)."""
    ck = (2 if INTERPRETED else 8) * bt if tuning.ckpt_t is None else tuning.ckpt_t
    return max(ck, bt)


def _prep(u, delta, A, B, C, delta_A, lengths, cu_seqlens, tuning):
    p = _Ctx()
    p.Bsz, p.T, p.D = u.shape
    p.N = A.shape[-1]
    grouped = B.dim() == 4
    p.G = B.shape[2] if grouped else 1
    p.ch_per_g = p.D // p.G
    p.Bshape = B.shape
    # B and C in fp32: every program of a group reads each row (broadcast over its channels), and
    # fp32 rows skip a conversion per element and step in the time loops; the copies are small.
    p.B4 = (B if grouped else B.unsqueeze(2)).to(torch.float32).contiguous()
    p.C4 = (C if grouped else C.unsqueeze(2)).to(torch.float32).contiguous()
    if cu_seqlens is not None:
        p.seq_mode, p.n_seq = 2, cu_seqlens.numel() - 1
    elif lengths is not None:
        p.seq_mode, p.n_seq = 1, p.Bsz
    else:
        p.seq_mode, p.n_seq = 0, p.Bsz
    p.bt, p.bd, p.bn, p.warps = _blocks(p.N, p.ch_per_g, tuning)
    p.ck_t = _ckpt_interval(p.bt, tuning)
    p.nc = max(1, -(-p.T // p.ck_t))
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


def _z_strides(z):
    return (0, 0) if z is None else (z.stride(0), z.stride(1))


def _grad_buffers(p, u, delta, A, D, z, delta_bias, delta_A, n_db):
    """The backward kernels' outputs: (du, ddelta, dA, dB, dC, dD, dz, dbias, d delta_A, its strides,
    dh0); dB, dC are per-channel-block partial sums [n_db, B, T, N] fp32; absent ones are a dummy."""
    dev = u.device
    dummy = p.lens
    f32 = dict(dtype=torch.float32, device=dev)
    alloc = torch.zeros if p.seq_mode == 1 else torch.empty
    du = alloc(u.shape, dtype=u.dtype, device=dev)
    ddelta = alloc(delta.shape, dtype=delta.dtype, device=dev)
    dz = alloc(z.shape, dtype=z.dtype, device=dev) if z is not None else dummy
    dA = torch.zeros(A.shape, **f32)
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
    return du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, ddA_strides, dh0


def _grads(ctx, p, bufs, A, D, z, delta_bias, delta_A, h0, Bshape, Cshape, Bdt, Cdt):
    """The gradients ``backward`` returns, from the kernel's buffers (``_grad_buffers``)."""
    du, ddelta, dA, dB, dC, dD, dz, dbias, ddA, _strides, dh0 = bufs
    # [G * blocks per group, B, T, N] -> [B, T, G, N]: the blocks of a group are consecutive.
    dB = dB.view(p.G, -1, p.Bsz, p.T, p.N).sum(1).permute(1, 2, 0, 3)
    dC = dC.view(p.G, -1, p.Bsz, p.T, p.N).sum(1).permute(1, 2, 0, 3)
    grads = [du, ddelta, dA.to(A.dtype), dB.reshape(Bshape).to(Bdt), dC.reshape(Cshape).to(Cdt),
             dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
             dbias.to(delta_bias.dtype) if delta_bias is not None else None,
             ddA.to(delta_A.dtype) if delta_A is not None else None,
             dh0.to(h0.dtype) if h0 is not None else None, None]
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad + (False,)))
