"""Input validation of the delta-rule ops (kept apart so that the package namespace never needs the name
``torch``, which the submodule ``.torch`` binds there).

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import math

import torch

from seqblocks.ops._packing import check_cu_seqlens

__all__ = ["check_inputs", "check_step_inputs", "compute_dtype", "l2norm", "L2NORM_EPS", "TRITON_DTYPES",
           "kernel_serves",
           "nonfinite_flags", "nan_to_zero", "zero_nonfinite", "first_bad", "poison"]

#: Input dtypes the Triton kernels serve (float64 runs the PyTorch path).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: The epsilon of the q / k L2 normalisation, ``x / sqrt(sum(x^2) + eps)`` (fla's ``l2norm``).
L2NORM_EPS = 1e-6


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any input is float64: the dtype of the state and every accumulation."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` in x's dtype (callers pass fp32)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)


def _floating(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be real floating point, got {t.dtype}")


def _shape_error(op: str, name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")


def check_inputs(op: str, q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size: int | None = None,
                 gated: bool = True) -> int:
    """Validate a full-sequence call; returns the number of sequences (B, or N with ``cu_seqlens``).

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-integer ``cu_seqlens``, a non-real ``scale``.
        ValueError: mismatched shapes, malformed ``cu_seqlens``, a bad ``chunk_size`` or ``scale``.
    """
    _floating(op, q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    if gated and g is None:
        raise TypeError(f"{op}: g must be a Tensor [B, T, H] of log decays, got None")
    if q.dim() != 4:
        raise _shape_error(op, "q", q, "[B, T, H, K]")
    Bsz, T, H, K = q.shape
    if k.shape != q.shape:
        raise _shape_error(op, "k", k, f"[{Bsz}, {T}, {H}, {K}] (q's shape)")
    if v.dim() != 4 or v.shape[:3] != (Bsz, T, H):
        raise _shape_error(op, "v", v, f"[{Bsz}, {T}, {H}, V]")
    V = v.shape[-1]
    if beta.shape != (Bsz, T, H):
        hint = " (a per-channel beta [B, T, H, V] is not supported: fla's chunk kernels take [B, T, H])" \
            if beta.shape == (Bsz, T, H, V) else ""
        raise _shape_error(op, "beta", beta, f"[{Bsz}, {T}, {H}]{hint}")
    if g is not None and g.shape != (Bsz, T, H):
        raise _shape_error(op, "g", g, f"[{Bsz}, {T}, {H}]")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    rows = Bsz
    if cu_seqlens is not None:
        rows = check_cu_seqlens(op, cu_seqlens, Bsz, T)
    if initial_state is not None and initial_state.shape != (rows, H, K, V):
        raise _shape_error(op, "initial_state", initial_state, f"[{rows}, {H}, {K}, {V}]")
    return rows


def check_step_inputs(op: str, state, q, k, v, g, beta, scale) -> None:
    """Validate a decode step: state [B, H, K, V], q / k [B, H, K], v [B, H, V], g / beta [B, H]."""
    _floating(op, state=state, q=q, k=k, v=v, g=g, beta=beta)
    if state.dim() != 4:
        raise _shape_error(op, "state", state, "[B, H, K, V]")
    Bsz, H, K, V = state.shape
    for name, t, shape in (("q", q, (Bsz, H, K)), ("k", k, (Bsz, H, K)), ("v", v, (Bsz, H, V)),
                           ("g", g, (Bsz, H)), ("beta", beta, (Bsz, H))):
        if t is not None and t.shape != shape:
            raise _shape_error(op, name, t, f"{list(shape)} (from state {list(state.shape)})")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: state must be fp32 (or float64) so the recurrence accumulates in it, got {state.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__} {scale!r}")


def kernel_serves(*tensors: torch.Tensor | None, state: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernels serve these inputs: fp16 / bf16 / fp32 only, and a decode ``state``
    that is contiguous fp32 (the step kernel updates it in place)."""
    if state is not None and not (state.dtype == torch.float32 and state.is_contiguous()):
        return False
    return all(t is None or t.dtype in TRITON_DTYPES for t in tensors)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _rows_finite(x: torch.Tensor) -> torch.Tensor:
    """``isfinite(x).all(-1)`` in one read of x: min and max over the last dim propagate NaN, and an
    infinity is one of them."""
    lo, hi = torch.aminmax(x, dim=-1)
    return torch.isfinite(lo) & torch.isfinite(hi)


