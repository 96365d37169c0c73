"""Triton kernels of the fused residual add + LayerNorm / RMSNorm, forward and backward.

Imported only through ``seqblocks.ops.add_norm.add_norm`` once ``resolve_backend`` has chosen "triton".
The spec is ``reference.py``; these kernels compute the same function (tested forward and backward).

Design (see docs/kernels.md, "Fused residual add + norm"):

- The input is flattened to M rows of D features. A program owns ``ROWS`` whole rows as one
  [ROWS, BLOCK_D] tile (BLOCK_D = D rounded up to a power of two, masked); small D packs several
  rows per program so each program still moves a few KiB, large D runs one row per program with the
  whole row in registers. ``num_warps`` grows with the tile.
- Forward: one read of x (and the residual), one write of ``r`` (skipped when ``r`` would be an
  exact copy of x and is not returned), one write of ``y``, and per row the fp32 ``rstd`` (and
  ``mean`` for LayerNorm), which is all the backward needs besides ``r``, weight and bias.
- Backward: a fixed grid of programs (four per SM) each walks a contiguous run of row tiles, reads
  ``r``, ``dy`` (and the cotangent of the returned ``r``), writes ``dx`` (and ``dresidual``), and
  keeps its share of ``dweight`` / ``dbias`` in fp32 registers; each program stores one partial row
  and the partials are summed in a fixed order afterwards, so the result is deterministic (no atomics).

Shapes: M rows, D features, P backward programs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["add_norm_triton", "launch_config"]


@triton.jit
def _add_norm_fwd_kernel(
    X, RES, WEIGHT, BIAS, Y, R, MEAN, RSTD,
    M, D, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_R: tl.constexpr,
    IS_RMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    s = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(RES + off, mask=m, other=0.0).to(tl.float32)
    if STORE_R:
        # The norm reads r rounded to its storage dtype, as the reference does.
        r = s.to(R.dtype.element_ty)
        tl.store(R + off, r, mask=m)
        s = r.to(tl.float32)
    if IS_RMS:
        c = s
    else:
        mean = tl.sum(s, axis=1) / D
        tl.store(MEAN + rows, mean, mask=rmask)
        c = tl.where(m, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = c * rstd[:, None]
    if HAS_W:
        y = y * tl.load(WEIGHT + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _add_norm_bwd_kernel(
    DY, DR_OUT, R, WEIGHT, MEAN, RSTD, DX, DRES, DW_PART, DB_PART,
    M, D, tiles_per_prog,
    HAS_DR_OUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_DRES: tl.constexpr,
    IS_RMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(WEIGHT + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Two stages: the next row tile's loads are issued (cp.async) while this one is reduced.
    for i in tl.range(tiles_per_prog, num_stages=2):
        rows = (pid * tiles_per_prog + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        m = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        r = tl.load(R + off, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if IS_RMS:
            xhat = r * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            xhat = tl.where(m, (r - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        # d(norm)/dr applied to g: rstd * (g - mean(g) - xhat * mean(g * xhat)); RMS drops mean(g).
        c1 = tl.sum(g * xhat, axis=1) / D
        if IS_RMS:
            dr = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / D
            dr = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DR_OUT:
            dr += tl.load(DR_OUT + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + off, dr.to(DX.dtype.element_ty), mask=m)
        if STORE_DRES:
            tl.store(DRES + off, dr.to(DRES.dtype.element_ty), mask=m)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DW_PART + pid * D + cols, dw, mask=cmask)
    if HAS_B:
        tl.store(DB_PART + pid * D + cols, db, mask=cmask)


def launch_config(dim: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_D, ROWS, num_warps)`` for rows of ``dim`` features.

    Forward tiles hold at least 4096 elements (several rows per program for small D), 16 per thread;
    the backward keeps more tensors live per element, so its tiles hold 2048, 8 per thread. Warps
    are capped at 16 (at 32 a thread gets only 64 registers): from D = 8192 the backward holds 16
    elements per thread, and past 8192 it spills to local memory (correct, slower).
    """
    block_d = triton.next_power_of_2(dim)
    tile, per_thread = (2048, 8) if backward else (4096, 16)
    rows = max(1, tile // block_d)
    num_warps = min(16, max(1, rows * block_d // (32 * per_thread)))
    return block_d, rows, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device, tiles: int) -> int:
    if device.type == "cuda":
        # Four per SM: each walks its rows with the next tile's loads in flight, and at two per SM the
        # loads in flight do not cover HBM latency (H200, (32768, 2048): 0.225 ms at 2 per SM, 0.176 ms
        # at 4, 0.174 ms at 8; docs/benchmarks.md).
        cap = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # the interpreter: a few programs, so the partial reduction is exercised
        cap = 3
    return max(1, min(tiles, cap))


class _AddNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, residual_in_fp32, prenorm):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        res2 = None if residual is None else residual.reshape(-1, D).contiguous()
        r_dtype = x.dtype if residual is None else residual.dtype
        if residual_in_fp32:
            r_dtype = torch.promote_types(r_dtype, torch.float32)
        # r is an exact copy of x when there is no residual and no dtype change: then it is x itself.
        store_r = residual is not None or r_dtype != x.dtype or prenorm
        y = torch.empty_like(x2)
        r = torch.empty(M, D, dtype=r_dtype, device=x.device) if store_r else x2
        mean = torch.empty(M if not is_rms else 0, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block_d, rows, num_warps = launch_config(D)
        if M > 0:
            _add_norm_fwd_kernel[(triton.cdiv(M, rows),)](
                x2, res2, weight, bias, y, r, mean, rstd, M, D, float(eps),
                HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                STORE_R=store_r, IS_RMS=is_rms, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
            )
        ctx.save_for_backward(r, weight, bias, mean, rstd)
        ctx.meta = (shape, is_rms, prenorm, x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)
        y = y.view(shape)
        return (y, r.view(shape)) if prenorm else y

    @staticmethod
    def backward(ctx, dy, dr_out=None):
        r, weight, bias, mean, rstd = ctx.saved_tensors
        shape, is_rms, prenorm, x_dtype, res_dtype = ctx.meta
        M, D = r.shape
        dy = torch.zeros(shape, dtype=x_dtype, device=r.device) if dy is None else dy
        dy2 = dy.reshape(M, D).contiguous()
        dr2 = None if dr_out is None else dr_out.reshape(M, D).contiguous()
        dx = torch.empty(M, D, dtype=x_dtype, device=r.device)
        store_dres = res_dtype is not None and ctx.needs_input_grad[1]
        dres = torch.empty(M, D, dtype=res_dtype, device=r.device) if store_dres else None
        block_d, rows, num_warps = launch_config(D, backward=True)
        tiles = triton.cdiv(M, rows)
        n_prog = _num_programs(r.device, tiles)
        tiles_per_prog = triton.cdiv(tiles, n_prog) if tiles else 0
        n_prog = triton.cdiv(tiles, tiles_per_prog) if tiles else 0
        # Every program writes its whole partial row, so the buffers need no zeroing.
        dw_part = torch.empty(n_prog, D, dtype=torch.float32, device=r.device) if weight is not None else None
        db_part = torch.empty(n_prog, D, dtype=torch.float32, device=r.device) if bias is not None else None
        if n_prog > 0:
            _add_norm_bwd_kernel[(n_prog,)](
                dy2, dr2, r, weight, mean, rstd, dx, dres, dw_part, db_part, M, D, tiles_per_prog,
                HAS_DR_OUT=dr2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                STORE_DRES=store_dres, IS_RMS=is_rms, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
            )
        dw = None if weight is None else dw_part.sum(0).to(weight.dtype)
        db = None if bias is None else db_part.sum(0).to(bias.dtype)
        return (dx.view(shape), None if dres is None else dres.view(shape), dw, db, None, None, None, None)


def add_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    residual_in_fp32: bool,
    prenorm: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of ``seqblocks.ops.add_norm.add_norm``; inputs are assumed valid."""
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _AddNormFn.apply(x, residual, weight, bias, eps, is_rms, residual_in_fp32, prenorm)
