"""Context-parallel scans: every recurrent op family with its sequence split along time over a group.

Under ``with context_parallel(group):`` rank r holds tokens ``[r * T, (r + 1) * T)`` of every row
(``seqblocks.parallel.context``). Each function here takes the op's own arguments for the local chunk,
plus ``cp`` (default ``current_context_parallel()``), and returns the local chunk of the op's outputs on
the full sequence; the final state is the full sequence's, the same on every rank. Outside a group, or
in a group of one, each is the op itself.

Every recurrence here is affine in its state: over one chunk, ``h_out = M h_in + s`` where ``s`` is the
chunk's final state from a zero start and ``M`` the chunk's state transition. So:

1. each rank runs the op on its chunk from zero (rank 0 from the caller's initial state), keeping its
   local final state ``s_r``;
2. it forms ``M_r`` cheaply from the inputs (diagonal decays: the product of the per-step decays;
   the delta rule: the K x K product of ``a_t (I - b_t k_t k_t^T)``, read off the same op call run
   with K extra value columns started from the identity);
3. one all-gather of the (small) pairs ``(M_r, s_r)`` and a left fold in rank order give each rank its
   incoming state ``h_in`` and every rank the final state;
4. the outputs are linear in the incoming state, so a light correction adds its contribution:
   ``C_t (prod_{s <= t} a_s) h_in`` for the diagonal scans (closed forms for the linear scan, SSD and
   GLA; a second selective scan with zero input for the selective scan, whose per-channel decays make
   the closed form as large as the scan), ``q~_t^T h_in`` for the delta rule.

Gradients flow through autograd: the local ops are differentiable and the all-gather's backward
returns each rank the summed cotangent of its own slice. Inputs every rank holds whole (``A``, ``D``,
biases, ``initial_state``) receive on each rank the gradient of that rank's share: sum them over the
group, as for parameters. A cotangent on the returned final state counts once per rank it is given
on: give it on one rank.

``lengths`` and ``cu_seqlens`` are the full sequence's (the same tensors on every rank). With
``cu_seqlens`` a document may cross rank boundaries: only the document continuing into a chunk takes
the incoming state, and a chunk in which a document starts passes no state through (its transition is
0). docs/context_parallel.md ("Scans") has the derivations.

Shapes: B batch, T the local chunk's length, W the group's size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seqblocks.ops._packing import check_cu_seqlens
from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule
from seqblocks.ops.delta_rule._checks import check_inputs as _check_delta
from seqblocks.ops.delta_rule._checks import compute_dtype as _delta_dtype
from seqblocks.ops.discretize import discretize
from seqblocks.ops.gla import gla, simple_gla
from seqblocks.ops.gla._checks import check_inputs as _check_gla
from seqblocks.ops.gla._checks import compute_dtype as _gla_dtype
from seqblocks.ops.gla._checks import resolve_scale
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.scan._checks import check_scan_inputs
from seqblocks.ops.scan.reference import state_dtype
from seqblocks.ops.selective_scan import selective_scan
from seqblocks.ops.selective_scan._common import check_inputs as _check_selective
from seqblocks.ops.selective_scan.reference import compute_dtypes
from seqblocks.ops.ssd import ssd
from seqblocks.ops.ssd._common import check_dt_limit, head_groups, process_dt
from seqblocks.ops.ssd._common import check_inputs as _check_ssd
from seqblocks.ops.ssd._common import compute_dtype as _ssd_dtype
from seqblocks.parallel.context import ContextParallel, current_context_parallel, gather_time

__all__ = ["linear_scan_cp", "selective_scan_cp", "ssd_cp", "delta_rule_cp", "gated_delta_rule_cp", "gla_cp",
           "simple_gla_cp", "mixer_context", "chunk_lengths", "local_lengths", "local_cu_seqlens",
           "document_positions_cp", "carried_poison"]


# ---- the group, the chunk's layout ----------------------------------------------------------------

def resolve_cp(cp: ContextParallel | None, op: str) -> ContextParallel | None:
    """``cp`` or the current group; None when there is none or it has one process (the plain op runs)."""
    cp = cp if cp is not None else current_context_parallel()
    if cp is not None and not isinstance(cp, ContextParallel):
        raise TypeError(f"{op}: cp must be a ContextParallel or None, got {type(cp).__name__}")
    return cp if cp is not None and cp.world_size > 1 else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How this rank's chunk cuts the rows or packed documents of the full sequence.

    ``order`` lists the ranks in scan order (reversed for a reverse scan) and ``position`` is this rank's
    place in it; ``start`` the first position of the chunk in that order's frame. Without ``cu_seqlens``
    every row continues from the previous chunk (``continues`` unless first), over the whole chunk
    (``head == T``), and ``lengths`` holds each row's valid positions inside the chunk. With
    ``cu_seqlens``, ``cu`` [P + 1] holds the local offsets of the P pieces of documents in the chunk,
    ``docs`` each piece's document, ``ends`` whether it ends there; the first piece ``continues`` a
    document begun before the chunk when its document starts earlier, ``head`` is its length, and
    ``through`` says the carried state crosses the whole chunk (one continuing piece).
    """

    order: tuple[int, ...]
    position: int
    T: int
    start: int
    lengths: Tensor | None
    cu: Tensor | None
    docs: tuple[int, ...]
    ends: tuple[bool, ...]
    num_docs: int
    continues: bool
    head: int
    through: bool

    @property
    def packed(self) -> bool:
        return self.cu is not None


