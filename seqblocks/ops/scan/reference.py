"""Reference (the spec) of the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

Sequential over time, one sequence at a time, with the state held in fp32 / complex64 (float64 /
complex128 when an input is 64-bit). Slow and obviously right; every fast path is tested against it.

Shapes: B batch, T time, S the state's trailing shape (e.g. D, or D x N).
"""

from __future__ import annotations

import torch

__all__ = ["linear_scan_ref", "state_dtype"]


def state_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtypes``: their promotion, at least fp32 / complex64."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _scan_one(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
              reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # a, b: [T, *S] in the state dtype; h: [*S]. Returns (all states [T, *S], final state [*S]).
    T = b.shape[0]
    out = torch.zeros_like(b)
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        h = a[t] * h + b[t]
        out[t] = h
    return out, h


def linear_scan_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential ``h_t = a_t * h_{t-1} + b_t`` (``h_{t+1}`` when ``reverse``); see
    ``seqblocks.ops.scan.linear_scan`` for the full contract. Inputs are assumed valid."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    dtypes = (a.dtype, b.dtype) + ((initial_state.dtype,) if initial_state is not None else ())
    sdt = state_dtype(*dtypes)
    a = torch.broadcast_to(a, b.shape).to(sdt)
    b = b.to(sdt)
    B, T = b.shape[:2]
    S = b.shape[2:]
    h_all = torch.zeros_like(b)
    if cu_seqlens is not None:
        num_seqs = cu_seqlens.numel() - 1
        zero = torch.zeros(S, dtype=sdt, device=b.device)
        finals = []
        for i in range(num_seqs):
            s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            h0 = zero if initial_state is None else initial_state[i].to(sdt)
            h_all[0, s:e], h = _scan_one(a[0, s:e], b[0, s:e], h0, reverse)
            finals.append(h)
        return h_all.to(out_dtype), torch.stack(finals)
    zero = torch.zeros(S, dtype=sdt, device=b.device)
    finals = []
    for i in range(B):
        n = T if lengths is None else int(lengths[i])
        h0 = zero if initial_state is None else initial_state[i].to(sdt)
        # Only the valid prefix [0, n) is read; padding outputs stay 0 and never touch the state.
        h_all[i, :n], h = _scan_one(a[i, :n], b[i, :n], h0, reverse)
        finals.append(h)
    return h_all.to(out_dtype), torch.stack(finals)
