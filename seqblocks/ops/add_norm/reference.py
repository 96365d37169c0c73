"""Reference (the spec) of the fused residual add + LayerNorm / RMSNorm.

Shapes: x, residual [..., D]; weight, bias [D].
"""

from __future__ import annotations

import torch


def add_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(normed, new_residual)``; see ``seqblocks.ops.add_norm`` for the contract."""
    residual_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32:
        residual_dtype = torch.promote_types(residual_dtype, torch.float32)
    # Accumulate in fp32 at least (float64 inputs stay float64).
    acc = torch.promote_types(x.dtype, torch.float32)
    summed = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    # The residual is rounded once to its storage dtype, and the norm reads that rounded value, so
    # normalising the residual handed to the next block gives exactly these outputs.
    new_residual = summed.to(residual_dtype)
    h = new_residual.to(acc)
    if is_rms:
        h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    else:
        mean = h.mean(dim=-1, keepdim=True)
        centered = h - mean
        h = centered * torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    return h.to(x.dtype), new_residual