def _check_global_lengths(op: str, lengths: object, batch: int, total: int) -> None:
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise TypeError(f"{op}: lengths must be an int32 / int64 tensor of shape ({batch},), got {got}")
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > total)).any()):
        raise ValueError(f"{op}: lengths (of the full sequence) must lie in [0, W * T = {total}], got "
                         f"{lengths.tolist()}")


def layout(op: str, cp: ContextParallel, T: int, batch: int, device: torch.device, *,
           lengths: Tensor | None = None, cu_seqlens: Tensor | None = None, reverse: bool = False) -> Layout:
    """The ``Layout`` of this rank's chunk of T tokens (``lengths`` / ``cu_seqlens`` of the full sequence).

    Raises:
        TypeError / ValueError: malformed lengths or cu_seqlens (checked against W * T), both given, or
            lengths with ``reverse`` (the caller masks instead).
    """
    W = cp.world_size
    total = W * T
    order = tuple(range(W - 1, -1, -1)) if reverse else tuple(range(W))
    position = order.index(cp.rank)
    start = position * T
    if lengths is not None and cu_seqlens is not None:
        raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
    local = None
    if lengths is not None:
        if reverse:
            raise ValueError(f"{op}: lengths with a reverse scan are applied by masking, not by the layout")
        _check_global_lengths(op, lengths, batch, total)
        local = (lengths.to(device=device, dtype=torch.long) - start).clamp(0, T)
    if cu_seqlens is None:
        return Layout(order, position, T, start, local, None, (), (), batch, position > 0, T, True)
    num = check_cu_seqlens(op, cu_seqlens, batch, total)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if reverse:
        bounds = [total - b for b in reversed(bounds)]
    end = start + T
    pieces: list[tuple[int, int, bool]] = []  # (document, local end, ends here)
    first_start = None
    for i in range(num):
        s, e = bounds[i], bounds[i + 1]
        if s == e:
            if min(s // T, W - 1) == position:  # an empty document belongs to the chunk holding its place
                pieces.append((i, s - start, True))
                first_start = s if first_start is None else first_start
        elif s < end and e > start:
            pieces.append((i, min(e, end) - start, e <= end))
            first_start = s if first_start is None else first_start
    cu = torch.tensor([0] + [p[1] for p in pieces], dtype=torch.long, device=device)
    continues = first_start < start
    head = pieces[0][1] if continues else 0
    return Layout(order, position, T, start, None, cu, tuple(p[0] for p in pieces), tuple(p[2] for p in pieces),
                  num, continues, head, continues and len(pieces) == 1)


def mixer_context(owner: str, cache: object = None) -> ContextParallel | None:
    """The group a natively context-parallel mixer's forward splits over (None outside a group or in a
    group of one: the plain forward).

    Raises:
        ValueError: a cache under a group of several processes (decoding is not context-parallel).
    """
    cp = resolve_cp(None, owner)
    if cp is not None and cache is not None:
        raise ValueError(f"{owner}: a call with a cache (prefill / decoding) is not context-parallel; run it "
                         f"outside context_parallel (the group here has {cp.world_size} processes)")
    return cp


def chunk_lengths(owner: str, lengths: Tensor | None, batch: int, T: int,
                  cp: ContextParallel | None) -> Tensor | None:
    """A mixer's ``lengths`` for its local computations: under ``cp``, the full sequence's ``lengths``
    checked against W * T and cut to this chunk (``local_lengths``); else ``lengths`` itself."""
    if cp is None or lengths is None:
        return lengths
    _check_global_lengths(owner, lengths, batch, cp.world_size * T)
    return local_lengths(lengths, T, cp)


def local_lengths(lengths: Tensor | None, T: int, cp: ContextParallel | None = None) -> Tensor | None:
    """This rank's valid positions per row, ``clamp(lengths - rank * T, 0, T)``, for full-sequence
    ``lengths`` [B] (None passes through; so does everything outside a group)."""
    cp = resolve_cp(cp, "local_lengths")
    if lengths is None or cp is None:
        return lengths
    return (lengths.to(torch.long) - cp.rank * T).clamp(0, T).to(lengths.dtype)


def local_cu_seqlens(cu_seqlens: Tensor | None, T: int, cp: ContextParallel | None = None) -> Tensor | None:
    """The offsets [P + 1] of the pieces of documents in this rank's chunk, for the full sequence's
    ``cu_seqlens`` (a document crossing a chunk boundary is one piece on each side)."""
    cp = resolve_cp(cp, "local_cu_seqlens")
    if cu_seqlens is None or cp is None:
        return cu_seqlens
    lay = layout("local_cu_seqlens", cp, T, 1, cu_seqlens.device, cu_seqlens=cu_seqlens)
    return lay.cu.to(cu_seqlens.dtype)


def document_positions_cp(T: int, cu_seqlens: Tensor | None, cp: ContextParallel | None = None,
                          device: torch.device | None = None) -> Tensor:
    """[1, T] long: each local token's position in its row (``rank * T + t``) or, with the full
    sequence's ``cu_seqlens``, in its document."""
    cp = resolve_cp(cp, "document_positions_cp")
    offset = 0 if cp is None else cp.rank * T
    device = device if device is not None else (cu_seqlens.device if cu_seqlens is not None else None)
    t = torch.arange(offset, offset + T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=t.device, dtype=torch.long)
        doc = torch.searchsorted(cu[1:], t, right=True)
        t = t - cu[doc]
    return t[None]


def valid_mask(lay: Layout, batch: int, device: torch.device) -> Tensor | None:
    """[B, T] bool of the valid positions (None without lengths)."""
    if lay.lengths is None:
        return None
    return torch.arange(lay.T, device=device)[None] < lay.lengths[:, None]


def local_initial(initial_state: Tensor | None, lay: Layout) -> Tensor | None:
    """The initial states of the local rows / pieces: rank 0's rows take the caller's, later ranks zero;
    packed, each piece its document's, except a continuing first piece (zero: it receives ``h_in``)."""
    if not lay.packed:
        return initial_state if lay.position == 0 else None
    if initial_state is None:
        return None
    init = initial_state[torch.tensor(lay.docs, dtype=torch.long, device=initial_state.device)]
    if lay.continues:
        init = torch.cat([torch.zeros_like(init[:1]), init[1:]])
    return init


def check_packed_initial(op: str, initial_state: Tensor | None, lay: Layout, batch: int) -> Tensor | None:
    """``initial_state`` as the op's own check sees it: packed, its first row (the trailing shape is
    checked there, the row count here); else itself."""
    if initial_state is None or not lay.packed:
        return initial_state
    if not isinstance(initial_state, Tensor) or initial_state.dim() < 1 or initial_state.shape[0] != lay.num_docs:
        shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
        raise ValueError(f"{op}: with cu_seqlens initial_state must hold one row per document ({lay.num_docs}), "
                         f"got {shape}")
    return initial_state[:1]


# ---- the exchange ---------------------------------------------------------------------------------

class _Tie(torch.autograd.Function):
    """``y`` unchanged, with zero cotangents sent to ``others``: every rank's backward then reaches the
    collectives that produced them, also where this rank's values did not use them (rank 0 takes no
    incoming state), so no rank waits for a peer that skipped its half of an all-reduce."""

    @staticmethod
    def forward(ctx, y: Tensor, *others: Tensor) -> Tensor:
        ctx.specs = [(o.shape, o.dtype, o.device) for o in others]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs))


