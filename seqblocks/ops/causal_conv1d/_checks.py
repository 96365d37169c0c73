"""Input validation of the causal conv1d op (kept apart so the package namespace stays free of ``torch``).

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

import torch

from seqblocks.ops._packing import check_cu_seqlens
from seqblocks.ops.causal_conv1d.reference import ACTIVATIONS

__all__ = ["check_conv_inputs"]


def check_conv_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str | None, state: torch.Tensor | None, lengths: torch.Tensor | None,
                      step: bool = False, cu_seqlens: torch.Tensor | None = None) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the offending argument."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("state", state)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a real floating-point tensor, got {t.dtype}")
    if x.dim() != (2 if step else 3):
        raise ValueError(f"{op}: x must have shape {'[B, D]' if step else '[B, T, D]'}, got {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have shape [D={D}, W >= 1], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"{op}: bias must have shape [{D}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    rows, rows_name = x.shape[0], "B"
    if cu_seqlens is not None:
        if lengths is not None:
            raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
        rows, rows_name = check_cu_seqlens(op, cu_seqlens, x.shape[0], x.shape[1]), "num_seqs"
    if state is not None and state.shape != (rows, W - 1, D):
        raise ValueError(f"{op}: state must have shape [{rows}, {W - 1}, {D}] ([{rows_name}, W - 1, D]), got "
                         f"{tuple(state.shape)}")
    if lengths is not None:
        B, T = x.shape[:2]
        if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: lengths must be an integer tensor of shape ({B},), got shape "
                             f"{tuple(lengths.shape)} dtype {lengths.dtype}")
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"{op}: lengths must lie in [0, T={T}], got {lengths.tolist()}")
