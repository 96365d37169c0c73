"""Residual add + normalisation as one op, the op behind ``Block(fused_add_norm=True)``.

The PyTorch implementation (the add and the norm in adjacent lines, fp32 statistics) is the spec
and the training path; ``triton.py`` fuses the two into one launch for inference (no gradient needed:
decode steps, evaluation), which "auto" takes on CUDA.

Shapes: x, residual [..., D]; weight, bias [D].
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import resolve_backend
from seqblocks.ops.add_norm.reference import add_norm_ref

MAX_D = 16384  # the widest row the kernel keeps in registers (ops/add_norm/triton.py)

__all__ = ["add_norm", "add_norm_ref"]


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    is_rms: bool = False,
    residual_in_fp32: bool = False,
    prenorm: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual``; ``y = norm(r) * weight + bias``; returns ``y`` or ``(y, r)``.

    The sum is formed in fp32 (float64 inputs: float64) and stored as ``r`` in fp32 when
    ``residual_in_fp32``, else in the residual's dtype (``x``'s when ``residual`` is None). The norm
    reads that stored ``r``, computes in fp32 and returns ``y`` in ``x``'s dtype.

    Args:
        x (Tensor): [..., D] the new branch output (or the first block's input).
        residual (Tensor | None): [..., D] the residual stream so far; None means r = x. Default: None.
        weight (Tensor | None): [D] scale. Default: None (no scale).
        bias (Tensor | None): [D] shift (LayerNorm only). Default: None.
        eps (float): added to the variance / mean square. Default: 1e-5.
        is_rms (bool): RMSNorm when True, LayerNorm otherwise. Default: False.
        residual_in_fp32 (bool): store ``r`` in fp32. Default: False.
        prenorm (bool): also return ``r``. Default: False.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Raises:
        ValueError: shapes disagree.
    """
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    dim = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (dim,):
            raise ValueError(f"add_norm: {name} shape {tuple(p.shape)} != ({dim},)")
    if is_rms and bias is not None:
        raise ValueError("add_norm: RMSNorm takes no bias")
    # The kernel (``triton.py``) serves inference: no input needs a gradient (it has no backward).
    tensors = (x, residual, weight, bias)
    served = (dim <= MAX_D and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                   for t in tensors))
              and all(t is None or (t.is_floating_point() and t.dtype.itemsize <= 4) for t in tensors))
    if resolve_backend(backend, x, residual, op="add_norm", has_kernel=served) == "triton":
        from seqblocks.ops.add_norm.triton import add_norm_triton

        y, r = add_norm_triton(x, residual, weight, bias, eps, is_rms, residual_in_fp32)
        return (y, r) if prenorm else y
    y, r = add_norm_ref(x, residual, weight, bias, eps, is_rms, residual_in_fp32)
    return (y, r) if prenorm else y
