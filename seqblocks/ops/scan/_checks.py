"""Input validation of ``linear_scan`` (kept apart so the package namespace stays free of ``torch``).

Shapes: B batch, T time, S the state's trailing shape.
"""

from __future__ import annotations

import torch

from seqblocks.ops._packing import check_cu_seqlens


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
        num_rows = check_cu_seqlens("linear_scan", cu_seqlens, B, T)
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
