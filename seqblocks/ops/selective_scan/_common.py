"""Input validation and packed-sequence helpers of ``selective_scan`` (kept apart so that the package
namespace never needs the name ``torch``, which the submodule ``.torch`` binds there).

Shapes: B batch, T time, D channels, N state, G groups of B / C.
"""

from __future__ import annotations

import torch

from seqblocks.ops._packing import check_cu_seqlens
from seqblocks.ops.discretize import DISCRETIZATIONS

__all__ = ["check_inputs"]


def _shape_error(name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"selective_scan: {name} must have shape {expected}, got {tuple(t.shape)}")


def check_inputs(u, delta, A, B, C, D, z, delta_bias, discretization, delta_A, initial_state, lengths,
           cu_seqlens) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("delta_A", delta_A), ("initial_state", initial_state)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"selective_scan: {name} must be floating point or complex, got {t.dtype}")
    for name, t in (("u", u), ("delta", delta), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.is_complex():
            raise TypeError(f"selective_scan: {name} must be real, got {t.dtype}")
    if u.dim() != 3:
        raise _shape_error("u", u, "[B, T, D]")
    Bsz, T, Dm = u.shape
    if delta.shape != u.shape:
        raise _shape_error("delta", delta, f"{tuple(u.shape)} (like u)")
    if z is not None and z.shape != u.shape:
        raise _shape_error("z", z, f"{tuple(u.shape)} (like u)")
    if A.dim() != 2 or A.shape[0] != Dm:
        raise _shape_error("A", A, f"[D={Dm}, N]")
    N = A.shape[1]
    if B.dim() not in (3, 4):
        raise _shape_error("B", B, f"[B={Bsz}, T={T}, N={N}] or [B, T, G, N]")
    expected = (Bsz, T, N) if B.dim() == 3 else (Bsz, T, B.shape[2], N)
    if B.shape != expected or C.shape != expected:
        bad, t = ("B", B) if B.shape != expected else ("C", C)
        raise _shape_error(bad, t, f"{expected} (B and C alike; [B, T, N] or [B, T, G, N] with N={N})")
    if B.dim() == 4 and (B.shape[2] == 0 or Dm % B.shape[2] != 0):
        raise ValueError(f"selective_scan: groups G={B.shape[2]} must divide D={Dm}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (Dm,):
            raise _shape_error(name, t, f"[{Dm}]")
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"selective_scan: unknown discretization {discretization!r}; expected one of "
                         f"{DISCRETIZATIONS}")
    if delta_A is not None and delta_A.shape not in ((Bsz, T, Dm), (Bsz, T)):
        raise _shape_error("delta_A", delta_A, f"[{Bsz}, {T}, {Dm}] or [{Bsz}, {T}]")
    if lengths is not None and cu_seqlens is not None:
        raise ValueError("selective_scan: pass either lengths or cu_seqlens, not both")
    rows = Bsz
    if cu_seqlens is not None:
        rows = check_cu_seqlens("selective_scan", cu_seqlens, Bsz, T)
    if lengths is not None:
        if lengths.shape != (Bsz,) or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"selective_scan: lengths must be an integer tensor of shape ({Bsz},), got shape "
                             f"{tuple(lengths.shape)} dtype {lengths.dtype}")
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"selective_scan: lengths must lie in [0, T={T}], got {lengths.tolist()}")
    if initial_state is not None and initial_state.shape != (rows, Dm, N):
        raise _shape_error("initial_state", initial_state, f"[{rows}, {Dm}, {N}]")
