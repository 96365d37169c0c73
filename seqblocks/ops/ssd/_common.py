"""Input validation and step preprocessing of ``ssd`` (kept apart so that the package namespace never
needs the name ``torch``, which the submodule ``.torch`` binds there).

Shapes: B batch, T time, H heads, P head width, N state, G groups of B / C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqblocks.ops._packing import check_cu_seqlens

__all__ = ["check_inputs", "check_dt_limit", "process_dt", "compute_dtype", "head_groups"]


def _shape_error(op: str, name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")


def check_dt_limit(op: str, dt_limit) -> tuple[float, float]:
    """``dt_limit`` as ``(lo, hi)`` floats; ``hi`` None means no upper limit (inf).

    Raises:
        TypeError: not a pair of numbers.
        ValueError: ``lo`` negative or not finite, or ``hi < lo``.
    """
    if not isinstance(dt_limit, tuple | list) or len(dt_limit) != 2:
        raise TypeError(f"{op}: dt_limit must be a pair (lo, hi), got {dt_limit!r}")
    lo, hi = dt_limit
    hi = math.inf if hi is None else hi
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{op}: dt_limit must hold numbers (hi may be None), got {dt_limit!r}")
    if not (math.isfinite(lo) and lo >= 0 and not math.isnan(hi) and hi >= lo):
        raise ValueError(f"{op}: dt_limit must satisfy 0 <= lo <= hi (lo finite), got {dt_limit!r}")
    return float(lo), float(hi)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any input is float64: the dtype of the state and every accumulation."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool, limit: tuple[float, float],
               dtype: torch.dtype) -> torch.Tensor:
    """The step actually used: ``clamp(softplus(dt + dt_bias), *limit)`` in ``dtype`` (bias, softplus optional)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if softplus:
        dt = F.softplus(dt)  # threshold 20: dt itself above it, as mamba's kernels do
    lo, hi = limit
    hi = math.inf if hi is None else hi
    if lo > 0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def head_groups(M: torch.Tensor, H: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H / G)."""
    return M.repeat_interleave(H // M.shape[-2], dim=-2)


def check_inputs(op, x, dt, A, B, C, D, z, dt_bias, initial_state, lengths, cu_seqlens, chunk_size=None) -> None:
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_state", initial_state)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be real floating point, got {t.dtype}")
    if x.dim() != 4:
        raise _shape_error(op, "x", x, "[B, T, H, P]")
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise _shape_error(op, "dt", dt, f"[{Bsz}, {T}, {H}]")
    if A.shape != (H,):
        raise _shape_error(op, "A", A, f"[H={H}]")
    if B.dim() != 4 or B.shape[:2] != (Bsz, T):
        raise _shape_error(op, "B", B, f"[{Bsz}, {T}, G, N]")
    if C.shape != B.shape:
        raise _shape_error(op, "C", C, f"{tuple(B.shape)} (like B)")
    G = B.shape[2]
    if G == 0 or H % G != 0:
        raise ValueError(f"{op}: groups G={G} must divide the number of heads H={H}")
    N = B.shape[3]
    if D is not None and D.shape not in ((H,), (H, P)):
        raise _shape_error(op, "D", D, f"[{H}] or [{H}, {P}]")
    if z is not None and z.shape != x.shape:
        raise _shape_error(op, "z", z, f"{tuple(x.shape)} (like x)")
    if dt_bias is not None and dt_bias.shape != (H,):
        raise _shape_error(op, "dt_bias", dt_bias, f"[{H}]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    if lengths is not None and cu_seqlens is not None:
        raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
    rows = Bsz
    if cu_seqlens is not None:
        rows = check_cu_seqlens(op, cu_seqlens, Bsz, T)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (Bsz,) \
                or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: lengths must be an int32 / int64 tensor of shape ({Bsz},), got {lengths!r}")
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"{op}: lengths must lie in [0, T={T}], got {lengths.tolist()}")
    if initial_state is not None and initial_state.shape != (rows, H, P, N):
        raise _shape_error(op, "initial_state", initial_state, f"[{rows}, {H}, {P}, {N}]")