def tie(y: Tensor, *others: Tensor | None) -> Tensor:
    """``y``, its backward also reaching ``others`` (see ``_Tie``); a no-op without autograd."""
    others = tuple(o for o in others if o is not None and o.requires_grad)
    if not torch.is_grad_enabled() or not others:
        return y
    return _Tie.apply(y, *others)


def _flatten(tensors: list[Tensor]) -> tuple[Tensor, list]:
    """[rows, ...] tensors (real or complex) -> one real [rows, n] tensor and how to undo it."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.real.dtype if t.is_complex() else t.dtype)
    rows = tensors[0].shape[0]
    parts, spec = [], []
    for t in tensors:
        r = torch.view_as_real(t) if t.is_complex() else t
        parts.append(r.reshape(rows, -1).to(dtype))
        spec.append((tuple(t.shape), t.dtype, parts[-1].shape[1]))
    return torch.cat(parts, dim=1), spec


def _unflatten(flat: Tensor, spec: list) -> list[Tensor]:
    out, i = [], 0
    for shape, dtype, n in spec:
        part = flat[:, i:i + n]
        i += n
        if dtype.is_complex:
            part = torch.view_as_complex(part.reshape(*shape, 2).contiguous())
        else:
            part = part.reshape(shape)
        out.append(part.to(dtype))
    return out


def gather_stack(x: Tensor, cp: ContextParallel) -> Tensor:
    """[W, *x.shape]: every rank's ``x``, differentiably (complex tensors travel as real pairs)."""
    if x.is_complex():
        return torch.view_as_complex(gather_stack(torch.view_as_real(x), cp).contiguous())
    return gather_time(x.unsqueeze(0), dim=0, cp=cp)


