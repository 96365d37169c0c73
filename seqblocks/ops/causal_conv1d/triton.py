"""Triton kernels of the causal depthwise conv1d, forward, backward and the decode step.

Imported only through ``seqblocks.ops.causal_conv1d`` once ``resolve_backend`` has chosen "triton".
The spec is ``reference.py``; these kernels compute the same function (tested forward and backward).

Design (see docs/kernels.md, "Causal depthwise conv1d"):

- Layout x [B, T, D], channels last (unit stride over D; any batch / time strides, so a slice of a
  projection's output is read in place). A program owns one row and a [BLOCK_T, BLOCK_D] tile:
  loads run along the channels (coalesced), and the W taps are W shifted loads of the same tile,
  which hit in cache, so HBM sees one read of x and one write of y. Positions before the segment
  come from ``initial_state``; the program of the first time tile also writes the row's final state
  (the W - 1 inputs before its length), so no second launch is needed.
- Backward, per row, in "extended" coordinates e = t + W - 1 over [initial_state, x]:
  ``d ext[e] = sum_j w[W-1-j] dz[e-(W-1)+j] + dfinal[e - length]``; e < W - 1 is the initial
  state's gradient, the rest is dx. With SiLU the pre-activation z is recomputed from x (W shifted
  loads per needed tap) instead of being saved. A program walks ``TILES`` time tiles and keeps its
  share of dweight / dbias in fp32 registers; each program stores one partial and the partials are
  summed in a fixed order afterwards (deterministic, no atomics).
- The decode step is its own small kernel: one program per (row, channel block) reads the W - 1
  state columns and x, writes y and shifts the state in place (each program owns its state slice).

Shapes: B batch, T time, D channels, W filter width, P partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton", "MAX_WIDTH"]

MAX_WIDTH = 8

# Forward / backward tiles; each program moves [BLOCK_T, BLOCK_D] elements per step. Under Triton's
# interpreter (fixed process-wide when Triton is imported) small tiles keep the CPU tests fast and
# still cross tile, chunk and channel-block boundaries.
if interpreter_enabled():
    _FWD = dict(BLOCK_T=16, BLOCK_D=64, num_warps=1)
    _BWD = dict(BLOCK_T=16, BLOCK_D=32, num_warps=1, TILES=2)
else:
    _FWD = dict(BLOCK_T=32, BLOCK_D=128, num_warps=4)
    _BWD = dict(BLOCK_T=32, BLOCK_D=128, num_warps=4, TILES=8)


@triton.jit
def _load_ext(X, INIT, b, t, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
              W: tl.constexpr, HAS_INIT: tl.constexpr):
    # [BT, BD] fp32 inputs at times t (t < 0: the initial state; t < -(W-1) or t >= T: 0).
    in_x = (t >= 0) & (t < T)
    v = tl.load(X + b * stride_xb + t.to(tl.int64)[:, None] * stride_xt + d[None, :],
                mask=in_x[:, None] & dm[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        ti = t + (W - 1)
        in_s = (t < 0) & (ti >= 0)
        v += tl.load(INIT + b * stride_ib + ti[:, None] * stride_it + d[None, :],
                     mask=in_s[:, None] & dm[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _preact(X, INIT, WT, BIAS, b, t, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
            W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # z[t] = bias + sum_k w[k] x[t - (W-1) + k], fp32.
    z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        wk = tl.load(WT + d * W + k, mask=dm, other=0.0).to(tl.float32)
        z += wk[None, :] * _load_ext(X, INIT, b, t + (k - (W - 1)), d, dm, T, stride_xb, stride_xt,
                                     stride_ib, stride_it, W, HAS_INIT)
    return z


@triton.jit
def _conv_fwd_kernel(
    X, WT, BIAS, INIT, LENS, Y, FINAL,
    T, D, stride_xb, stride_xt, stride_ib, stride_it,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_LENS: tl.constexpr,
    SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    t = pt * BLOCK_T + tl.arange(0, BLOCK_T)
    L = T
    if HAS_LENS:
        L = tl.load(LENS + b).to(tl.int32)
    z = _preact(X, INIT, WT, BIAS, b, t, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                W, HAS_INIT, HAS_BIAS, BLOCK_T, BLOCK_D)
    if SILU:
        z = z * tl.sigmoid(z)
    z = tl.where((t < L)[:, None], z, 0.0)
    tm = t < T
    tl.store(Y + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :], z.to(Y.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])
    if pt == 0:
        # final[j] = ext[L + j]: the input at time L + j - (W - 1).
        j = tl.arange(0, BLOCK_S)
        v = _load_ext(X, INIT, b, L + j - (W - 1), d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                      W, HAS_INIT)
        tl.store(FINAL + b * (W - 1) * D + j[:, None] * D + d[None, :], v.to(FINAL.dtype.element_ty),
                 mask=(j < W - 1)[:, None] & dm[None, :])


@triton.jit
def _conv_bwd_kernel(
    X, WT, BIAS, INIT, LENS, DY, DFINAL, DX, DINIT, DW_PART, DB_PART,
    T, D, stride_xb, stride_xt, stride_ib, stride_it,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_LENS: tl.constexpr,
    SILU: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, TILES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pc = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    L = T
    if HAS_LENS:
        L = tl.load(LENS + b).to(tl.int32)
    kk = tl.arange(0, BLOCK_W)
    dw = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)  # row k: this program's share of dweight[:, k]
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(TILES):
        e = (pc * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)  # extended index, in [0, T + W - 1)
        t = e - (W - 1)
        de = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dz_e = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(W):
            tj = t + j  # the output time whose tap W-1-j reads ext[e]
            vj = (tj >= 0) & (tj < L)
            g = tl.load(DY + b * T * D + tj.to(tl.int64)[:, None] * D + d[None, :],
                        mask=vj[:, None] & dm[None, :], other=0.0).to(tl.float32)
            if SILU:
                z = _preact(X, INIT, WT, BIAS, b, tj, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                            W, HAS_INIT, HAS_BIAS, BLOCK_T, BLOCK_D)
                s = tl.sigmoid(z)
                g = g * s * (1.0 + z * (1.0 - s))
            wj = tl.load(WT + d * W + (W - 1 - j), mask=dm, other=0.0).to(tl.float32)
            de += wj[None, :] * g
            if j == W - 1:
                dz_e = g  # dz at time e itself
        if HAS_DFINAL:
            jj = e - L
            mf = (jj >= 0) & (jj < W - 1)
            de += tl.load(DFINAL + b * (W - 1) * D + jj[:, None] * D + d[None, :],
                          mask=mf[:, None] & dm[None, :], other=0.0).to(tl.float32)
        mx = (t >= 0) & (t < T)
        tl.store(DX + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :], de.to(DX.dtype.element_ty),
                 mask=mx[:, None] & dm[None, :])
        if STORE_DINIT:
            mi = (e >= 0) & (e < W - 1)
            tl.store(DINIT + b * (W - 1) * D + e[:, None] * D + d[None, :], de.to(DINIT.dtype.element_ty),
                     mask=mi[:, None] & dm[None, :])
        # dweight[k] = sum_e dz[e] ext[e + k], with ext[e + k] the input at time t + k.
        for k in tl.static_range(W):
            xk = _load_ext(X, INIT, b, t + k, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it, W, HAS_INIT)
            dw = tl.where((kk == k)[:, None], dw + tl.sum(dz_e * xk, axis=0)[None, :], dw)
        db += tl.sum(dz_e, axis=0)
    part = b * tl.num_programs(1) + pc
    tl.store(DW_PART + part * W * D + kk[:, None] * D + d[None, :], dw, mask=(kk < W)[:, None] & dm[None, :])
    if HAS_BIAS:
        tl.store(DB_PART + part * D + d, db, mask=dm)


@triton.jit
def _conv_update_kernel(
    X, STATE, WT, BIAS, Y, D,
    stride_xb, stride_sb, stride_sj, stride_sd,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=dm, other=0.0).to(tl.float32)
    s_row = STATE + b * stride_sb + d * stride_sd
    for k in tl.static_range(W - 1):
        v = tl.load(s_row + k * stride_sj, mask=dm, other=0.0)
        acc += tl.load(WT + d * W + k, mask=dm, other=0.0).to(tl.float32) * v.to(tl.float32)
        if k > 0:
            # column k - 1 was read in the previous step; this program alone owns these addresses
            tl.store(s_row + (k - 1) * stride_sj, v, mask=dm)
    x = tl.load(X + b * stride_xb + d, mask=dm, other=0.0)
    acc += tl.load(WT + d * W + (W - 1), mask=dm, other=0.0).to(tl.float32) * x.to(tl.float32)
    if W > 1:
        tl.store(s_row + (W - 2) * stride_sj, x.to(STATE.dtype.element_ty), mask=dm)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + b * D + d, acc.to(Y.dtype.element_ty), mask=dm)


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, lengths, silu):
        B, T, D = x.shape
        W = weight.shape[1]
        x = _unit_channel_stride(x)
        init = None if initial_state is None else _unit_channel_stride(initial_state)
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        state_dtype = x.dtype if initial_state is None else initial_state.dtype
        final = torch.empty(B, W - 1, D, dtype=state_dtype, device=x.device)
        lens = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
        cfg = _FWD
        grid = (B, max(1, triton.cdiv(T, cfg["BLOCK_T"])), triton.cdiv(D, cfg["BLOCK_D"]))
        if B > 0 and D > 0:
            _conv_fwd_kernel[grid](
                x, weight, bias, init, lens, y, final, T, D, x.stride(0), x.stride(1),
                0 if init is None else init.stride(0), 0 if init is None else init.stride(1),
                W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_LENS=lens is not None,
                SILU=silu, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
                BLOCK_S=triton.next_power_of_2(max(W - 1, 1)), num_warps=cfg["num_warps"],
            )
        ctx.save_for_backward(x, weight, bias, init, lens)
        ctx.silu = silu
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, init, lens = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[1]
        dy = torch.zeros(B, T, D, dtype=x.dtype, device=x.device) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None or W == 1 else dfinal.contiguous()
        dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        store_dinit = init is not None and ctx.needs_input_grad[3]
        dinit = torch.empty_like(init, memory_format=torch.contiguous_format) if store_dinit else None
        cfg = _BWD
        n_chunks = max(1, triton.cdiv(T + W - 1, cfg["BLOCK_T"] * cfg["TILES"]))
        dw_part = torch.empty(B * n_chunks, W, D, dtype=torch.float32, device=x.device)
        db_part = torch.empty(B * n_chunks, D, dtype=torch.float32, device=x.device) if bias is not None else None
        if B > 0 and D > 0:
            _conv_bwd_kernel[(B, n_chunks, triton.cdiv(D, cfg["BLOCK_D"]))](
                x, weight, bias, init, lens, dy, dfinal, dx, dinit, dw_part, db_part, T, D,
                x.stride(0), x.stride(1), 0 if init is None else init.stride(0),
                0 if init is None else init.stride(1),
                W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_LENS=lens is not None,
                SILU=ctx.silu, HAS_DFINAL=dfinal is not None, STORE_DINIT=store_dinit,
                BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_W=triton.next_power_of_2(W), TILES=cfg["TILES"],
                num_warps=cfg["num_warps"],
            )
        dw = dw_part.sum(0).t().contiguous().to(weight.dtype) if B > 0 else torch.zeros_like(weight)
        db = None if bias is None else (db_part.sum(0).to(bias.dtype) if B > 0 else torch.zeros_like(bias))
        return dx, dw, db, dinit, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.causal_conv1d.causal_conv1d``; inputs are assumed valid."""
    return _CausalConv1dFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                                 initial_state, lengths, activation in ("silu", "swish"))


def causal_conv1d_update_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The Triton path of ``causal_conv1d_update`` (not differentiable); ``conv_state`` is updated in place."""
    B, D = x.shape
    W = weight.shape[1]
    x = _unit_channel_stride(x)
    y = torch.empty(B, D, dtype=x.dtype, device=x.device)
    block_d = min(1024, triton.next_power_of_2(max(D, 1)))
    if B > 0 and D > 0:
        _conv_update_kernel[(B, triton.cdiv(D, block_d))](
            x, conv_state, weight.contiguous(), None if bias is None else bias.contiguous(), y, D,
            x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
            W=W, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"), BLOCK_D=block_d,
            num_warps=4 if block_d >= 512 else 1,
        )
    return y
