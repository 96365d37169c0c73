"""Input validation of ``linear_scan`` (kept apart so the package namespace stays free of ``torch``).

Shapes: B batch, T time, S the state's trailing shape.
"""

from __future__ import annotations

import torch


def check_scan_inputs(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None,
                      lengths: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the offending argument (see ``linear_scan``)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_scan: {name} must be a Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"linear_scan: {name} must be floating point or complex, got {t.dtype}")
    if b.dim() < 2:
        raise ValueError(f"linear_scan: b must be [B, T, ...], got shape {tuple(b.shape)}")
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        shape = None
    if shape != b.shape:
        raise ValueError(
            f"linear_scan: a of shape {tuple(a.shape)} does not broadcast to b's shape {tuple(b.shape)}"
        )
    B, T = b.shape[:2]
    S = tuple(b.shape[2:])
    if lengths is not None and cu_seqlens is not None:
        raise ValueError("linear_scan: pass either lengths or cu_seqlens, not both")
    num_rows = B
    if cu_seqlens is not None:
        int_dtype = cu_seqlens.dtype in (torch.int32, torch.int64)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or not int_dtype:
            raise ValueError(
                f"linear_scan: cu_seqlens must be a 1-D integer tensor [num_seqs + 1], got shape "
                f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}"
            )
        if B != 1:
            raise ValueError(f"linear_scan: with cu_seqlens the batch must be [1, total, ...], got B={B}")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens.diff() < 0).any()):
            raise ValueError(
                f"linear_scan: cu_seqlens must rise from 0 to T={T} without decreasing, "
                f"got {cu_seqlens.tolist()}"
            )
        num_rows = cu_seqlens.numel() - 1
    if lengths is not None:
        if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"linear_scan: lengths must be an integer tensor of shape ({B},), got shape "
                f"{tuple(lengths.shape)} dtype {lengths.dtype}"
            )
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"linear_scan: lengths must lie in [0, T={T}], got {lengths.tolist()}")
    if initial_state is not None:
        if tuple(initial_state.shape) != (num_rows, *S):
            raise ValueError(
                f"linear_scan: initial_state must have shape {(num_rows, *S)}, "
                f"got {tuple(initial_state.shape)}"
            )