def exchange(M: Tensor, s: Tensor, lay: Layout, cp: ContextParallel,
             apply: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Compose every rank's (transition, local final state) in scan order.

    Returns (this rank's incoming state, the final state after the last chunk, the gathered tensor to
    ``tie`` the outputs to). One all-gather of [rows, |M| + |s|].
    """
    flat, spec = _flatten([M, s])
    gathered = gather_stack(flat, cp)  # [W, rows, n]
    pairs = [_unflatten(gathered[r], spec) for r in range(cp.world_size)]
    h = pairs[lay.order[0]][1]
    incoming = torch.zeros_like(h)
    for p in range(1, cp.world_size):
        Mr, sr = pairs[lay.order[p]]
        if p == lay.position:
            incoming = h
        h = apply(Mr, h) + sr
    return incoming, h, gathered


def assemble_finals(local_finals: Tensor, lay: Layout, cp: ContextParallel,
                    after: Tensor | None) -> tuple[Tensor, Tensor]:
    """Packed: [num_docs, ...] final states, each from the rank its document ends on (summed over an
    all-gather, so the result is the same on every rank). Returns (finals, the gathered tensor).

    ``after``: the previous collective's result. The input is tied to it, so on every rank this
    gather's backward runs before that one's: two collectives whose backward order autograd could
    choose differently on different ranks (where one rank's values do not connect them) would pair
    one rank's all-reduce with another's."""
    owned = [j for j, e in enumerate(lay.ends) if e]
    buf = local_finals.new_zeros(lay.num_docs, *local_finals.shape[1:])
    if owned:
        idx = torch.tensor(owned, dtype=torch.long, device=local_finals.device)
        docs = torch.tensor([lay.docs[j] for j in owned], dtype=torch.long, device=local_finals.device)
        buf = buf.index_copy(0, docs, local_finals.index_select(0, idx))
    # Tied also where this rank ends no document (buf all zeros): the gather must take part in autograd
    # on every rank alike, or one rank's backward skips an all-reduce its peers run.
    buf = tie(buf, after, local_finals)
    gathered = gather_stack(buf, cp)
    return gathered.sum(0), gathered


def _with_head(y: Tensor, head: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """``y`` with its first ``L`` positions (dim 1) replaced by ``head``, in ``dtype``."""
    if L == y.shape[1]:
        return head.to(dtype)
    return torch.cat([head.to(dtype), y[:, L:].to(dtype)], dim=1)


# ---- carried flags (the non-finite rule across ranks) ---------------------------------------------

def carried_poison(bad: Tensor, *, cu_seqlens: Tensor | None = None, causal: bool = True,
                   cp: ContextParallel | None = None) -> Tensor:
    """[B, T] bool: the local positions a non-finite token on another rank poisons
    (``seqblocks.layers.finite``): causal, the continuing row's / document's positions after a bad
    token on an earlier rank of the same row / document; non-causal, every position of a row with a bad
    token on any rank. ``bad`` [B, T] bool is this rank's own flags. Not differentiable; one small
    all-gather."""
    cp = resolve_cp(cp, "carried_poison")
    if cp is None:
        return torch.zeros_like(bad)
    B, T = bad.shape
    lay = layout("carried_poison", cp, T, B, bad.device, cu_seqlens=cu_seqlens)
    if not causal:
        flags = gather_stack(bad.any(1).to(torch.uint8), cp).detach().bool()  # [W, B]
        return flags.any(0)[:, None].expand(B, T).clone()
    if lay.packed:
        last = bad[:, int(lay.cu[-2]):].any(1)  # [1]: a bad token in the piece that continues
        through = torch.tensor([lay.through], device=bad.device)
    else:
        last, through = bad.any(1), torch.ones(B, dtype=torch.bool, device=bad.device)
    flags = gather_stack(torch.stack([last, through]).to(torch.uint8), cp).detach().bool()  # [W, 2, rows]
    carried = torch.zeros_like(last)
    incoming = carried
    for p in range(cp.world_size):
        r = lay.order[p]
        if p == lay.position:
            incoming = carried
        carried = (carried & flags[r, 1]) | flags[r, 0]
    out = torch.zeros_like(bad)
    if lay.continues:
        out[:, :lay.head] = incoming[:, None]
    return out


# ---- linear scan ----------------------------------------------------------------------------------

def linear_scan_cp(a: Tensor, b: Tensor, initial_state: Tensor | None = None, *, reverse: bool = False,
                   lengths: Tensor | None = None, cu_seqlens: Tensor | None = None, backend: str = "auto",
                   tuning=None, cp: ContextParallel | None = None) -> tuple[Tensor, Tensor]:
    """``seqblocks.ops.scan.linear_scan`` on a sequence split along time (see the module docstring).

    Transition: the product of the chunk's decays (a cumulative product, which also gives the
    correction ``h_t += (prod_{s <= t} a_s) h_in``: the output is the state itself). ``lengths`` are
    applied by masking (``a = 1``, ``b = 0`` at padding, outputs zeroed), which also serves ``reverse``;
    a reverse scan runs the chunks in reverse rank order.

    Args:
        a, b, initial_state, reverse, lengths, cu_seqlens, backend, tuning: as in ``linear_scan``,
            for this rank's chunk [B, T, *S]; ``lengths`` / ``cu_seqlens`` / ``initial_state`` of the
            full sequence.
        cp (ContextParallel | None): the group. Default: None (``current_context_parallel()``).

    Returns:
        (h [B, T, *S] this chunk's states, final_state [B or num_seqs, *S] the full sequence's).

    Raises:
        TypeError / ValueError: as ``linear_scan``, with lengths / cu_seqlens checked against W * T.
    """
    cp = resolve_cp(cp, "linear_scan_cp")
    if cp is None:
        return linear_scan(a, b, initial_state, reverse=reverse, lengths=lengths, cu_seqlens=cu_seqlens,
                           backend=backend, tuning=tuning)
    op = "linear_scan_cp"
    check_scan_inputs(a, b, None, None, None)
    B, T = b.shape[:2]
    lay = layout(op, cp, T, B, b.device, cu_seqlens=cu_seqlens, reverse=reverse)
    check_scan_inputs(a, b, check_packed_initial(op, initial_state, lay, B), None, None)
    sdt = state_dtype(a.dtype, b.dtype, *(() if initial_state is None else (initial_state.dtype,)))
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    valid = None
    if lengths is not None:
        _check_global_lengths(op, lengths, B, cp.world_size * T)
        if cu_seqlens is not None:
            raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
        n = local_lengths(lengths, T, cp).to(b.device)
        valid = (torch.arange(T, device=b.device)[None] < n[:, None]).view(B, T, *([1] * (b.dim() - 2)))
        a = torch.where(valid, torch.broadcast_to(a, b.shape), torch.ones((), dtype=a.dtype, device=a.device))
        b = torch.where(valid, b, torch.zeros((), dtype=b.dtype, device=b.device))
    if reverse:
        a = a.flip(1) if a.dim() == b.dim() and a.shape[1] == T else a
        b = b.flip(1)
        if lay.packed and initial_state is not None:
            initial_state = initial_state.flip(0)
    h0, f0 = linear_scan(a, b, local_initial(initial_state, lay), cu_seqlens=lay.cu, backend=backend,
                         tuning=tuning)
    rows = 1 if lay.packed else B
    s = f0[-1:] if lay.packed else f0
    M = torch.zeros_like(s)
    cum = None
    if lay.continues:
        L = lay.head
        a_head = torch.broadcast_to(a, b.shape)[:rows, :L].to(sdt)
        cum = torch.cumprod(a_head, dim=1)  # [rows, L, *S]
        if lay.through:
            M = cum[:, -1]
    h_in, final, gathered = exchange(M, s, lay, cp, lambda m, h: m * h)
    h = h0
    if cum is not None:
        h = _with_head(h0, h0[:, :lay.head].to(sdt) + cum * h_in[:, None], lay.head, out_dtype)
    finals_gathered = None
    if lay.packed:
        local = f0
        if cum is not None:
            local = torch.cat([f0[:1] + cum[:, -1] * h_in, f0[1:]])
        final, finals_gathered = assemble_finals(local, lay, cp, gathered)
        if reverse:
            final = final.flip(0)
    if reverse:
        h = h.flip(1)
    if valid is not None:
        h = torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device))
    return tie(h, gathered, finals_gathered), final


# ---- selective scan -------------------------------------------------------------------------------

def _selective_decay_product(delta: Tensor, A: Tensor, delta_bias: Tensor | None, softplus: bool,
                             discretization: str, delta_A: Tensor | None, valid: Tensor | None,
                             real: torch.dtype, sdt: torch.dtype) -> Tensor:
    """prod_t Ā_t over the given positions [rows, L, ...] -> [rows, D, N] (padding: Ā = 1)."""
    if delta_A is not None:
        step = delta_A.to(real)
        if step.dim() == 2:
            step = step.unsqueeze(-1).expand(*step.shape, delta.shape[-1])
    else:
        step = delta.to(real)
        if delta_bias is not None:
            step = step + delta_bias.to(real)
        if softplus:
            step = F.softplus(step)
    if valid is not None:
        step = torch.where(valid[..., None], step, torch.zeros((), dtype=real, device=step.device))
    A = A.to(sdt)
    if discretization != "bilinear":
        # Ā = exp(step A): the product is exp(A * sum of the steps), one [rows, D] sum.
        return torch.exp(step.sum(1)[..., None] * A)
    # (1 + step A / 2) / (1 - step A / 2) has no such form: multiply time blocks of [rows, c, D, N].
    rows, L, D = step.shape
    block = max(1, (1 << 22) // max(1, rows * D * A.shape[-1]))
    prod = torch.ones(rows, D, A.shape[-1], dtype=sdt, device=step.device)
    for lo in range(0, L, block):
        A_bar, _ = discretize(A, step[:, lo:lo + block, :, None], "bilinear")
        prod = prod * A_bar.prod(dim=1)
    return prod


def selective_scan_cp(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                      z: Tensor | None = None, *, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                      discretization: str = "mamba", delta_A: Tensor | None = None,
                      initial_state: Tensor | None = None, lengths: Tensor | None = None,
                      cu_seqlens: Tensor | None = None, backend: str = "auto", tuning=None,
                      cp: ContextParallel | None = None) -> tuple[Tensor, Tensor]:
    """``seqblocks.ops.selective_scan.selective_scan`` on a sequence split along time.

    Transition: ``exp(A * sum_t dt_t)`` per (channel, state) for the exponential discretisations (a
    blocked product of Ā for "bilinear"). Correction: the output's dependence on ``h_in`` is
    ``sum_n C_t[n] (prod_{s <= t} Ā_s[d, n]) h_in[d, n] * silu(z_t)``, a [T, D, N] quantity with no
    smaller closed form, so it is computed by the same op on zero input from ``h_in`` (no D, same gate),
    over the continuing row / document only.

    Args:
        As ``selective_scan`` for this rank's chunk; ``lengths`` / ``cu_seqlens`` / ``initial_state`` of
        the full sequence. cp: the group (default ``current_context_parallel()``).

    Returns:
        (y [B, T, D] this chunk's outputs, final_state [B or num_seqs, D, N] the full sequence's).

    Raises:
        TypeError / ValueError: as ``selective_scan``, with lengths / cu_seqlens checked against W * T.
    """
    cp = resolve_cp(cp, "selective_scan_cp")
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, discretization=discretization,
              backend=backend, tuning=tuning)
    if cp is None:
        return selective_scan(u, delta, A, B, C, D, z, delta_A=delta_A, initial_state=initial_state,
                              lengths=lengths, cu_seqlens=cu_seqlens, **kw)
    op = "selective_scan_cp"
    _check_selective(u, delta, A, B, C, D, z, delta_bias, discretization, delta_A, None, None, None)
    Bsz, T = u.shape[:2]
    lay = layout(op, cp, T, Bsz, u.device, lengths=lengths, cu_seqlens=cu_seqlens)
    _check_selective(u, delta, A, B, C, D, z, delta_bias, discretization, delta_A,
                     check_packed_initial(op, initial_state, lay, Bsz), None, None)
    real, sdt = compute_dtypes(u, delta, A, B, C, initial_state)
    y0, f0 = selective_scan(u, delta, A, B, C, D, z, delta_A=delta_A, initial_state=local_initial(initial_state, lay),
                            lengths=lay.lengths, cu_seqlens=lay.cu, **kw)
    rows = 1 if lay.packed else Bsz
    s = f0[-1:] if lay.packed else f0
    M = torch.zeros_like(s)
    L = lay.head
    valid = valid_mask(lay, Bsz, u.device)

    def head(t):
        return None if t is None else t[:rows, :L]

    if lay.continues and lay.through:
        M = _selective_decay_product(head(delta), A, delta_bias, delta_softplus, discretization, head(delta_A),
                                     head(valid), real, sdt)
    h_in, final, gathered = exchange(M, s, lay, cp, lambda m, h: m * h)
    y, local = y0, f0
    if lay.continues:
        y_c, f_c = selective_scan(torch.zeros_like(head(u)), head(delta), A, head(B), head(C), None, head(z),
                                  delta_A=head(delta_A), initial_state=h_in,
                                  lengths=None if lay.lengths is None else lay.lengths.clamp(max=L), **kw)
        y = _with_head(y0, y0[:, :L].to(real) + y_c.to(real), L, u.dtype)
        local = torch.cat([f0[:1] + f_c, f0[1:]]) if lay.packed else f0
    finals_gathered = None
    if lay.packed:
        final, finals_gathered = assemble_finals(local, lay, cp, gathered)
    return tie(y, gathered, finals_gathered), final


# ---- SSD ------------------------------------------------------------------------------------------

def ssd_cp(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
           *, dt_bias: Tensor | None = None, dt_softplus: bool = True,
           dt_limit: tuple[float, float | None] = (0.0, math.inf), initial_state: Tensor | None = None,
           return_final_state: bool = False, lengths: Tensor | None = None, cu_seqlens: Tensor | None = None,
           chunk_size: int | None = None, backend: str = "auto",
           cp: ContextParallel | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``seqblocks.ops.ssd.ssd`` on a sequence split along time.

    Transition: ``exp(A_h * sum_t step_t[h])``, one scalar per head. Correction (closed form, the
    inter-chunk term of SSD itself): ``y_t[h] += exp(A_h * sum_{s <= t} step_s[h]) h_in[h] C_t[g(h)]``,
    times ``silu(z_t)`` when gated: one [T, H, P] x N contraction over the continuing row / document.

    Args:
        As ``ssd`` for this rank's chunk; ``lengths`` / ``cu_seqlens`` / ``initial_state`` of the full
        sequence. cp: the group (default ``current_context_parallel()``).

    Returns:
        y [B, T, H, P] (this chunk's); with ``return_final_state`` also the full sequence's final state
        [B or num_seqs, H, P, N].

    Raises:
        TypeError / ValueError: as ``ssd``, with lengths / cu_seqlens checked against W * T.
    """
    cp = resolve_cp(cp, "ssd_cp")
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, chunk_size=chunk_size, backend=backend)
    if cp is None:
        return ssd(x, dt, A, B, C, D, z, initial_state=initial_state, return_final_state=return_final_state,
                   lengths=lengths, cu_seqlens=cu_seqlens, **kw)
    op = "ssd_cp"
    limit = check_dt_limit(op, dt_limit)
    _check_ssd(op, x, dt, A, B, C, D, z, dt_bias, None, None, None, chunk_size)
    Bsz, T, H, P = x.shape
    lay = layout(op, cp, T, Bsz, x.device, lengths=lengths, cu_seqlens=cu_seqlens)
    _check_ssd(op, x, dt, A, B, C, D, z, dt_bias, check_packed_initial(op, initial_state, lay, Bsz), None, None)
    acc = _ssd_dtype(x, dt, A, B, C, initial_state)
    y0, f0 = ssd(x, dt, A, B, C, D, z, initial_state=local_initial(initial_state, lay), return_final_state=True,
                 lengths=lay.lengths, cu_seqlens=lay.cu, **kw)
    rows = 1 if lay.packed else Bsz
    s = f0[-1:] if lay.packed else f0
    M = s.new_zeros(rows, H)
    L = lay.head
    cum = None
    if lay.continues:
        logd = process_dt(dt[:rows, :L], dt_bias, dt_softplus, limit, acc) * A.to(acc)  # [rows, L, H]
        valid = valid_mask(lay, Bsz, x.device)
        if valid is not None:
            logd = torch.where(valid[:rows, :L, None], logd, torch.zeros((), dtype=acc, device=x.device))
        cum = logd.cumsum(1)
        if lay.through:
            M = torch.exp(cum[:, -1])
    h_in, final, gathered = exchange(M, s, lay, cp, lambda m, h: m[:, :, None, None] * h)
    y, local = y0, f0
    if cum is not None:
        Ch = head_groups(C[:rows, :L].to(acc), H)  # [rows, L, H, N]
        yc = torch.einsum("blhn,bhpn->blhp", Ch, h_in) * torch.exp(cum)[..., None]
        if z is not None:
            yc = yc * F.silu(z[:rows, :L].to(acc))
        if valid is not None:
            yc = torch.where(valid[:rows, :L, None, None], yc, torch.zeros((), dtype=acc, device=x.device))
        y = _with_head(y0, y0[:, :L].to(acc) + yc, L, x.dtype)
        if lay.packed:
            local = torch.cat([f0[:1] + torch.exp(cum[:, -1])[:, :, None, None] * h_in, f0[1:]])
    finals_gathered = None
    if lay.packed:
        final, finals_gathered = assemble_finals(local, lay, cp, gathered)
    y = tie(y, gathered, finals_gathered)
    return (y, final) if return_final_state else y


