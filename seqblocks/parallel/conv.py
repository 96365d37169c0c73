"""The causal short convolution on a sequence split along time: each chunk needs the ``W - 1`` inputs
before it (a halo), which live on the previous rank (on several when a chunk is shorter than the halo).

``conv_halo`` all-gathers every rank's last ``min(W - 1, T)`` inputs (differentiably) and returns the
local rows' initial conv states: the previous ranks' tail, with the caller's ``initial_state`` where
the window reaches before the sequence (or document) start. ``causal_conv1d_cp`` is
``seqblocks.ops.causal_conv1d.causal_conv1d`` with that halo, plus the full sequence's final state.

Shapes: B batch, T the local chunk's length, C channels, W filter width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqblocks.ops.causal_conv1d import causal_conv1d
from seqblocks.ops.causal_conv1d._checks import check_conv_inputs
from seqblocks.parallel.context import ContextParallel
from seqblocks.parallel.scan import (
    assemble_finals,
    check_packed_initial,
    gather_stack,
    layout,
    resolve_cp,
    tie,
)

__all__ = ["conv_halo", "causal_conv1d_cp"]


def conv_halo(x: Tensor | tuple[Tensor, ...], width: int, *, initial_state: Tensor | None = None,
              cu_seqlens: Tensor | None = None,
              cp: ContextParallel | None = None) -> Tensor | tuple[Tensor | None, ...] | None:
    """The initial states [rows, width - 1, C] of this chunk's rows for a causal conv of ``width``.

    Without ``cu_seqlens``: [B, width - 1, C], the ``width - 1`` inputs before the chunk (from the
    previous ranks; ``initial_state`` [B, width - 1, C] where they would precede position 0, zeros when
    None). With the full sequence's ``cu_seqlens`` (x [1, T, C]): one row per local piece of a document
    (``seqblocks.parallel.scan.local_cu_seqlens``), the continuing piece's taken from the previous ranks
    back to its document's start, each other piece its document's ``initial_state`` row (zeros when None).
    Differentiable; the result depends on the all-gather on every rank (so every backward reaches it).
    Outside a group: ``initial_state``.

    ``x`` may be a tuple of chunks [B, T, C_i] (the inputs of several convs of one width, like DeltaNet's
    q, k and v): one all-gather serves them all and a tuple of halos comes back (``initial_state`` must
    then be None).

    Raises:
        ValueError: a width below 1, an initial_state of the wrong shape or with a tuple ``x``.
    """
    cp = resolve_cp(cp, "conv_halo")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"conv_halo: width must be a positive int, got {width!r}")
    if isinstance(x, tuple | list):
        if initial_state is not None:
            raise ValueError("conv_halo: initial_state goes with one tensor x, not a tuple")
        if cp is None:
            return (None,) * len(x)
        T = x[0].shape[1]
        m = min(width - 1, T)
        halo = _halo(torch.cat([t[:, T - m:] for t in x], dim=-1), T, width, None, cu_seqlens, cp)
        return tuple(halo.split([t.shape[-1] for t in x], dim=-1))
    if cp is None:
        return initial_state
    T = x.shape[1]
    return _halo(x[:, T - min(width - 1, T):], T, width, initial_state, cu_seqlens, cp)


def _halo(tail: Tensor, T: int, width: int, initial_state: Tensor | None, cu_seqlens: Tensor | None,
          cp: ContextParallel) -> Tensor:
    """``conv_halo`` from this chunk's last min(width - 1, T) inputs ``tail`` [B, m, C]."""
    B, m, Cn = tail.shape
    w = width - 1
    lay = layout("conv_halo", cp, T, B, tail.device, cu_seqlens=cu_seqlens)
    rows = 1 if lay.packed else B
    if initial_state is not None:
        want = (lay.num_docs if lay.packed else B, w, Cn)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"conv_halo: initial_state must have shape {want}, got {tuple(initial_state.shape)}")
    tails = gather_stack(tail, cp)  # [W, B, m, C]
    # The inputs before this chunk that the gather holds: the previous rank's tail, or (chunks shorter
    # than the halo) every earlier chunk whole. They cover positions [start - len(seq), start).
    r = lay.position
    seq = tails[:r].permute(1, 0, 2, 3).reshape(B, r * m, Cn) if m < w else tails[max(r - 1, 0)][:, : m * min(r, 1)]
    doc_start = 0
    init_rows = initial_state
    if lay.packed:
        doc = lay.docs[0]
        doc_start = int(cu_seqlens[doc]) if lay.continues else lay.start
        init_rows = initial_state[doc:doc + 1] if initial_state is not None and lay.continues else None
    init_rows = tail.new_zeros(rows, w, Cn) if init_rows is None else init_rows.to(tail.dtype)
    # The window [start - w, start): positions at or after the document start from seq, earlier ones
    # from its initial state (which holds the w inputs before the document start, oldest first).
    ext = torch.cat([init_rows, seq[:rows].to(tail.dtype)], dim=1)  # [rows, w + len(seq), C]
    start, n_seq = lay.start, seq.shape[1]
    idx = [w + p - (start - n_seq) if p >= doc_start else w - (doc_start - p) for p in range(start - w, start)]
    halo = ext[:, torch.tensor(idx, dtype=torch.long, device=tail.device)]
    halo = tie(halo, tails)  # rank 0 reads nothing gathered, yet its backward must reach the gather
    if not lay.packed:
        return halo
    others = tail.new_zeros(lay.cu.numel() - 1, w, Cn) if initial_state is None else initial_state[
        torch.tensor(lay.docs, dtype=torch.long, device=tail.device)].to(tail.dtype)
    if lay.continues:
        return torch.cat([halo, others[1:]])
    # No continuing piece: the halo is not used, but the backward must still reach the gather.
    return torch.cat([tie(others[:1], halo), others[1:]])


