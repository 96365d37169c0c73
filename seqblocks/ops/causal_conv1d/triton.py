"""Triton kernels of the causal depthwise conv1d, forward, backward and the decode step.

Imported only through ``seqblocks.ops.causal_conv1d`` once ``resolve_backend`` has chosen "triton".
The spec is ``reference.py``; these kernels compute the same function (tested forward and backward).

Design (see docs/kernels.md, "Causal depthwise conv1d"):

- Layout x [B, T, D], channels last (unit stride over D; any batch / time strides, so a slice of a
  projection's output is read in place). A program owns one row and a [BLOCK_T, BLOCK_D] tile:
  loads run along the channels (coalesced), and the W taps are W shifted loads of the same tile,
  which hit in cache, so HBM sees about one read of x and one write of y. Only tiles that start
  within W - 1 steps of the segment read ``initial_state`` (a runtime branch; the others skip that
  masked load). The program of the first time tile also writes the row's final state (the W - 1
  inputs before its length), so no second launch is needed.
- Backward: ``dx[t] = sum_j w[W-1-j] dz[t+j] + dfinal[t + W - 1 - length]`` needs dz shifted by up
  to W - 1 steps, i.e. values other threads hold. A program computes dz for its tile and the W - 1
  steps after it (with SiLU, the pre-activation is recomputed from x rather than saved), writes them
  to its own small fp32 scratch rows (L2-resident), waits at a barrier and reads them back shifted.
  The first tile also forms the initial state's gradient the same way. A program walks
  ``bwd_tiles`` time tiles and keeps its share of dweight / dbias in fp32 registers; each program
  stores one partial and the partials are summed in a fixed order afterwards (deterministic, no
  atomics).
- The decode step is its own small kernel: one program per (row, channel block) reads the W - 1
  state columns and x, writes y and shifts the state in place (each program owns its state slice).
- Launch shapes: ``ConvTiles`` (per call; ``DEFAULT_TILES`` otherwise).

Shapes: B batch, T time, D channels, W filter width, P partials.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton", "ConvTiles", "DEFAULT_TILES", "MAX_WIDTH"]

MAX_WIDTH = 8
BWD_KERNELS = ("scratch", "shift")

@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvTiles:
    """Tile shapes and warps of the kernels, for one call (benchmarks sweep them; results do not
    depend on them). At the defaults, W = 4 compiles for sm_90 to <= 72 registers a thread in the
    forward and the scratch backward to <= 192, with no spills (W = 8: 64 and 254).

    Args:
        fwd_block_t (int): forward tile's time steps. Default: 16.
        fwd_block_d (int): forward tile's channels. Default: 128.
        fwd_warps (int): forward warps. Default: 4.
        bwd_block_t (int): backward tile's time steps (>= 8, the widest filter's W - 1). Default: 8.
        bwd_block_d (int): backward tile's channels. Default: 128.
        bwd_warps (int): backward warps. Default: 4.
        bwd_tiles (int): time tiles one backward program walks (fewer dweight partials). Default: 32.
        bwd_kernel (str): "scratch" (dz of a tile staged in scratch rows and read back shifted, one
            program walking ``bwd_tiles`` tiles) or "shift" (each program one [shift_block_t,
            bwd_block_d] tile, dz at each of the W shifts recomputed from cached loads: no scratch,
            no barrier, every tile in parallel; 0.48 ms against scratch's 0.79 ms fwd+bwd at (8, 2048,
            1536, 4) bf16 on an H200). Default: "shift".
        shift_block_t (int): time steps of a "shift" backward tile. Default: 32.
    """

    fwd_block_t: int = 16
    fwd_block_d: int = 128
    fwd_warps: int = 4
    bwd_block_t: int = 8
    bwd_block_d: int = 128
    bwd_warps: int = 4
    bwd_tiles: int = 32
    bwd_kernel: str = "shift"
    shift_block_t: int = 32

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "bwd_kernel":
                if v not in BWD_KERNELS:
                    raise ValueError(f"ConvTiles: bwd_kernel must be one of {BWD_KERNELS}, got {v!r}")
                continue
            if not isinstance(v, int) or v < 1 or (f.name != "bwd_tiles" and v & (v - 1)):
                raise ValueError(f"ConvTiles: {f.name} must be a power-of-two int >= 1, got {v!r}")
        if self.bwd_block_t < MAX_WIDTH:
            raise ValueError(f"ConvTiles: bwd_block_t must be >= {MAX_WIDTH}, got {self.bwd_block_t}")


# Triton fixes compile-or-interpret process-wide when it is imported; under the interpreter smaller
# tiles keep the CPU tests fast and still cross tile, chunk and channel-block boundaries.
DEFAULT_TILES = (ConvTiles(fwd_block_t=16, fwd_block_d=64, fwd_warps=1, bwd_block_t=16, bwd_block_d=32,
                           bwd_warps=1, bwd_tiles=2, bwd_kernel="scratch") if interpreter_enabled()
                else ConvTiles())


@triton.jit
def _load_x(X, b, t, d, dm, T, stride_xb, stride_xt):
    # [R, BD] fp32 inputs at times t; 0 outside [0, T).
    in_x = (t >= 0) & (t < T)
    return tl.load(X + b * stride_xb + t.to(tl.int64)[:, None] * stride_xt + d[None, :],
                   mask=in_x[:, None] & dm[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_ext(X, INIT, b, t, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
              W: tl.constexpr, HAS_INIT: tl.constexpr):
    # [R, BD] fp32 inputs at times t, where t in [-(W-1), 0) reads the initial state (0 without one).
    v = _load_x(X, b, t, d, dm, T, stride_xb, stride_xt)
    if HAS_INIT:
        ti = t + (W - 1)
        in_s = (t < 0) & (ti >= 0)
        v += tl.load(INIT + b * stride_ib + ti[:, None] * stride_it + d[None, :],
                     mask=in_s[:, None] & dm[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _tap_input(X, INIT, b, t, near_start, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
               W: tl.constexpr, HAS_INIT: tl.constexpr):
    # Only tiles starting within W - 1 of the segment's start read the initial state: the others
    # skip its masked load (registers and instructions on every tile).
    if HAS_INIT:
        if near_start:
            v = _load_ext(X, INIT, b, t, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it, W, HAS_INIT)
        else:
            v = _load_x(X, b, t, d, dm, T, stride_xb, stride_xt)
    else:
        v = _load_x(X, b, t, d, dm, T, stride_xb, stride_xt)
    return v


@triton.jit
def _preact(X, INIT, WT, BIAS, b, t, near_start, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
            W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # z[t] = bias + sum_k w[k] x[t - (W-1) + k], fp32, [ROWS, BLOCK_D].
    z = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        wk = tl.load(WT + d * W + k, mask=dm, other=0.0).to(tl.float32)
        z += wk[None, :] * _tap_input(X, INIT, b, t + (k - (W - 1)), near_start, d, dm, T, stride_xb, stride_xt,
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
    t0 = pt * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    L = T
    if HAS_LENS:
        L = tl.load(LENS + b).to(tl.int32)
    z = _preact(X, INIT, WT, BIAS, b, t, t0 < W - 1, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                W, HAS_INIT, HAS_BIAS, BLOCK_T, BLOCK_D)
    if SILU:
        z = z * tl.sigmoid(z)
    z = tl.where((t < L)[:, None], z, 0.0)
    tl.store(Y + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :], z.to(Y.dtype.element_ty),
             mask=(t < T)[:, None] & dm[None, :])
    if pt == 0:
        # final[j] = ext[L + j]: the input at time L + j - (W - 1).
        j = tl.arange(0, BLOCK_S)
        v = _load_ext(X, INIT, b, L + j - (W - 1), d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                      W, HAS_INIT)
        tl.store(FINAL + b * (W - 1) * D + j[:, None] * D + d[None, :], v.to(FINAL.dtype.element_ty),
                 mask=(j < W - 1)[:, None] & dm[None, :])


@triton.jit
def _dz(X, INIT, WT, BIAS, DY, b, t, near_start, d, dm, T, D, L, stride_xb, stride_xt, stride_ib, stride_it,
        W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # dL/dz at times t (z the pre-activation), fp32; 0 at and past the row's length.
    valid = (t >= 0) & (t < L)
    g = tl.load(DY + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0).to(tl.float32)
    if SILU:
        z = _preact(X, INIT, WT, BIAS, b, t, near_start, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                    W, HAS_INIT, HAS_BIAS, ROWS, BLOCK_D)
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _dfinal_rows(DFINAL, b, j, d, dm, D, W: tl.constexpr):
    # [R, BD] fp32 cotangent of the final state's columns j; 0 outside [0, W - 1).
    return tl.load(DFINAL + b * (W - 1) * D + j[:, None] * D + d[None, :],
                   mask=((j >= 0) & (j < W - 1))[:, None] & dm[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_bwd_kernel(
    X, WT, BIAS, INIT, LENS, DY, DFINAL, DX, DINIT, DW_PART, DB_PART, SCRATCH,
    T, D, stride_xb, stride_xt, stride_ib, stride_it,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_LENS: tl.constexpr,
    SILU: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
    TILES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pc = tl.program_id(1)
    pd = tl.program_id(2)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    L = T
    if HAS_LENS:
        L = tl.load(LENS + b).to(tl.int32)
    part = b * tl.num_programs(1) + pc
    # This program's scratch rows: dz of the tile and of the W - 1 steps after it, so that dx can
    # read dz shifted by 0 .. W - 1 steps (other threads' values: hence the barriers).
    S = SCRATCH + (part * tl.num_programs(2) + pd) * (BLOCK_T + BLOCK_S) * BLOCK_D
    rt = tl.arange(0, BLOCK_T)
    rs = tl.arange(0, BLOCK_S)
    c = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_W)
    dw = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)  # row k: this program's share of dweight[:, k]
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BLOCK_T)
    for i in range(TILES):
        tile = pc * TILES + i
        if tile < n_tiles:
            t0 = tile * BLOCK_T
            t = t0 + rt
            near = t0 < W - 1
            dz = _dz(X, INIT, WT, BIAS, DY, b, t, near, d, dm, T, D, L, stride_xb, stride_xt, stride_ib, stride_it,
                     W, HAS_INIT, HAS_BIAS, SILU, BLOCK_T, BLOCK_D)
            dz_tail = _dz(X, INIT, WT, BIAS, DY, b, t0 + BLOCK_T + rs, False, d, dm, T, D, L, stride_xb, stride_xt,
                          stride_ib, stride_it, W, HAS_INIT, HAS_BIAS, SILU, BLOCK_S, BLOCK_D)
            tl.store(S + rt[:, None] * BLOCK_D + c[None, :], dz, mask=dm[None, :])
            tl.store(S + (BLOCK_T + rs)[:, None] * BLOCK_D + c[None, :], dz_tail, mask=dm[None, :])
            tl.debug_barrier()
            # dx[t] = sum_j w[W-1-j] dz[t + j] + dfinal[t + W - 1 - L]
            de = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(W):
                wj = tl.load(WT + d * W + (W - 1 - j), mask=dm, other=0.0).to(tl.float32)
                de += wj[None, :] * tl.load(S + (rt + j)[:, None] * BLOCK_D + c[None, :], mask=dm[None, :],
                                            other=0.0)
            if HAS_DFINAL:
                jj = t + (W - 1) - L
                de += _dfinal_rows(DFINAL, b, jj, d, dm, D, W)
            tl.store(DX + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :], de.to(DX.dtype.element_ty),
                     mask=(t < T)[:, None] & dm[None, :])
            if STORE_DINIT:
                if tile == 0:
                    # d initial_state[e] = sum_j w[W-1-j] dz[e - (W-1) + j] + dfinal[e - L], e < W - 1
                    te = rs - (W - 1)
                    dh = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
                    for j in tl.static_range(W):
                        wj = tl.load(WT + d * W + (W - 1 - j), mask=dm, other=0.0).to(tl.float32)
                        dh += wj[None, :] * tl.load(S + (te + j)[:, None] * BLOCK_D + c[None, :],
                                                    mask=(te + j >= 0)[:, None] & dm[None, :], other=0.0)
                    if HAS_DFINAL:
                        jf = rs - L
                        dh += _dfinal_rows(DFINAL, b, jf, d, dm, D, W)
                    tl.store(DINIT + b * (W - 1) * D + rs[:, None] * D + d[None, :], dh.to(DINIT.dtype.element_ty),
                             mask=(rs < W - 1)[:, None] & dm[None, :])
            # dweight[k] = sum_t dz[t] x[t - (W-1) + k]; dbias = sum_t dz[t]
            for k in tl.static_range(W):
                xk = _tap_input(X, INIT, b, t + (k - (W - 1)), near, d, dm, T, stride_xb, stride_xt,
                                stride_ib, stride_it, W, HAS_INIT)
                dw = tl.where((kk == k)[:, None], dw + tl.sum(dz * xk, axis=0)[None, :], dw)
            db += tl.sum(dz, axis=0)
            tl.debug_barrier()  # the next tile overwrites the scratch rows
    tl.store(DW_PART + part * W * D + kk[:, None] * D + d[None, :], dw, mask=(kk < W)[:, None] & dm[None, :])
    if HAS_BIAS:
        tl.store(DB_PART + part * D + d, db, mask=dm)


@triton.jit
def _conv_bwd_shift_kernel(
    X, WT, BIAS, INIT, LENS, DY, DFINAL, DX, DINIT, DW_PART, DB_PART,
    T, D, stride_xb, stride_xt, stride_ib, stride_it,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_LENS: tl.constexpr,
    SILU: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # One [BLOCK_T, BLOCK_D] tile per program. dx[t] = sum_j w[W-1-j] dz[t + j]: the dz of each shift j
    # is recomputed from shifted loads of x and dy (cache hits after the first), so no thread needs
    # another's values and there is no scratch or barrier.
    b = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    L = T
    if HAS_LENS:
        L = tl.load(LENS + b).to(tl.int32)
    t0 = pt * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    near = t0 < W - 1
    de = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dz0 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(W):
        dzj = _dz(X, INIT, WT, BIAS, DY, b, t + j, near, d, dm, T, D, L, stride_xb, stride_xt, stride_ib,
                  stride_it, W, HAS_INIT, HAS_BIAS, SILU, BLOCK_T, BLOCK_D)
        wj = tl.load(WT + d * W + (W - 1 - j), mask=dm, other=0.0).to(tl.float32)
        de += wj[None, :] * dzj
        if j == 0:
            dz0 = dzj
    if HAS_DFINAL:
        jj = t + (W - 1) - L
        de += _dfinal_rows(DFINAL, b, jj, d, dm, D, W)
    tl.store(DX + b * T * D + t.to(tl.int64)[:, None] * D + d[None, :], de.to(DX.dtype.element_ty),
             mask=(t < T)[:, None] & dm[None, :])
    if STORE_DINIT:
        if pt == 0:
            # d initial_state[e] = sum_j w[W-1-j] dz[e - (W-1) + j] + dfinal[e - L], e < W - 1
            rs = tl.arange(0, BLOCK_S)
            dh = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(W):
                # its own names: Triton 3.6 rejects a then-block rebinding dzj / wj at another shape
                dzs = _dz(X, INIT, WT, BIAS, DY, b, rs - (W - 1) + j, True, d, dm, T, D, L, stride_xb, stride_xt,
                          stride_ib, stride_it, W, HAS_INIT, HAS_BIAS, SILU, BLOCK_S, BLOCK_D)
                ws = tl.load(WT + d * W + (W - 1 - j), mask=dm, other=0.0).to(tl.float32)
                dh += ws[None, :] * dzs
            if HAS_DFINAL:
                jf = rs - L
                dh += _dfinal_rows(DFINAL, b, jf, d, dm, D, W)
            tl.store(DINIT + b * (W - 1) * D + rs[:, None] * D + d[None, :], dh.to(DINIT.dtype.element_ty),
                     mask=(rs < W - 1)[:, None] & dm[None, :])
    # this tile's share of dweight[k] = sum_t dz[t] x[t - (W-1) + k] and dbias = sum_t dz[t]
    kk = tl.arange(0, BLOCK_W)
    dw = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(W):
        xk = _tap_input(X, INIT, b, t + (k - (W - 1)), near, d, dm, T, stride_xb, stride_xt, stride_ib, stride_it,
                        W, HAS_INIT)
        dw = tl.where((kk == k)[:, None], dw + tl.sum(dz0 * xk, axis=0)[None, :], dw)
    part = b * tl.num_programs(1) + pt
    tl.store(DW_PART + part * W * D + kk[:, None] * D + d[None, :], dw, mask=(kk < W)[:, None] & dm[None, :])
    if HAS_BIAS:
        tl.store(DB_PART + part * D + d, tl.sum(dz0, axis=0), mask=dm)


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
    def forward(ctx, x, weight, bias, initial_state, lengths, silu, tiles):
        B, T, D = x.shape
        W = weight.shape[1]
        x = _unit_channel_stride(x)
        init = None if initial_state is None else _unit_channel_stride(initial_state)
        y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        state_dtype = x.dtype if initial_state is None else initial_state.dtype
        final = torch.empty(B, W - 1, D, dtype=state_dtype, device=x.device)
        lens = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
        bt, bd = tiles.fwd_block_t, tiles.fwd_block_d
        grid = (B, max(1, triton.cdiv(T, bt)), triton.cdiv(D, bd))
        if B > 0 and D > 0:
            _conv_fwd_kernel[grid](
                x, weight, bias, init, lens, y, final, T, D, x.stride(0), x.stride(1),
                0 if init is None else init.stride(0), 0 if init is None else init.stride(1),
                W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_LENS=lens is not None,
                SILU=silu, BLOCK_T=bt, BLOCK_D=bd, BLOCK_S=triton.next_power_of_2(max(W - 1, 1)),
                num_warps=tiles.fwd_warps,
            )
        ctx.save_for_backward(x, weight, bias, init, lens)
        ctx.silu = silu
        ctx.tiles = tiles
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, init, lens = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[1]
        dfinal = None if dfinal is None or W == 1 else dfinal.contiguous()
        store_dinit = init is not None and ctx.needs_input_grad[3]
        if T == 0 or B == 0 or D == 0:
            # No output position: only the final state's cotangent flows, to the initial state.
            dinit = None
            if store_dinit:
                dinit = torch.zeros_like(init) if dfinal is None else dfinal.to(init.dtype)
            return (torch.zeros_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias),
                    dinit, None, None, None)
        dy = torch.zeros(B, T, D, dtype=x.dtype, device=x.device) if dy is None else dy.contiguous()
        dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
        dinit = torch.empty(B, W - 1, D, dtype=init.dtype, device=x.device) if store_dinit else None
        tiles = ctx.tiles
        bt, bd = tiles.bwd_block_t, tiles.bwd_block_d
        block_s = triton.next_power_of_2(max(W - 1, 1))
        n_d = triton.cdiv(D, bd)
        flags = dict(W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_LENS=lens is not None,
                     SILU=ctx.silu, HAS_DFINAL=dfinal is not None, STORE_DINIT=store_dinit)
        strides = (x.stride(0), x.stride(1), 0 if init is None else init.stride(0),
                   0 if init is None else init.stride(1))
        # one dweight / dbias partial per program along time: a tile ("shift") or a run of tiles ("scratch")
        shift = tiles.bwd_kernel == "shift"
        n_t = triton.cdiv(T, tiles.shift_block_t) if shift else triton.cdiv(triton.cdiv(T, bt), tiles.bwd_tiles)
        dw_part = torch.empty(B * n_t, W, D, dtype=torch.float32, device=x.device)
        db_part = torch.empty(B * n_t, D, dtype=torch.float32, device=x.device) if bias is not None else None
        args = (x, weight, bias, init, lens, dy, dfinal, dx, dinit, dw_part, db_part)
        blocks = dict(BLOCK_D=bd, BLOCK_S=block_s, BLOCK_W=triton.next_power_of_2(W), num_warps=tiles.bwd_warps)
        if shift:
            _conv_bwd_shift_kernel[(B, n_t, n_d)](*args, T, D, *strides, **flags, BLOCK_T=tiles.shift_block_t,
                                                   **blocks)
        else:
            scratch = torch.empty(B * n_t * n_d, bt + block_s, bd, dtype=torch.float32, device=x.device)
            _conv_bwd_kernel[(B, n_t, n_d)](*args, scratch, T, D, *strides, **flags, BLOCK_T=bt, TILES=tiles.bwd_tiles,
                                             **blocks)
        dw = dw_part.sum(0).t().contiguous().to(weight.dtype)
        db = None if bias is None else db_part.sum(0).to(bias.dtype)
        return dx, dw, db, dinit, None, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    tiles: ConvTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.causal_conv1d.causal_conv1d``; inputs are assumed valid.

    ``tiles`` (benchmarks, tests) overrides the launch shapes for this call; None: ``DEFAULT_TILES``.
    """
    return _CausalConv1dFn.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                                 initial_state, lengths, activation in ("silu", "swish"), tiles or DEFAULT_TILES)


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