# ---- delta rule -----------------------------------------------------------------------------------

def gated_delta_rule_cp(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                        initial_state: Tensor | None = None, output_final_state: bool = False,
                        cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False, chunk_size: int = 64,
                        backend: str = "auto", cp: ContextParallel | None = None) -> tuple[Tensor, Tensor | None]:
    """``seqblocks.ops.delta_rule.gated_delta_rule`` on a sequence split along time.

    The transition of a chunk is the K x K product ``P = prod_t exp(g_t) (I - b_t k_t k_t^T)`` per head,
    and the outputs' dependence on the incoming state is ``o_t += h_in^T q~_t`` with
    ``q~_t = scale P_t^T q_t`` (``P_t`` the product up to t). Both come out of the chunk's one op call:
    the state's value columns evolve independently, so K extra value columns that are 0 in ``v`` and
    start from the identity carry ``P_t`` (their final state is P, their outputs are ``q~_t``). That
    costs V + K value columns in one pass, where a separate transition pass (an op call on zero values
    from the identity) and a re-run for the correction would cost two more passes.

    Args:
        As ``gated_delta_rule`` for this rank's chunk; ``cu_seqlens`` / ``initial_state`` of the full
        sequence. cp: the group (default ``current_context_parallel()``).

    Returns:
        (o [B, T, H, V] this chunk's, the full sequence's final state [B or N, H, K, V] or None).

    Raises:
        TypeError / ValueError: as ``gated_delta_rule``, with cu_seqlens checked against W * T.
    """
    return _delta_cp("gated_delta_rule_cp", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                     use_qk_l2norm, chunk_size, backend, cp)


