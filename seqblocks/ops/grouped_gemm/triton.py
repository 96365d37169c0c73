"""Triton grouped GEMM kernels: ``y[rows of g] = x[rows of g] @ w[g]`` and the weight gradient.

Forward (and the input gradient, which is the same product with ``w[g]^T``): the rows of each group
are cut into tiles of BLOCK_M rows; a tile table (group, first row, end row) built on the device
(no host sync: its length is the bound ceil(M / BLOCK_M) + E, unused entries are empty tiles) gives
each program its rows and its group's matrix. Weight gradient: one program per (group, K tile,
N tile) walks its group's rows. Products accumulate in fp32 (``tl.dot``; fp32 inputs in IEEE
precision) and are stored in the output's dtype.

Shapes: M rows (sorted by group), K in-features, N out-features, E groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops.grouped_gemm.reference import group_starts
from seqblocks.ops.triton_dot import dot, dot_mode

__all__ = ["grouped_mm_triton", "grouped_wgrad_triton"]

_BLOCK_M = 32
_BLOCK_N = 32
_BLOCK_K = 32


@triton.jit
def _grouped_mm_kernel(X, W, Y, TILE_GROUP, TILE_START, TILE_END, N, K,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(TILE_GROUP + tile).to(tl.int64)
    start = tl.load(TILE_START + tile).to(tl.int64)
    end = tl.load(TILE_END + tile).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(X + rows[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(W + g * stride_we + (k0 + ks)[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += dot(a, b, IEEE)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(X, DY, DW, OFFS, K, N,
                          stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    end = tl.load(OFFS + g).to(tl.int64)
    start = tl.load(OFFS + g - 1, mask=g > 0, other=0).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    k_ok = ks < K
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m_ok = (m0 + ms) < end
        a = tl.load(X + (m0 + ms)[None, :] * stride_xm + ks[:, None] * stride_xk,
                    mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M] = x^T
        b = tl.load(DY + (m0 + ms)[:, None] * stride_dym + cols[None, :] * stride_dyn,
                    mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        acc += dot(a, b, IEEE)
    tl.store(DW + g * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn, acc.to(DW.dtype.element_ty),
             mask=k_ok[:, None] & col_ok[None, :])


def _tile_table(offsets: torch.Tensor, M: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile: (group, first row, end row); ceil(M / block_m) + E entries, the unused ones empty."""
    E = offsets.shape[0]
    ends = offsets.long()
    starts = group_starts(ends)
    tiles = (ends - starts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    n = (M + block_m - 1) // block_m + E
    t = torch.arange(n, device=offsets.device)
    group = torch.searchsorted(cum, t, right=True)
    valid = group < E
    g = group.clamp(max=E - 1)
    start = starts[g] + (t - (cum[g] - tiles[g])) * block_m
    end = torch.minimum(start + block_m, ends[g])
    zero = torch.zeros_like(start)
    return g, torch.where(valid, start, zero), torch.where(valid, end, zero)


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[M, N] ``x[rows of g] @ w[g]`` on the Triton kernel (w may be any strided view, e.g. a transpose)."""
    M, K = x.shape
    E, _, N = w.shape
    y = x.new_empty(M, N)
    if M == 0 or E == 0:
        return y
    group, start, end = _tile_table(offsets, M, _BLOCK_M)
    grid = (group.shape[0], triton.cdiv(N, _BLOCK_N))
    _grouped_mm_kernel[grid](x, w, y, group, start, end, N, K, x.stride(0), x.stride(1), w.stride(0),
                             w.stride(1), w.stride(2), y.stride(0), y.stride(1), IEEE=dot_mode(x),
                             BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    return y


def grouped_wgrad_triton(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, K, N] ``x[rows of g]^T @ dy[rows of g]`` on the Triton kernel (zeros for an empty group)."""
    M, K = x.shape
    N = dy.shape[1]
    E = offsets.shape[0]
    dw = x.new_empty(E, K, N)
    if E == 0:
        return dw
    offs = offsets.contiguous()
    grid = (E, triton.cdiv(K, _BLOCK_K), triton.cdiv(N, _BLOCK_N))
    _grouped_wgrad_kernel[grid](x, dy, dw, offs, K, N, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                dw.stride(0), dw.stride(1), dw.stride(2), IEEE=dot_mode(x),
                                BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    return dw