def causal_conv1d_cp(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None,
                     initial_state: Tensor | None = None, lengths: Tensor | None = None,
                     cu_seqlens: Tensor | None = None, backend: str = "auto", final_state: bool = True,
                     cp: ContextParallel | None = None) -> tuple[Tensor, Tensor | None]:
    """``seqblocks.ops.causal_conv1d.causal_conv1d`` on a sequence split along time.

    Args:
        x, weight, bias, activation, backend: as in ``causal_conv1d``, x this rank's chunk [B, T, C].
        initial_state (Tensor | None): the full sequence's ([B, W - 1, C]; with cu_seqlens [S, W - 1, C]).
        lengths, cu_seqlens (Tensor | None): the full sequence's (checked against W * T).
        final_state (bool): also form the full sequence's final state (one more small all-gather: each
            row's / document's last W - 1 inputs come from the rank it ends on). Default: True.
        cp (ContextParallel | None): the group. Default: None (``current_context_parallel()``).

    Returns:
        (y [B, T, C] this chunk's outputs, the full sequence's final state [B or S, W - 1, C], or None
        when ``final_state`` is False).

    Raises:
        TypeError / ValueError: as ``causal_conv1d``.
    """
    cp = resolve_cp(cp, "causal_conv1d_cp")
    if cp is None:
        y, f = causal_conv1d(x, weight, bias, activation=activation, initial_state=initial_state, lengths=lengths,
                             cu_seqlens=cu_seqlens, backend=backend)
        return y, (f if final_state else None)
    op = "causal_conv1d_cp"
    check_conv_inputs(op, x, weight, bias, activation, None, None)
    B, T = x.shape[:2]
    lay = layout(op, cp, T, B, x.device, lengths=lengths, cu_seqlens=cu_seqlens)
    check_conv_inputs(op, x, weight, bias, activation, check_packed_initial(op, initial_state, lay, B), None)
    init = conv_halo(x, weight.shape[1], initial_state=initial_state, cu_seqlens=cu_seqlens, cp=cp)
    y, f = causal_conv1d(x, weight, bias, activation=activation, initial_state=init, lengths=lay.lengths,
                         cu_seqlens=lay.cu, backend=backend)
    if not final_state:
        return y, None
    # The finals' gather is chained after the halo's (see seqblocks.parallel.scan.assemble_finals).
    if lay.packed:
        final, gathered = assemble_finals(f, lay, cp, init)
    else:
        # A row's final state is on the rank holding its last valid token (rank 0 for an empty row).
        n = lengths if lengths is not None else torch.full((B,), cp.world_size * T, device=x.device)
        owner = ((n.to(torch.long) + T - 1) // T - 1).clamp(min=0)
        mine = (owner == cp.rank).view(B, 1, 1)
        f = tie(f, init)
        gathered = gather_stack(torch.where(mine, f, torch.zeros((), dtype=f.dtype, device=f.device)), cp)
        final = gathered.sum(0)
    return tie(y, gathered), final