def delta_rule_cp(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False, chunk_size: int = 64,
                  backend: str = "auto", cp: ContextParallel | None = None) -> tuple[Tensor, Tensor | None]:
    """``seqblocks.ops.delta_rule.delta_rule`` on a sequence split along time: ``gated_delta_rule_cp``
    without the decay; arguments, results and errors as there."""
    return _delta_cp("delta_rule_cp", q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                     use_qk_l2norm, chunk_size, backend, cp)


def _delta_cp(op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
              chunk_size, backend, cp):
    cp = resolve_cp(cp, op)

    def run(v_, init, cu):
        kw = dict(scale=scale, initial_state=init, output_final_state=True, cu_seqlens=cu,
                  use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, backend=backend)
        return delta_rule(q, k, v_, beta, **kw) if g is None else gated_delta_rule(q, k, v_, g, beta, **kw)

    if cp is None:
        o, final = run(v, initial_state, cu_seqlens)
        return o, (final if output_final_state else None)
    _check_delta(op, q, k, v, g, beta, scale, None, None, chunk_size, gated=g is not None)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    lay = layout(op, cp, T, Bsz, q.device, cu_seqlens=cu_seqlens)
    _check_delta(op, q, k, v, g, beta, scale, check_packed_initial(op, initial_state, lay, Bsz), None, chunk_size,
                 gated=g is not None)
    acc = _delta_dtype(q, k, v, g, beta, initial_state)
    init = local_initial(initial_state, lay)
    rows = 1 if lay.packed else Bsz
    L = lay.head
    if lay.continues:
        n_rows = lay.cu.numel() - 1 if lay.packed else Bsz
        base = init if init is not None else torch.zeros(n_rows, H, K, V, dtype=acc, device=q.device)
        ident = torch.zeros(n_rows, H, K, K, dtype=acc, device=q.device)
        ident[:rows] = torch.eye(K, dtype=acc, device=q.device)
        o_aug, f_aug = run(torch.cat([v, v.new_zeros(Bsz, T, H, K)], dim=-1), torch.cat([base.to(acc), ident], -1),
                           lay.cu)
        o0, q_tilde = o_aug[..., :V], o_aug[:rows, :L, :, V:]
        f0, P = f_aug[..., :V], f_aug[:rows, ..., V:]  # P [rows, H, K, K]: the head piece's transition
    else:
        o0, f0 = run(v, init, lay.cu)
    s = f0[-1:] if lay.packed else f0
    M = P if lay.continues and lay.through else s.new_zeros(rows, H, K, K)
    h_in, final, gathered = exchange(M, s, lay, cp, lambda m, h: torch.einsum("rhij,rhjv->rhiv", m, h))
    o, local = o0, f0
    if lay.continues:
        corr = torch.einsum("blhk,bhkv->blhv", q_tilde.to(acc), h_in)
        o = _with_head(o0, o0[:, :L].to(acc) + corr, L, q.dtype)
        if lay.packed:
            local = torch.cat([f0[:1] + torch.einsum("rhij,rhjv->rhiv", P, h_in), f0[1:]])
    finals_gathered = None
    if lay.packed:
        final, finals_gathered = assemble_finals(local, lay, cp, gathered)
    return tie(o, gathered, finals_gathered), (final if output_final_state else None)


