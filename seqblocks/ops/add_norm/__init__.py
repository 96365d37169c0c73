"""Residual add + normalisation as one op, the op behind ``Block(fused_add_norm=True)``.

``reference.py`` is the spec and the PyTorch path (the add and the norm in adjacent lines, fp32
statistics); ``triton.py`` fuses the two into one pass over memory, forward and backward, and
``backend="auto"`` picks it on CUDA for fp16 / bf16 / fp32 rows of up to ``MAX_DIM`` features.

Shapes: x, residual [..., D]; weight, bias [D].
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import resolve_backend
from seqblocks.ops.add_norm.reference import add_norm_ref

__all__ = ["add_norm", "add_norm_ref"]

# What the Triton kernel serves: a row must fit one program's registers; float64 and wider rows run
# on the PyTorch path.
_MAX_DIM = 16384
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        backend (str): "auto", "torch" or "triton" (fp16 / bf16 / fp32 and D <= 16384). Default: "auto".

    Raises:
        TypeError: a non-floating input.
        ValueError: shapes disagree; "triton" asked for a call it does not serve.
    """
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise TypeError(f"add_norm: {name} must be a floating-point Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() == 0:
        raise ValueError("add_norm: x must have shape [..., D], got a 0-d tensor")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    dim = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (dim,):
            raise ValueError(f"add_norm: {name} shape {tuple(p.shape)} != ({dim},)")
    if is_rms and bias is not None:
        raise ValueError("add_norm: RMSNorm takes no bias")
    served = (dim <= _MAX_DIM and all(t.dtype in _KERNEL_DTYPES for t in (x, residual, weight, bias)
                                      if t is not None))
    if resolve_backend(backend, x, residual, weight, bias, op="add_norm", has_kernel=served) == "triton":
        from seqblocks.ops.add_norm.triton import add_norm_triton

        return add_norm_triton(x, residual, weight, bias, eps, is_rms, residual_in_fp32, prenorm)
    y, r = add_norm_ref(x, residual, weight, bias, eps, is_rms, residual_in_fp32)
    return (y, r) if prenorm else y