def nonfinite_flags(q, k, v, g, beta):
    """The non-finite rule's flags, without autograd: ``bad_q`` [B, T, H] (a non-finite q: only that
    output is NaN) and ``bad = (bad_row [B, T, H], bad_v [B, T, H, V])``: a non-finite k, g or beta
    makes the head NaN from there on, a non-finite v only its own columns."""
    with torch.no_grad():
        bad_q = ~_rows_finite(q)
        row = _rows_finite(k) & torch.isfinite(beta)
        if g is not None:
            row = row & torch.isfinite(g)
        bad_v = (v * 0) != 0  # NaN for NaN and +-inf, 0 (or -0) for every finite value
    return bad_q, (~row, bad_v)


def nan_to_zero(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor with NaN / +-inf replaced by 0, as a contiguous copy (one pass; no autograd: for kernels
    whose gradients at those entries vanish anyway, since the outputs they reach are poisoned). The copy is
    written into a fresh contiguous tensor: ``nan_to_num`` alone keeps its input's strides, and the
    kernels address rows as contiguous (a [B, T, H, K] view with T innermost, as a short conv's
    transposed output is, would be read in the wrong order)."""
    return tuple(None if t is None else torch.nan_to_num(t.detach(), nan=0.0, posinf=0.0, neginf=0.0,
                                                         out=torch.empty(t.shape, dtype=t.dtype, device=t.device))
                 for t in tensors)


def zero_nonfinite(q, k, v, g, beta):
    """The non-finite rule's first half with autograd (the PyTorch path): ``(q, k, v, g, beta)`` with
    NaN / inf replaced by 0 (zero gradient there), and the flags of ``nonfinite_flags``."""
    bad_q, bad = nonfinite_flags(q, k, v, g, beta)
    q, k, v, beta = (_finite_or_zero(t) for t in (q, k, v, beta))
    return q, k, v, None if g is None else _finite_or_zero(g), beta, bad_q, bad


def first_bad(bad, cu_seqlens=None) -> torch.Tensor:
    """[N, H, V]: each (sequence, head, value column)'s first time index (in the row's time axis) whose
    row flag or column entry is bad, from ``bad = (bad_row [B, T, H], bad_v [B, T, H, V])``; any value
    >= T where none is. A reduction over time, not a scan."""
    bad_row, bad_v = bad
    T = bad_v.shape[1]
    if cu_seqlens is None:
        first_v = torch.where(bad_v.any(1), bad_v.view(torch.uint8).argmax(1), T)  # argmax: the first maximum
        first_r = torch.where(bad_row.any(1), bad_row.view(torch.uint8).argmax(1), T)
        return torch.minimum(first_v, first_r[..., None])
    t = torch.arange(T, device=bad_v.device)
    ends = cu_seqlens[1:].long()
    doc = torch.searchsorted(ends, t, right=True).clamp(max=ends.numel() - 1)  # [T]
    H, V = bad_v.shape[2:]
    stamp = torch.where(bad_v[0] | bad_row[0, :, :, None], t[:, None, None], T)  # [T, H, V]
    first = torch.full((ends.numel(), H, V), T, device=t.device, dtype=t.dtype)
    return first.scatter_reduce(0, doc[:, None, None].expand(T, H, V), stamp, "amin")


def poison(o, final, bad_q, first, cu_seqlens=None):
    """The second half: NaN where the sequential recurrence gives NaN: o [B, T, H, V] from each (sequence,
    head, column)'s ``first`` bad index on ([N, H, V], ``first_bad``), and at the tokens ``bad_q``
    [B, T, H] marks; final [N, H, K, V] (or None) in every column with a bad index. No host sync."""
    T = o.shape[1]
    if T == 0:
        return o, final
    t = torch.arange(T, device=o.device)
    if cu_seqlens is None:
        poisoned = t[None, :, None, None] >= first[:, None]
    else:
        ends = cu_seqlens[1:].long()
        doc = torch.searchsorted(ends, t, right=True).clamp(max=ends.numel() - 1)  # [T]
        poisoned = (t[:, None, None] >= first[doc]).unsqueeze(0)
    o = o.masked_fill(poisoned | bad_q[..., None], math.nan)
    if final is not None:
        final = final.masked_fill((first < T)[:, :, None, :], math.nan)
    return o, final