# ---- GLA ------------------------------------------------------------------------------------------

def gla_cp(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
           initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
           chunk_size: int = 64, backend: str = "auto",
           cp: ContextParallel | None = None) -> tuple[Tensor, Tensor | None]:
    """``seqblocks.ops.gla.gla`` on a sequence split along time.

    Transition: ``exp(sum_t g_t)`` per key channel. Correction (closed form, GLA's own inter-chunk
    term): ``o_t += scale (q_t * exp(sum_{s <= t} g_s))^T h_in``, one [T, K] x [K, V] product per head.

    Args:
        As ``gla`` for this rank's chunk; ``cu_seqlens`` / ``initial_state`` of the full sequence. cp: the
        group (default ``current_context_parallel()``).

    Returns:
        (o [B, T, H, V] this chunk's, the full sequence's final state [B or N, H, K, V] or None).

    Raises:
        TypeError / ValueError: as ``gla``, with cu_seqlens checked against W * T.
    """
    return _gla_cp("gla_cp", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend,
                   cp, scalar=False)


def simple_gla_cp(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None, chunk_size: int = 64, backend: str = "auto",
                  cp: ContextParallel | None = None) -> tuple[Tensor, Tensor | None]:
    """``seqblocks.ops.gla.simple_gla`` (g [B, T, H]) on a sequence split along time; as ``gla_cp``."""
    return _gla_cp("simple_gla_cp", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                   backend, cp, scalar=True)


