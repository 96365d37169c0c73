"""Input validation of ``gla`` / ``simple_gla`` and their decode steps (kept apart so the package
namespace never needs the name ``torch``, which the submodule ``.torch`` binds there).

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import math

import torch

from seqblocks.ops._packing import check_cu_seqlens

__all__ = ["check_inputs", "check_step_inputs", "compute_dtype", "resolve_scale", "num_rows"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any input is float64: the dtype of the state and every accumulation."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_scale(op: str, scale, K: int) -> float:
    """``scale`` as a float; None gives fla's default ``K ** -0.5``."""
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _floating(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be real floating point, got {t.dtype}")


def num_rows(B: int, cu_seqlens: torch.Tensor | None) -> int:
    """The number of independent sequences: B, or N with ``cu_seqlens`` [N + 1]."""
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def check_inputs(op: str, q, k, v, g, initial_state, cu_seqlens, *, scalar_decay: bool) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the offending argument (see ``gla`` / ``simple_gla``)."""
    _floating(op, q=q, k=k, v=v, g=g, initial_state=initial_state)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape [B, T, H, K], got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"{op}: v must have shape [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    expected_g = (B, T, H) if scalar_decay else (B, T, H, K)
    if g.shape != expected_g:
        name = "[B, T, H]" if scalar_decay else "[B, T, H, K]"
        raise ValueError(f"{op}: g must have shape {name} = {expected_g}, got {tuple(g.shape)}")
    if K == 0 or v.shape[3] == 0:
        raise ValueError(f"{op}: head widths must be positive, got K={K}, V={v.shape[3]}")
    if cu_seqlens is not None:
        check_cu_seqlens(op, cu_seqlens, B, T)
    rows = num_rows(B, cu_seqlens)
    if initial_state is not None and initial_state.shape != (rows, H, K, v.shape[3]):
        raise ValueError(f"{op}: initial_state must have shape [{rows}, {H}, {K}, {v.shape[3]}], got "
                         f"{tuple(initial_state.shape)}")


def check_step_inputs(op: str, state, q, k, v, g, *, scalar_decay: bool) -> None:
    """Checks of a one-token decode step: state [B, H, K, V], q and k [B, H, K], v [B, H, V], g
    [B, H, K] ([B, H] for the scalar decay)."""
    _floating(op, state=state, q=q, k=k, v=v, g=g)
    if state.dim() != 4:
        raise ValueError(f"{op}: state must have shape [B, H, K, V], got {tuple(state.shape)}")
    B, H, K, V = state.shape
    for name, t, shape in (("q", q, (B, H, K)), ("k", k, (B, H, K)), ("v", v, (B, H, V)),
                           ("g", g, (B, H) if scalar_decay else (B, H, K))):
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} (from state {tuple(state.shape)}), got "
                             f"{tuple(t.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: state must be fp32 (or float64), got {state.dtype}")
