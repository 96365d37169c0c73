"""Triton kernel of ``add_norm`` for inference: residual add + LayerNorm / RMSNorm in one launch.

Imported only through ``seqblocks/ops/add_norm/__init__.py`` once ``resolve_backend`` has chosen
"triton", which it offers only when no gradient is needed (a decode step, evaluation); training keeps
the PyTorch path and its autograd. One program normalises one row with the whole row in registers
(``BLOCK_D`` = the next power of two of D), in fp32, and follows the reference to the bit where it
matters: the sum is rounded to the residual's storage dtype first and the norm reads that rounded value.

Shapes: x, residual [R, D] (rows flattened); weight, bias [D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["add_norm_triton"]


@triton.jit
def _add_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, r_out_ptr, D, sx, sr, sy, so, eps,
                     HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    s = tl.load(x_ptr + row * sx + d, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + row * sr + d, mask=m, other=0.0).to(tl.float32)
    r = s.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + row * so + d, r, mask=m)
    h = r.to(tl.float32)
    if IS_RMS:
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    else:
        mean = tl.sum(h, axis=0) / D
        c = tl.where(m, h - mean, 0.0)
        h = c * tl.rsqrt(tl.sum(c * c, axis=0) / D + eps)
    if HAS_W:
        h = h * tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        h = h + tl.load(b_ptr + d, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + d, h.to(y_ptr.dtype.element_ty), mask=m)


def add_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, is_rms: bool,
                    residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [..., D] in x's dtype, new residual [..., D]) as ``add_norm_ref``; inputs assumed valid."""
    D = x.shape[-1]
    residual_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32:
        residual_dtype = torch.promote_types(residual_dtype, torch.float32)
    x2 = x.reshape(-1, D)
    r2 = residual.reshape(-1, D) if residual is not None else None
    if x2.stride(-1) != 1 or (r2 is not None and r2.stride(-1) != 1):
        x2 = x2.contiguous()
        r2 = r2.contiguous() if r2 is not None else None
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r_out = torch.empty(x.shape, dtype=residual_dtype, device=x.device)
    if rows == 0 or D == 0:
        return y, r_out
    _add_norm_kernel[(rows,)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2, bias if bias is not None else x2,
        y, r_out, D, x2.stride(0), r2.stride(0) if r2 is not None else 0, D, D, float(eps),
        HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=is_rms,
        BLOCK_D=triton.next_power_of_2(D), num_warps=4 if D <= 4096 else 8,
    )
    return y, r_out