def _gla_cp(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend, cp, *,
            scalar):
    cp = resolve_cp(cp, op)
    fn = simple_gla if scalar else gla
    kw = dict(scale=scale, chunk_size=chunk_size, backend=backend)
    if cp is None:
        return fn(q, k, v, g, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, **kw)
    _check_gla(op, q, k, v, g, None, None, scalar_decay=scalar)
    Bsz, T, H, K = q.shape
    lay = layout(op, cp, T, Bsz, q.device, cu_seqlens=cu_seqlens)
    _check_gla(op, q, k, v, g, check_packed_initial(op, initial_state, lay, Bsz), None, scalar_decay=scalar)
    scale_value = resolve_scale(op, scale, K)
    acc = _gla_dtype(q, k, v, g, initial_state)
    o0, f0 = fn(q, k, v, g, initial_state=local_initial(initial_state, lay), output_final_state=True,
                cu_seqlens=lay.cu, **kw)
    rows = 1 if lay.packed else Bsz
    s = f0[-1:] if lay.packed else f0
    M = s.new_zeros(rows, H, 1 if scalar else K)
    L = lay.head
    decay = None
    if lay.continues:
        cum = g[:rows, :L].to(acc).cumsum(1)
        decay = torch.exp(cum[..., None] if scalar else cum)  # [rows, L, H, K or 1]
        if lay.through:
            M = decay[:, -1]
    h_in, final, gathered = exchange(M, s, lay, cp, lambda m, h: m[..., None] * h)
    o, local = o0, f0
    if decay is not None:
        corr = scale_value * torch.einsum("blhk,bhkv->blhv", q[:rows, :L].to(acc) * decay, h_in)
        o = _with_head(o0, o0[:, :L].to(acc) + corr, L, q.dtype)
        if lay.packed:
            local = torch.cat([f0[:1] + decay[:, -1][..., None] * h_in, f0[1:]])
    finals_gathered = None
    if lay.packed:
        final, finals_gathered = assemble_finals(local, lay, cp, gathered)
    return tie(o, gathered, finals_gathered), (final if output_final_state else None)
