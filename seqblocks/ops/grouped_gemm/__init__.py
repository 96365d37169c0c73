"""Grouped matrix products: rows sorted by group, one weight matrix per group (the MoE experts).

``grouped_mm(x, w, offsets)`` computes ``y[rows of g] = x[rows of g] @ w[g]`` for every group g at
once, with autograd (dX = the grouped product of dY with ``w[g]^T``; dW[g] = X_g^T dY_g).
``reference.py`` is the per-group loop that is the spec, ``torch.py`` the PyTorch paths
(``torch._grouped_mm`` on bf16 / sm90+, else a padded ``torch.bmm``), ``triton.py`` the Triton
kernels. ``backend="auto"`` takes ``torch._grouped_mm`` where it serves the call, else the Triton
kernel on CUDA, else the padded product.

Shapes: M rows (sorted by group), K in-features, N out-features, E groups.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor, autograd
from torch import float64 as _float64
from torch import long as _long

from seqblocks.cache import host_sync_unsafe
from seqblocks.ops._backend import resolve_backend
from seqblocks.ops.grouped_gemm.reference import grouped_mm_ref, grouped_wgrad_ref
from seqblocks.ops.grouped_gemm.torch import grouped_mm_torch, grouped_wgrad_torch, native_grouped_mm_serves

__all__ = ["grouped_mm", "grouped_mm_ref", "grouped_wgrad_ref", "native_grouped_mm_serves"]


def _check(x: Tensor, w: Tensor, offsets: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"grouped_mm: x must be a [M, K] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(w, Tensor) or w.dim() != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_mm: w must be [E, K={x.shape[1]}, N], got {getattr(w, 'shape', type(w))}")
    if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_mm: offsets must be [E={w.shape[0]}] cumulative end rows, got "
                         f"{getattr(offsets, 'shape', type(offsets))}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex:
        raise TypeError(f"grouped_mm: offsets must be an integer tensor, got {offsets.dtype}")
    if not (x.dtype.is_floating_point and w.dtype == x.dtype):
        raise TypeError(f"grouped_mm: x and w must share one floating dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device or offsets.device != x.device:
        raise ValueError(f"grouped_mm: x, w, offsets must be on one device, got {x.device}, {w.device}, "
                         f"{offsets.device}")
    if not x.is_cuda and not host_sync_unsafe() and offsets.numel():
        last = int(offsets[-1])
        if last != x.shape[0] or bool((offsets.diff() < 0).any()) or int(offsets[0]) < 0:
            raise ValueError(f"grouped_mm: offsets must be non-decreasing cumulative ends with offsets[-1] == "
                             f"M={x.shape[0]}, got {offsets.tolist()}")


def _fwd(x: Tensor, w: Tensor, offsets: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from seqblocks.ops.grouped_gemm.triton import grouped_mm_triton

        return grouped_mm_triton(x, w, offsets)
    return grouped_mm_torch(x, w, offsets)


def _wgrad(x: Tensor, dy: Tensor, offsets: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from seqblocks.ops.grouped_gemm.triton import grouped_wgrad_triton

        return grouped_wgrad_triton(x, dy, offsets)
    return grouped_wgrad_torch(x, dy, offsets)


class _GroupedMM(autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, backend):
        ctx.save_for_backward(x, w, offsets)
        ctx.backend = backend
        return _fwd(x, w, offsets, backend)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _fwd(dy, w.transpose(1, 2), offsets, ctx.backend) if ctx.needs_input_grad[0] else None
        dw = _wgrad(x, dy, offsets, ctx.backend) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, *, backend: str = "auto") -> Tensor:
    """``y[rows of g] = x[rows of g] @ w[g]`` for every group g.

    Args:
        x (Tensor): [M, K] rows sorted by group.
        w (Tensor): [E, K, N] one matrix per group, x's dtype.
        offsets (Tensor): [E] integer cumulative end rows: group g holds rows offsets[g-1] (0 for g = 0)
            up to offsets[g]; offsets[-1] == M (checked on the host for CPU tensors).
        backend (str): "auto", "torch" or "triton" (``seqblocks.ops._backend``). Default: "auto".

    Returns:
        Tensor: [M, N] in x's dtype, accumulated in fp32 (or wider) by every path.

    Raises:
        ValueError / TypeError: shapes, dtypes, devices or offsets that do not fit.
    """
    _check(x, w, offsets)
    if backend == "auto" and native_grouped_mm_serves(x, w):
        chosen = "torch"  # torch._grouped_mm (CUTLASS) beats our kernel where it serves; "triton" still asks for ours
    else:
        chosen = resolve_backend(backend, x, w, op="grouped_mm", has_kernel=x.dtype != _float64)
    return _GroupedMM.apply(x, w, offsets.to(_long) if chosen == "triton" else offsets, chosen)

