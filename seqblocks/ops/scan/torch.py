"""Fast pure-PyTorch diagonal linear scan: odd-even reduction (a work-efficient associative scan).

Forward: neighbouring pairs ``(2i, 2i+1)`` are combined into one element of a half-length recurrence
``A'_i = a_{2i+1} a_{2i}``, ``B'_i = a_{2i+1} b_{2i} + b_{2i+1}``, whose solution is the state at every
odd position; the even positions then follow in one vectorised step, ``h_{2i} = a_{2i} h_{2i-1} +
b_{2i}``. Recursing halves the length each time, so a scan of T steps is log2(T) levels of a few
strided tensor operations: no Python loop over T, O(T) total work (about twice the sequential
recurrence's), no division by cumulative products (decays of 0 are fine), and memory O(B * T * S).

Backward (a custom autograd Function, memory O(B * T * S): it saves ``a`` and ``h`` only): the
adjoint of a linear recurrence is the same recurrence run backwards in time,
``g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}``, with ``dL/db_t = g_t`` and ``dL/da_t = g_t conj(h_{t-1})``
(PyTorch's conjugate-Wirtinger convention for complex tensors).

Variable lengths and packed sequences are reduced to the plain scan by editing the inputs: padding
gets ``a = 1, b = 0`` (the state passes through untouched) and a packed sequence's first position gets
``a = 0`` (the state restarts); reversal within rows / sequences is a gather.

Shapes: B batch, T time, S the state's trailing shape, M = B rows.
"""

from __future__ import annotations

import torch

from seqblocks.ops.scan.reference import state_dtype

__all__ = ["linear_scan_torch", "scan_inner", "LinearScanFn"]


def scan_inner(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """States of ``h_t = a_t h_{t-1} + b_t`` from ``h_{-1} = 0`` (``h_t = a_t h_{t+1} + b_t`` from
    ``h_T = 0`` when ``reverse``), no autograd.

    Args:
        a (Tensor): [M, T, *S] decays, same dtype and shape as ``b``.
        b (Tensor): [M, T, *S] inputs.
        reverse (bool): scan from T - 1 down to 0. Default: False.
    """
    T = b.shape[1]
    if T <= 1:
        return b.clone()
    n = T // 2
    h = torch.empty_like(b)
    if not reverse:
        # Pairs (2i, 2i+1): the half-length recurrence of the composed pairs gives h at odd positions.
        a_even, a_odd = a[:, 0 : 2 * n : 2], a[:, 1 : 2 * n : 2]
        h_odd = scan_inner(a_odd * a_even, torch.addcmul(b[:, 1 : 2 * n : 2], a_odd, b[:, 0 : 2 * n : 2]))
        h[:, 1::2] = h_odd
        h[:, 0] = b[:, 0]
        if T > 2:
            h[:, 2::2] = torch.addcmul(b[:, 2::2], a[:, 2::2], h_odd[:, : (T - 1) // 2])
        return h
    # Reversed: pairs are aligned to the end, (o + 2i, o + 2i + 1) with o = T mod 2; in scan order the
    # later position of each pair comes first, and the half-length reversed recurrence gives h at o + 2i.
    o = T % 2
    a_first, a_second = a[:, o + 1 :: 2], a[:, o::2]
    h_second = scan_inner(a_second * a_first, torch.addcmul(b[:, o::2], a_second, b[:, o + 1 :: 2]), True)
    h[:, o::2] = h_second
    h[:, T - 1] = b[:, T - 1]
    if n > 1:
        h[:, o + 1 : T - 1 : 2] = torch.addcmul(b[:, o + 1 : T - 1 : 2], a[:, o + 1 : T - 1 : 2], h_second[:, 1:])
    if o:
        h[:, 0] = torch.addcmul(b[:, 0], a[:, 0], h_second[:, 0])
    return h


class LinearScanFn(torch.autograd.Function):
    """``h = scan(a, b, reverse)`` for same-shape [M, T, *S] tensors of one dtype, with an O(M T S)
    backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        a = a.contiguous()
        h = scan_inner(a, b.contiguous(), reverse)
        ctx.save_for_backward(a, h)
        ctx.reverse = reverse
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, h = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        # The adjoint runs the other way with the neighbour's decay: for a forward scan
        # g_t = grad_h_t + conj(a_{t+1}) g_{t+1}, and dL/da_t = g_t conj(h_{t-1}).
        a_adj = torch.ones_like(a)
        h_prev = torch.zeros_like(h)
        if not ctx.reverse:
            a_adj[:, :-1] = a[:, 1:].conj()
            h_prev[:, 1:] = h[:, :-1]
        else:
            a_adj[:, 1:] = a[:, :-1].conj()
            h_prev[:, :-1] = h[:, 1:]
        g = scan_inner(a_adj, grad_h, not ctx.reverse)
        return g * h_prev.conj(), g, None


def linear_scan_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    lengths: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path of ``seqblocks.ops.scan.linear_scan`` (see there); inputs are assumed valid."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    dtypes = (a.dtype, b.dtype) + ((initial_state.dtype,) if initial_state is not None else ())
    sdt = state_dtype(*dtypes)
    B, T = b.shape[:2]
    a = torch.broadcast_to(a, b.shape).to(sdt)
    b = b.to(sdt)
    h0 = None if initial_state is None else initial_state.to(sdt)
    bcast = (slice(None), slice(None)) + (None,) * (b.dim() - 2)
    zero = torch.zeros((), dtype=sdt, device=b.device)
    # The first position in scan order, where the initial state enters, and the last, which holds the
    # final state (padding lies after a row's valid prefix in scan order forward and before it in reverse;
    # with a = 1, b = 0 there it carries the state through unchanged either way).
    first, last = (T - 1, 0) if reverse else (0, T - 1)

    valid = None
    if lengths is not None and T > 0:
        valid = (torch.arange(T, device=b.device) < lengths.unsqueeze(1))[bcast]
        a = torch.where(valid, a, torch.ones((), dtype=sdt, device=b.device))
        b = torch.where(valid, b, zero)

    if cu_seqlens is not None:
        starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
        nonempty = ends > starts
        heads = (ends - 1 if reverse else starts)[nonempty]  # each sequence's first position in scan order
        tails = (starts if reverse else ends - 1).clamp(0, max(T - 1, 0))
        if h0 is not None:
            # Fold each sequence's initial state into its first input, then cut the chain there.
            inj = torch.zeros_like(b)
            inj[0, heads] = a[0, heads] * h0[nonempty]
            b = b + inj
        cut = torch.zeros(1, T, dtype=torch.bool, device=b.device)
        cut[0, heads] = True
        a = torch.where(cut[bcast], zero, a)
    elif h0 is not None and T > 0:
        inj = torch.zeros_like(b)
        inj[:, first] = a[:, first] * h0
        b = b + inj

    h = LinearScanFn.apply(a, b, reverse) if T > 0 else b.clone()

    if cu_seqlens is not None:
        empty_state = b.new_zeros(cu_seqlens.numel() - 1, *b.shape[2:]) if h0 is None else h0
        final = empty_state if T == 0 else torch.where(nonempty[(slice(None),) + (None,) * (b.dim() - 2)],
                                                       h[0, tails], empty_state)
    elif T > 0:
        final = h[:, last]
    else:
        final = b.new_zeros(B, *b.shape[2:]) if h0 is None else h0
    if valid is not None:
        h = torch.where(valid, h, zero)
    return h.to(out_dtype), final
