"""Triton kernels of ``gla`` / ``simple_gla``: a chunked forward and backward, and a fused decode step.

Imported only through the dispatcher in ``seqblocks/ops/gla/__init__.py`` once
``seqblocks.ops._backend.resolve_backend`` has chosen "triton"; nothing else imports this module.

Design (docs/kernels.md, "GLA"): batch rows and packed sequences are one thing here, sequences of a
flattened [B * T] token axis with bounds ``cu``; every chunk of ``BT`` = 64 tokens of every sequence
gets a *slot* (slots are numbered sequence by sequence, so slot = first slot of its sequence + chunk).
The slot map is built on the device from the bounds, and the grid size comes from the shapes alone
(``cdiv(B T, BT) + N`` slots bound the chunks of N sequences), so there is no host sync.

Inside a chunk, b is the log-decay summed from the chunk start (fp32, recomputed from g wherever it is
needed, never stored) and b_C its value at the chunk's last token. The per-key scores
``A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)`` (j <= i) and their gradients are matrix products of
factored tiles, ``(q e^(b - r)) (k e^(r - b))^T``, in one of three exact forms chosen per chunk and
key block from the decay itself:

  A. the chunk's decay range (max - min of b over its rows, the largest over the keys) is at most
     ``chunk_range`` nats: one reference r per key at the middle of that range, so every factor lies
     in [e^-64, e^64] and the whole chunk is one ``tl.dot`` (the common case: GLA's gates decay a
     chunk by a few nats);
  B. otherwise 16-row sub-blocks: a pair of blocks I > J is one ``tl.dot`` with both factors taken
     relative to block I's first row (exponents <= 0, whatever the decay); the diagonal 16 x 16 blocks
     are one more ``tl.dot`` with a reference at each block's mid-range, if every block's range is at
     most ``block_range`` nats (15 steps of g >= -8 span at most 120, so that decay stays in form B);
  C. blocks of a larger range take the diagonal column by column with the exponent masked to -inf
     above the diagonal before ``exp``, so a chunk that decays by thousands of nats stays finite.
Entries above the diagonal, where a factored product may be huge, are replaced (never summed), so no
form overflows where the exact value does not. These products take fp32 operands, tf32 for 16-bit
inputs (``_dot_fine``: 8 times finer than bf16, so that the rounding stays below the bf16 inputs' and
outputs'). Forms B and C hold many more registers than A, so they live in a second compilation of each
chunk kernel (``STRONG``): the first launch serves the chunks whose keys all fit form A and flags the
others (per chunk and head, ``strong``); the second serves the flagged ones and returns at once for
the rest. The scalar decay needs none of this: its ``exp(b_i - b_j)`` is a [BT, BT] tile formed
directly.

Forward, two launches (three with a per-key decay):
  1. ``_fwd_chunk``: per chunk, b, b_C, the decayed ``q e^b`` and ``k e^(b_C - b)`` (q's / k's dtype,
     for the chunk walks), A (bf16 for 16-bit inputs: it only ever feeds bf16 ``tl.dot``s) and the
     flags; then again (``STRONG``) for the flagged chunks' A.
  2. ``_fwd_state``: one program per (sequence, head, block of V) walks its chunks with the [K, BV]
     state in fp32 registers: ``o = scale (A v + (q e^b) S)``, ``S <- e^(b_C) S + (k e^(b_C - b))^T v``;
     it stores the state entering each chunk for the backward.
Backward, two launches (per-key decay: three; one more when a key block is narrower than K):
  3. ``_bwd_dstate``: the reverse walk of the state's adjoint, ``dS <- e^(b_C) dS + scale (q e^b)^T do``,
     storing the adjoint leaving each chunk (and d initial_state).
  4. ``_bwd_chunk`` (and its ``STRONG`` twin for the flagged chunks): per chunk and key block,
     everything else: dA = scale do v^T, dv (when the key block covers K; else ``_bwd_dv``), the
     inter- and intra-chunk dq and dk, and dg. With b local to the chunk, ``dL/db_t = q_t dq_t - k_t dk_t``
     and ``dL/db_C = e^(b_C) sum_v S dS' + sum_t k_t dk_t^inter`` (S the state entering the chunk, dS'
     the adjoint leaving it), so ``dg_t = sum_{s >= t in chunk} dL/db_s + dL/db_C``: a reverse
     ``tl.cumsum`` over the chunk's rows in fp32, from the fp32 dq and dk before they are rounded.
     Nothing crosses a chunk (the state's adjoint carries the rest), so packed sequences need no care,
     and dg sums at most 64 terms where a suffix sum over the sequence summed T. dq, dk, dv and dg are
     written in their inputs' dtypes; the scalar decay sums dg over K.
The decode step ``_step_kernel`` reads and writes the state once, in place.

Every ``tl.dot`` accumulates in fp32; 16-bit inputs feed the state and value products bf16 operands
and the score products tf32, fp32 inputs use IEEE fp32 products. K <= 256 and every block dimension
is a power of two >= 16. Launch parameters: ``gla_options``.

Shapes: B batch, T time, H heads, K key width, V value width, N sequences, BT chunk, BC sub-block,
BK / BV key / value blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["gla_triton", "gla_step_triton", "gla_options", "GLAOptions", "MAX_K"]

MAX_K = 256
_BT, _BC = 64, 16
# The largest decay range (nats) a factored product may span: its factors stay within e^(+-64), far
# from fp32's (and bf16's) overflow at e^88.7 and its smallest normal numbers at e^-87.3.
_MAX_RANGE = 128.0
# Triton 3.9's CPU interpreter computes a bf16 x bf16 ``tl.dot`` wrongly (values ~1e10 off); there the
# operands are rounded to bf16 and multiplied in fp32, which is what the tensor cores compute.
_INTERPRETED = tl.constexpr(interpreter_enabled())


@dataclasses.dataclass(frozen=True)
class GLAOptions:
    """Launch parameters of the GLA kernels; build them with ``gla_options`` (which checks them).

    Every value computes the same function (up to rounding); see ``gla_options`` for each field."""

    fwd_bk: int
    fwd_warps: int
    fwd_stages: int
    state_bv: int
    state_warps: int
    state_stages: int
    bwd_bk: int
    bwd_bv: int
    bwd_warps: int
    bwd_stages: int
    dv_bv: int
    dv_warps: int
    strong_warps: int
    chunk_range: float
    block_range: float


_TILES = ("fwd_bk", "state_bv", "bwd_bk", "bwd_bv", "dv_bv")
_WARPS = ("fwd_warps", "state_warps", "bwd_warps", "dv_warps", "strong_warps")
_STAGES = ("fwd_stages", "state_stages", "bwd_stages")
_RANGES = ("chunk_range", "block_range")


def gla_options(K: int, V: int, dtype: torch.dtype = torch.bfloat16, *, scalar: bool = False,
                **overrides) -> GLAOptions:
    """The launch parameters of one ``gla`` (``scalar`` False) / ``simple_gla`` (True) call at key width K,
    value width V and input dtype ``dtype`` (q's; fp32 takes narrower backward key blocks).

    The defaults are the largest tiles that compile for sm_90 without spills at K = V = 128 in bf16
    (Triton 3.9; docs/kernels.md lists the registers), not yet timed on a GPU:
    ``python benchmarks/gla_sweep.py`` times the main variants at (8, 4096, 16, 128) and prints one
    line each. Fields (``overrides`` replace any of them):

    - ``fwd_bk`` (32, scalar decay 128; at most the next power of two >= K): keys per step of
      ``_fwd_chunk``'s loop over K (the score tile is summed over the steps); ``fwd_warps`` (8),
      ``fwd_stages`` (2).
    - ``state_bv`` (32, at most the next power of two >= V): the V block of the chunk walks
      ``_fwd_state`` / ``_bwd_dstate`` (one program per sequence, head and V block holds a
      [K, state_bv] fp32 state); ``state_warps`` (8), ``state_stages`` (2: the next chunk's tiles load
      during this chunk's products).
    - ``bwd_bk`` (64, scalar decay 128; at most the next power of two >= K; fp32 inputs 16): keys per
      ``_bwd_chunk`` program (a grid axis). When it covers K the program also finishes dv (one pass over
      the states' adjoints fewer, but more registers), else ``_bwd_dv`` does (``dv_bv`` 64,
      ``dv_warps`` 4). ``bwd_bv`` (32): the tile of its loop over V; ``bwd_warps`` (8), ``bwd_stages`` (2).
    - ``strong_warps`` (8): warps of the second ``_fwd_chunk`` / ``_bwd_chunk`` launches, which serve
      only the chunks flagged as decaying by more than ``chunk_range`` nats (forms B and C).
    - ``chunk_range`` (128.0): the largest decay range, in nats, over which a chunk's scores are one
      factored product (form A of the module docstring); ``block_range`` (128.0): the same for a
      16-row diagonal block (form B), beyond which it is summed elementwise (form C). Both lie in
      [0, 128]; 0 sends every decaying chunk to the next form (how the tests run each form).

    Tiles are powers of two in [16, 256] (key tiles beyond K are masked), warps one of 1, 2, 4, 8, 16,
    stages 1 .. 8.

    Raises:
        ValueError: an unknown field or a value out of range, naming it.
        TypeError: a value of the wrong type (a bool, a float tile), naming it.
    """
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    wide = dtype == torch.float32  # IEEE fp32 products hold more registers
    # the scalar decay's chunk kernels hold no per-key decay tiles: wider key blocks fit (dv fused at K 128)
    defaults = GLAOptions(fwd_bk=min(BK, 128 if scalar else 32), fwd_warps=8, fwd_stages=2, state_bv=min(BV, 32),
                          state_warps=8, state_stages=2, bwd_bk=16 if wide else min(BK, 128 if scalar else 64),
                          bwd_bv=min(BV, 32), bwd_warps=8,
                          bwd_stages=2, dv_bv=min(BV, 64), dv_warps=4, strong_warps=8, chunk_range=_MAX_RANGE,
                          block_range=_MAX_RANGE)
    names = {f.name for f in dataclasses.fields(GLAOptions)}
    for name, value in overrides.items():
        if name not in names:
            raise ValueError(f"gla_options: unknown option {name!r}; expected one of {sorted(names)}")
        if name in _RANGES:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"gla_options: {name} must be a number, got {value!r}")
            if not 0 <= value <= _MAX_RANGE:
                raise ValueError(f"gla_options: {name} must be in [0, {_MAX_RANGE:g}], got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"gla_options: {name} must be an int, got {value!r}")
        if name in _TILES and not (16 <= value <= 256 and value & (value - 1) == 0):
            raise ValueError(f"gla_options: {name} must be a power of two in [16, 256], got {value}")
        if name in _WARPS and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"gla_options: {name} must be one of 1, 2, 4, 8, 16, got {value}")
        if name in _STAGES and not 1 <= value <= 8:
            raise ValueError(f"gla_options: {name} must be in 1 .. 8, got {value}")
    return dataclasses.replace(defaults, **{n: (float(v) if n in _RANGES else v) for n, v in overrides.items()})


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    # one return statement: the branches are constexpr, resolved when the kernel is compiled
    if LOWP:
        if _INTERPRETED:
            c = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def _dot_fine(a, b, LOWP: tl.constexpr):
    # fp32 operands: tf32 products for 16-bit inputs (a rounding 8 times finer than bf16's), IEEE fp32
    # products otherwise; the interpreter computes tf32 in fp32
    if LOWP:
        c = tl.dot(a, b, input_precision="tf32")
    else:
        c = tl.dot(a, b, input_precision="ieee")
    return c


@triton.jit
def _exp_where(mask, x):
    # exp(x) where mask, else 0, without forming exp of a masked (possibly huge) exponent
    return tl.exp(tl.where(mask, x, float("-inf")))


@triton.jit
def _load_tile(ptr, t, tm, h, H, K, cols, cm):
    # rows t of a [TT, H, K] tensor at head h, in its own dtype [len(t), len(cols)]; masked entries 0
    return tl.load(ptr + (t[:, None] * H + h) * K + cols[None, :], mask=tm[:, None] & cm[None, :], other=0.0)


@triton.jit
def _load_rows(ptr, t, tm, h, H, K, cols, cm):
    # ``_load_tile`` as fp32
    return _load_tile(ptr, t, tm, h, H, K, cols, cm).to(tl.float32)


@triton.jit
def _row(x, sel):
    # the row of tile x [R, C] where the [R] mask ``sel`` holds (exactly one row): [C]
    return tl.sum(tl.where(sel[:, None], x, 0.0), axis=0)


@triton.jit
def _block_refs(b, rt, BT: tl.constexpr, BC: tl.constexpr):
    # Per 16-row block of b [BT, BK]: P = b at the block's first row, M = the middle of the block's range
    # (both spread over the block's rows, [BT, BK]) and the largest block range (a scalar).
    blk = rt // BC
    P = tl.zeros(b.shape, dtype=tl.float32)
    M = tl.zeros(b.shape, dtype=tl.float32)
    widest = tl.full([], 0.0, tl.float32)
    for I in tl.static_range(BT // BC):
        sel = (blk == I)[:, None]
        hi = tl.max(tl.where(sel, b, float("-inf")), axis=0)
        lo = tl.min(tl.where(sel, b, float("inf")), axis=0)
        P = tl.where(sel, _row(b, rt == I * BC)[None, :], P)
        M = tl.where(sel, ((hi + lo) * 0.5)[None, :], M)
        widest = tl.maximum(widest, tl.max(hi - lo, axis=0))
    return P, M, widest


@triton.jit
def _chunk_mid(b):
    # the middle of each key's range over the chunk's rows [1, BK] and the largest range (a scalar)
    hi = tl.max(b, axis=0)
    lo = tl.min(b, axis=0)
    return ((hi + lo) * 0.5)[None, :], tl.max(hi - lo, axis=0)


@triton.jit
def _scores_a(qf, kf, b, mid, LOWP: tl.constexpr):
    # form A of the scores: one product with every key referenced at the middle of its range ``mid``
    e = b - mid
    return _dot_fine(qf * tl.exp(e), tl.trans(kf * tl.exp(-e)), LOWP)


@triton.jit
def _grads_a(qf, kf, b, mid, dA, LOWP: tl.constexpr):
    # form A of the intra-chunk gradients (``_score_grads``): dq, dk [BT, BK]
    e = b - mid
    eq = tl.exp(e)
    ek = tl.exp(-e)
    return eq * _dot_fine(dA, kf * ek, LOWP), ek * _dot_fine(tl.trans(dA), qf * eq, LOWP)


@triton.jit
def _score_tiles(qf, kf, b, rt, BT: tl.constexpr, BC: tl.constexpr, LOWP: tl.constexpr,
                 CHUNK_RANGE: tl.constexpr, BLOCK_RANGE: tl.constexpr):
    # sum_k q_ik k_jk exp(b_ik - b_jk) over one key block, correct for j <= i (entries above the
    # diagonal are arbitrary, possibly inf: the caller replaces them). qf, kf, b [BT, BK] fp32.
    mid, widest = _chunk_mid(b)
    if widest <= CHUNK_RANGE:  # form A: factors within e^(+-CHUNK_RANGE / 2)
        a = _scores_a(qf, kf, b, mid, LOWP)
    else:
        blk = rt // BC
        same = blk[:, None] == blk[None, :]
        P, M, widest_block = _block_refs(b, rt, BT, BC)
        q_off = qf * tl.exp(b - P)  # relative to the row's block's first row: exponents <= 0
        a = tl.zeros([BT, BT], dtype=tl.float32)
        for I in tl.static_range(1, BT // BC):  # block I against the blocks before it
            k_I = kf * _exp_where((rt < I * BC)[:, None], _row(b, rt == I * BC)[None, :] - b)
            a += _dot_fine(tl.where((blk == I)[:, None], q_off, 0.0), tl.trans(k_I), LOWP)
        if widest_block <= BLOCK_RANGE:  # form B: the diagonal blocks factored at their mid-ranges
            e = b - M
            d = _dot_fine(qf * tl.exp(e), tl.trans(kf * tl.exp(-e)), LOWP)
        else:  # form C: column by column, exponents masked before exp
            d = tl.zeros([BT, BT], dtype=tl.float32)
            for j in range(0, BT):
                sel = rt == j
                live = ((rt >= j) & (blk == j // BC))[:, None]
                col = tl.sum(qf * _row(kf, sel)[None, :] * _exp_where(live, b - _row(b, sel)[None, :]), axis=1)
                d = tl.where(rt[None, :] == j, col[:, None], d)
        a = tl.where(same, d, a)
    return a


@triton.jit
def _score_grads(qf, kf, b, dA, rt, BT: tl.constexpr, BC: tl.constexpr, LOWP: tl.constexpr,
                 CHUNK_RANGE: tl.constexpr, BLOCK_RANGE: tl.constexpr):
    # The intra-chunk gradients through the scores of ``_score_tiles``, for dA [BT, BT] zero above the
    # diagonal: dq_i = sum_{j <= i} dA_ij k_j e^(b_i - b_j), dk_j = sum_{i >= j} dA_ij q_i e^(b_i - b_j).
    mid, widest = _chunk_mid(b)
    if widest <= CHUNK_RANGE:  # form A
        dq, dk = _grads_a(qf, kf, b, mid, dA, LOWP)
    else:
        blk = rt // BC
        same = blk[:, None] == blk[None, :]
        P, M, widest_block = _block_refs(b, rt, BT, BC)
        # the first row of the next block (the last block's rows: their own b, unused)
        Pn = b
        for I in tl.static_range(BT // BC - 1):
            Pn = tl.where((blk == I)[:, None], _row(b, rt == (I + 1) * BC)[None, :], Pn)
        acc_q = tl.zeros(qf.shape, dtype=tl.float32)
        acc_k = tl.zeros(kf.shape, dtype=tl.float32)
        for I in tl.static_range(1, BT // BC):
            p_I = _row(b, rt == I * BC)[None, :]
            # rows of block I against keys before it, relative to block I's first row
            k_I = kf * _exp_where((rt < I * BC)[:, None], p_I - b)
            acc_q += _dot_fine(tl.where((blk == I)[:, None], dA, 0.0), k_I, LOWP)
            # keys of block I - 1 against the rows from block I on, relative to block I's first row
            q_I = qf * _exp_where((rt >= I * BC)[:, None], b - p_I)
            acc_k += _dot_fine(tl.where((blk == I - 1)[:, None], tl.trans(dA), 0.0), q_I, LOWP)
        dq = acc_q * tl.exp(b - P)
        dk = acc_k * tl.exp(Pn - b)
        dA_d = tl.where(same, dA, 0.0)
        if widest_block <= BLOCK_RANGE:  # form B
            e = b - M
            eq = tl.exp(e)
            ek = tl.exp(-e)
            dq += eq * _dot_fine(dA_d, kf * ek, LOWP)
            dk += ek * _dot_fine(tl.trans(dA_d), qf * eq, LOWP)
        else:  # form C: column j of each diagonal block feeds dq, its row j feeds dk
            for j in range(0, BT):
                sel = rt == j
                live = ((rt >= j) & (blk == j // BC))[:, None]
                w = tl.sum(tl.where(sel[None, :], dA_d, 0.0), axis=1)[:, None] * _exp_where(
                    live, b - _row(b, sel)[None, :])  # dA_ij e^(b_i - b_j), i in j's block
                dq += w * _row(kf, sel)[None, :]
                dk = tl.where(sel[:, None], dk + tl.sum(w * qf, axis=0)[None, :], dk)
    return dq, dk


@triton.jit
def _fwd_chunk(q, k, g, qg, kg, blast, A, strong, slot_seq, slot_chunk, cu, N, H: tl.constexpr, K: tl.constexpr,
               BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SCALAR: tl.constexpr, LOWP: tl.constexpr,
               STRONG: tl.constexpr, CHUNK_RANGE: tl.constexpr, BLOCK_RANGE: tl.constexpr):
    # One program per (chunk slot, head). STRONG False: b, b_C (blast), q e^b, k e^(b_C - b), the scores A
    # in form A, and (per-key decay) the flag ``strong`` [slots, H] of a chunk some key of which spans
    # more than CHUNK_RANGE nats (its A is left for the second launch). STRONG True: A of the flagged
    # chunks alone, every key block in form A, B or C (``_score_tiles``).
    p, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_seq + p)
    go = n < N
    if STRONG:
        go = go & (tl.load(strong + p * H + h) != 0)
    if go:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        rt = tl.arange(0, BT)
        t = bos + c * BT + rt
        tm = t < eos
        last = rt == tl.minimum(eos - bos - c * BT, BT) - 1  # the chunk's last token
        lower = (rt[:, None] >= rt[None, :]) & tm[:, None]
        if SCALAR:
            bs = tl.cumsum(tl.load(g + t * H + h, mask=tm, other=0.0).to(tl.float32), 0)
            total = tl.sum(tl.where(last, bs, 0.0), 0)
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        widest = tl.full([], 0.0, tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            kk = kb * BK + tl.arange(0, BK)
            km = kk < K
            qf = _load_rows(q, t, tm, h, H, K, kk, km)
            kf = _load_rows(k, t, tm, h, H, K, kk, km)
            if SCALAR:
                acc += _dot(qf, tl.trans(kf), LOWP)
            else:
                b = tl.cumsum(_load_rows(g, t, tm, h, H, K, kk, km), 0)  # padded rows repeat the last b
                if STRONG:
                    acc += _score_tiles(qf, kf, b, rt, BT, BC, LOWP, CHUNK_RANGE, BLOCK_RANGE)
                else:
                    mid, w = _chunk_mid(b)
                    widest = tl.maximum(widest, w)
                    if w <= CHUNK_RANGE:
                        acc += _scores_a(qf, kf, b, mid, LOWP)
            if not STRONG:
                if SCALAR:
                    b = bs[:, None]
                    tot = total + tl.zeros([BK], dtype=tl.float32)
                else:
                    tot = _row(b, last)
                tl.store(blast + (p * H + h) * K + kk, tot, mask=km)
                off = (t[:, None] * H + h) * K + kk[None, :]
                rows = tm[:, None] & km[None, :]
                tl.store(qg + off, (qf * _exp_where(tm[:, None], b)).to(qg.dtype.element_ty), mask=rows)
                tl.store(kg + off, (kf * _exp_where(tm[:, None], tot[None, :] - b)).to(kg.dtype.element_ty),
                         mask=rows)
        if SCALAR:
            acc = acc * _exp_where(lower, bs[:, None] - bs[None, :])
        elif not STRONG:
            tl.store(strong + p * H + h, (widest > CHUNK_RANGE).to(tl.int32))
        acc = tl.where(lower, acc, 0.0)
        tl.store(A + (t[:, None] * H + h) * BT + rt[None, :], acc.to(A.dtype.element_ty), mask=tm[:, None])


@triton.jit
def _fwd_state(qg, kg, v, blast, A, o, h0, ht, states, cu, coff, scale, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
               HAS_HT: tl.constexpr, SAVE: tl.constexpr, LOWP: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
    p0 = tl.load(coff + n)
    kk, vv, rt = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    km, vm = kk < K, vv < V
    s_off = (h * K + kk[:, None]) * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + n * H * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        t = bos + c * BT + rt
        tm = t < eos
        if SAVE:  # the state entering each chunk, for the backward (skipped without gradients)
            tl.store(states + (p0 + c).to(tl.int64) * H * K * V + s_off, S, mask=s_mask)
        q_g = _load_tile(qg, t, tm, h, H, K, kk, km)
        k_g = _load_tile(kg, t, tm, h, H, K, kk, km)
        v_c = _load_tile(v, t, tm, h, H, V, vv, vm)
        a = tl.load(A + (t[:, None] * H + h) * BT + rt[None, :], mask=tm[:, None], other=0.0)
        out = (_dot(a, v_c, LOWP) + _dot(q_g, S, LOWP)) * scale
        tl.store(o + (t[:, None] * H + h) * V + vv[None, :], out.to(o.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])
        decay = tl.exp(tl.load(blast + ((p0 + c) * H + h) * K + kk, mask=km, other=0.0))
        S = S * decay[:, None] + _dot(tl.trans(k_g), v_c, LOWP)
    if HAS_HT:
        tl.store(ht + n * H * K * V + s_off, S, mask=s_mask)


@triton.jit
def _bwd_dstate(qg, blast, do, dht, dh0, dstates, cu, coff, scale, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                HAS_DH0: tl.constexpr, LOWP: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
    p0 = tl.load(coff + n)
    kk, vv, rt = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, BT)
    km, vm = kk < K, vv < V
    s_off = (h * K + kk[:, None]) * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + n * H * K * V + s_off, mask=s_mask, other=0.0).to(tl.float32)
    nc = tl.cdiv(eos - bos, BT)
    for ci in range(0, nc):
        c = nc - 1 - ci
        t = bos + c * BT + rt
        tm = t < eos
        tl.store(dstates + (p0 + c).to(tl.int64) * H * K * V + s_off, dS, mask=s_mask)
        q_g = _load_tile(qg, t, tm, h, H, K, kk, km)
        do_c = _load_tile(do, t, tm, h, H, V, vv, vm)
        decay = tl.exp(tl.load(blast + ((p0 + c) * H + h) * K + kk, mask=km, other=0.0))
        dS = dS * decay[:, None] + _dot(tl.trans(q_g), do_c, LOWP) * scale
    if HAS_DH0:
        tl.store(dh0 + n * H * K * V + s_off, dS, mask=s_mask)


@triton.jit
def _bwd_chunk(q, k, g, kg, A, v, do, states, dstates, blast, strong, dq, dk, dv, dg, slot_seq, slot_chunk, cu, N, TT,
               scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, SCALAR: tl.constexpr, LOWP: tl.constexpr, FUSE_DV: tl.constexpr,
               STRONG: tl.constexpr, CHUNK_RANGE: tl.constexpr, BLOCK_RANGE: tl.constexpr):
    # One program per (chunk slot, key block, head): dA, dv (FUSE_DV), dq, dk and dg of the chunk. With a
    # per-key decay, STRONG False serves the chunks ``_fwd_chunk`` left unflagged (form A), STRONG True
    # the flagged ones (``_score_grads``).
    p, ik, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(slot_seq + p)
    go = n < N
    if not SCALAR:
        if STRONG:
            go = go & (tl.load(strong + p * H + h) != 0)
        else:
            go = go & (tl.load(strong + p * H + h) == 0)
    if go:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        rt = tl.arange(0, BT)
        t = bos + c * BT + rt
        tm = t < eos
        kk = ik * BK + tl.arange(0, BK)
        km = kk < K
        lower = (rt[:, None] >= rt[None, :]) & tm[:, None]
        base = (p * H + h).to(tl.int64) * K * V
        if FUSE_DV:
            a = tl.load(A + (t[:, None] * H + h) * BT + rt[None, :], mask=tm[:, None], other=0.0)
            k_g = _load_tile(kg, t, tm, h, H, K, kk, km)
        acc_q = tl.zeros([BT, BK], dtype=tl.float32)  # do S^T
        acc_k = tl.zeros([BT, BK], dtype=tl.float32)  # v dS'^T
        dA = tl.zeros([BT, BT], dtype=tl.float32)
        sds = tl.zeros([BK], dtype=tl.float32)  # sum_v S dS'
        for iv in range(0, tl.cdiv(V, BV)):
            vv = iv * BV + tl.arange(0, BV)
            vm = vv < V
            s_off = base + kk[:, None] * V + vv[None, :]
            s_mask = km[:, None] & vm[None, :]
            S = tl.load(states + s_off, mask=s_mask, other=0.0)
            dS = tl.load(dstates + s_off, mask=s_mask, other=0.0)
            do_c = _load_tile(do, t, tm, h, H, V, vv, vm)
            v_c = _load_tile(v, t, tm, h, H, V, vv, vm)
            acc_q += _dot(do_c, tl.trans(S), LOWP)
            acc_k += _dot(v_c, tl.trans(dS), LOWP)
            dA += _dot(do_c, tl.trans(v_c), LOWP)
            sds += tl.sum(S * dS, axis=1)
            if FUSE_DV:
                dv_c = _dot(tl.trans(a), do_c, LOWP) * scale + _dot(k_g, dS, LOWP)
                tl.store(dv + (t[:, None] * H + h) * V + vv[None, :], dv_c.to(dv.dtype.element_ty),
                         mask=tm[:, None] & vm[None, :])
        dA = tl.where(lower, dA * scale, 0.0)
        tot = tl.load(blast + (p * H + h) * K + kk, mask=km, other=0.0)
        if SCALAR:
            bs = tl.cumsum(tl.load(g + t * H + h, mask=tm, other=0.0).to(tl.float32), 0)
            b = bs[:, None]
        else:
            b = tl.cumsum(_load_rows(g, t, tm, h, H, K, kk, km), 0)
        off = (t[:, None] * H + h) * K + kk[None, :]
        rows = tm[:, None] & km[None, :]
        kf = _load_rows(k, t, tm, h, H, K, kk, km)
        dk_c = acc_k * _exp_where(tm[:, None], tot[None, :] - b)  # inter-chunk dk
        dblast = tl.exp(tot) * sds + tl.sum(kf * dk_c, axis=0)  # dL/db_C
        dq_c = acc_q * _exp_where(tm[:, None], b) * scale  # inter-chunk dq
        qf = _load_rows(q, t, tm, h, H, K, kk, km)
        if SCALAR:
            w = dA * _exp_where(lower, bs[:, None] - bs[None, :])
            dq_c += _dot(w, kf, LOWP)
            dk_c += _dot(tl.trans(w), qf, LOWP)
        elif STRONG:
            # the i = j terms exactly (fp32), so that they cancel in q dq - k dk as they do exactly
            eye = rt[:, None] == rt[None, :]
            dA_ii = tl.sum(tl.where(eye, dA, 0.0), axis=1)[:, None]
            dq_in, dk_in = _score_grads(qf, kf, b, tl.where(eye, 0.0, dA), rt, BT, BC, LOWP, CHUNK_RANGE, BLOCK_RANGE)
            dq_c += dq_in + dA_ii * kf
            dk_c += dk_in + dA_ii * qf
        else:
            mid, _ = _chunk_mid(b)
            dq_in, dk_in = _grads_a(qf, kf, b, mid, dA, LOWP)
            dq_c += dq_in
            dk_c += dk_in
        tl.store(dq + off, dq_c.to(dq.dtype.element_ty), mask=rows)
        tl.store(dk + off, dk_c.to(dk.dtype.element_ty), mask=rows)
        # dg_t = sum_{s >= t in chunk} (q_s dq_s - k_s dk_s) + dL/db_C (padded rows add zeros)
        dgc = tl.cumsum(qf * dq_c - kf * dk_c, 0, reverse=True) + dblast[None, :]
        if SCALAR:  # summed over this key block; the key blocks' sums are added on the host
            tl.store(dg + (ik * TT + t) * H + h, tl.sum(dgc, axis=1), mask=tm)
        else:
            tl.store(dg + off, dgc.to(dg.dtype.element_ty), mask=rows)


@triton.jit
def _bwd_dv(kg, A, do, dstates, dv, slot_seq, slot_chunk, cu, N, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr):
    # dv = scale A^T do + (k e^(b_C - b)) dS' per (chunk slot, V block, head), when ``_bwd_chunk`` splits K
    p, iv, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(slot_seq + p)
    if n < N:
        c = tl.load(slot_chunk + p)
        bos, eos = tl.load(cu + n), tl.load(cu + n + 1)
        rt = tl.arange(0, BT)
        t = bos + c * BT + rt
        tm = t < eos
        vv = iv * BV + tl.arange(0, BV)
        vm = vv < V
        a = tl.load(A + (t[:, None] * H + h) * BT + rt[None, :], mask=tm[:, None], other=0.0)
        do_c = _load_tile(do, t, tm, h, H, V, vv, vm)
        acc = _dot(tl.trans(a), do_c, LOWP) * scale
        base = (p * H + h).to(tl.int64) * K * V
        for kb in range(0, tl.cdiv(K, BK)):
            kk = kb * BK + tl.arange(0, BK)
            km = kk < K
            dS = tl.load(dstates + base + kk[:, None] * V + vv[None, :], mask=km[:, None] & vm[None, :], other=0.0)
            acc += _dot(_load_tile(kg, t, tm, h, H, K, kk, km), dS, LOWP)
        tl.store(dv + (t[:, None] * H + h) * V + vv[None, :], acc.to(dv.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])


@triton.jit
def _step_kernel(state, q, k, v, g, o, scale, H, K, V, BK: tl.constexpr, BV: tl.constexpr,
                 SCALAR: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    kk, vv = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    km, vm = kk < K, vv < V
    s_ptr = state + bh * K * V + kk[:, None] * V + vv[None, :]
    s_mask = km[:, None] & vm[None, :]
    S = tl.load(s_ptr, mask=s_mask, other=0.0).to(tl.float32)
    q_t = tl.load(q + bh * K + kk, mask=km, other=0.0).to(tl.float32)
    k_t = tl.load(k + bh * K + kk, mask=km, other=0.0).to(tl.float32)
    v_t = tl.load(v + bh * V + vv, mask=vm, other=0.0).to(tl.float32)
    if SCALAR:
        decay = tl.exp(tl.load(g + bh + tl.zeros([1], tl.int32)).to(tl.float32))[:, None]
    else:
        decay = tl.exp(tl.load(g + bh * K + kk, mask=km, other=0.0).to(tl.float32))[:, None]
    S = S * decay + k_t[:, None] * v_t[None, :]
    tl.debug_barrier()  # every thread holding a copy of a state element has read it before it is overwritten
    tl.store(s_ptr, S, mask=s_mask)
    out = tl.sum(q_t[:, None] * S, axis=0) * scale
    tl.store(o + bh * V + vv, out.to(o.dtype.element_ty), mask=vm)


def _plan(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple:
    """Sequence bounds and the chunk-slot map, built on the device (no host sync).

    Returns (cu [N + 1] int32, coff [N + 1] int32 first slot of each sequence, slot_seq, slot_chunk
    [num_slots] int32 (slot_seq = N for unused slots), N, num_slots)."""
    if cu_seqlens is None:
        N = B
        cu = torch.arange(0, B + 1, device=device, dtype=torch.int64) * T
        num_slots = B * triton.cdiv(T, _BT)
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        num_slots = triton.cdiv(T, _BT) + N
    chunks = torch.div(cu[1:] - cu[:-1] + _BT - 1, _BT, rounding_mode="floor")
    coff = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
    num_slots = max(num_slots, 1)  # an empty input still launches one (idle) program
    slots = torch.arange(num_slots, device=device, dtype=torch.int64)
    slot_seq = torch.searchsorted(coff[1:].contiguous(), slots, right=True)
    slot_chunk = slots - coff[slot_seq.clamp(max=N - 1)]
    i32 = torch.int32
    return cu.to(i32), coff.to(i32), slot_seq.to(i32), slot_chunk.to(i32), N, num_slots


class _GLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, output_final_state, cu_seqlens, scalar, opts):
        B, T, H, K = q.shape
        V = v.shape[-1]
        TT = B * T
        dev = q.device
        BK = max(16, triton.next_power_of_2(K))
        lowp = q.dtype in (torch.bfloat16, torch.float16)
        cu, coff, slot_seq, slot_chunk, N, S_n = _plan(B, T, cu_seqlens, dev)
        q2, k2 = q.reshape(TT, H, K).contiguous(), k.reshape(TT, H, K).contiguous()
        v2 = v.reshape(TT, H, V).contiguous()
        g2 = g.reshape((TT, H) if scalar else (TT, H, K)).contiguous()
        f32 = torch.float32
        qg, kg = torch.empty_like(q2), torch.empty_like(k2)
        blast = torch.empty(S_n, H, K, device=dev, dtype=f32)
        # A only ever feeds bf16 products for 16-bit inputs: stored in bf16 there (fp16's range could not hold it)
        A = torch.empty(TT, H, _BT, device=dev, dtype=torch.bfloat16 if lowp else f32)
        # the chunks (per key: and heads) some key of which spans more than chunk_range nats: 1
        strong = blast if scalar else torch.empty(S_n, H, device=dev, dtype=torch.int32)
        for pass_strong in (False, True) if not scalar else (False,):
            _fwd_chunk[(S_n, H)](q2, k2, g2, qg, kg, blast, A, strong, slot_seq, slot_chunk, cu, N, H, K, BT=_BT,
                                 BC=_BC, BK=opts.fwd_bk, SCALAR=scalar, LOWP=lowp, STRONG=pass_strong,
                                 CHUNK_RANGE=opts.chunk_range, BLOCK_RANGE=opts.block_range,
                                 num_warps=opts.strong_warps if pass_strong else opts.fwd_warps,
                                 num_stages=opts.fwd_stages)
        o = torch.empty(TT, H, V, device=dev, dtype=q.dtype)
        save = any(ctx.needs_input_grad[:5])
        ht = torch.empty(N, H, K, V, device=dev, dtype=f32)
        states = torch.empty(S_n, H, K, V, device=dev, dtype=f32) if save else ht
        h0c = None if h0 is None else h0.to(f32).contiguous()
        _fwd_state[(triton.cdiv(V, opts.state_bv), N * H)](
            qg, kg, v2, blast, A, o, h0c if h0c is not None else ht, ht, states, cu, coff, scale, H, K, V, BT=_BT,
            BK=BK, BV=opts.state_bv, HAS_H0=h0 is not None, HAS_HT=True, SAVE=save, LOWP=lowp,
            num_warps=opts.state_warps, num_stages=opts.state_stages)
        ctx.save_for_backward(q2, k2, v2, g2, qg, kg, blast, A, strong, states, cu, coff, slot_seq, slot_chunk)
        ctx.meta = (B, T, H, K, V, N, S_n, scale, scalar, lowp, h0 is not None, g.dtype, v.dtype,
                    None if h0 is None else h0.dtype, opts)
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o.view(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        q2, k2, v2, g2, qg, kg, blast, A, strong, states, cu, coff, slot_seq, slot_chunk = ctx.saved_tensors
        B, T, H, K, V, N, S_n, scale, scalar, lowp, has_h0, g_dtype, v_dtype, h0_dtype, opts = ctx.meta
        TT, dev, f32 = B * T, q2.device, torch.float32
        BK = max(16, triton.next_power_of_2(K))
        do2 = do.reshape(TT, H, V).contiguous()
        dstates = torch.empty(S_n, H, K, V, device=dev, dtype=f32)
        dh0 = torch.empty(N, H, K, V, device=dev, dtype=f32) if has_h0 else None
        dhtc = None if dht is None else dht.to(f32).contiguous()
        _bwd_dstate[(triton.cdiv(V, opts.state_bv), N * H)](
            qg, blast, do2, dhtc if dhtc is not None else dstates, dh0 if dh0 is not None else dstates, dstates, cu,
            coff, scale, H, K, V, BT=_BT, BK=BK, BV=opts.state_bv, HAS_DHT=dht is not None, HAS_DH0=has_h0,
            LOWP=lowp, num_warps=opts.state_warps, num_stages=opts.state_stages)
        dq, dk = torch.empty_like(q2), torch.empty_like(k2)
        dv = torch.empty(TT, H, V, device=dev, dtype=v_dtype)
        NK = triton.cdiv(K, opts.bwd_bk)
        # the scalar decay's dg: per key block, summed here (fp32); the per-key dg is written in g's dtype
        dg = torch.empty(NK, TT, H, device=dev, dtype=f32) if scalar else torch.empty_like(g2)
        fuse_dv = NK == 1
        for pass_strong in (False, True) if not scalar else (False,):
            _bwd_chunk[(S_n, NK, H)](q2, k2, g2, kg, A, v2, do2, states, dstates, blast, strong, dq, dk, dv, dg,
                                     slot_seq, slot_chunk, cu, N, TT, scale, H, K, V, BT=_BT, BC=_BC, BK=opts.bwd_bk,
                                     BV=opts.bwd_bv, SCALAR=scalar, LOWP=lowp, FUSE_DV=fuse_dv, STRONG=pass_strong,
                                     CHUNK_RANGE=opts.chunk_range, BLOCK_RANGE=opts.block_range,
                                     num_warps=opts.strong_warps if pass_strong else opts.bwd_warps,
                                     num_stages=opts.bwd_stages)
        if not fuse_dv:
            _bwd_dv[(S_n, triton.cdiv(V, opts.dv_bv), H)](kg, A, do2, dstates, dv, slot_seq, slot_chunk, cu, N, scale,
                                                          H, K, V, BT=_BT, BK=opts.bwd_bk, BV=opts.dv_bv, LOWP=lowp,
                                                          num_warps=opts.dv_warps)
        if scalar:
            dg = (dg[0] if NK == 1 else dg.sum(0)).to(g_dtype)
        shape = (B, T, H)
        return (dq.view(*shape, K), dk.view(*shape, K), dv.view(*shape, V), dg.view(*shape, *([] if scalar else [K])),
                None if dh0 is None else dh0.to(h0_dtype), None, None, None, None, None)


def gla_triton(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None, scalar=False,
               options: GLAOptions | None = None):
    """``gla`` / ``simple_gla`` on the kernels (inputs already checked). Returns (o, final state or None).

    ``options`` (``gla_options``; default: ``gla_options(K, V, q.dtype, scalar=scalar)``) sets the launch
    parameters of this call's forward and backward; the benchmarks pass each variant of their sweeps this
    way."""
    if options is None:
        options = gla_options(q.shape[-1], v.shape[-1], q.dtype, scalar=scalar)
    elif not isinstance(options, GLAOptions):
        raise TypeError(f"gla_triton: options must be a GLAOptions (from gla_options), got {type(options).__name__}")
    o, ht = _GLATriton.apply(q, k, v, g, initial_state, scale, output_final_state, cu_seqlens, scalar, options)
    return o, (ht if output_final_state else None)


def gla_step_triton(state, q, k, v, g, *, scale):
    """One decode token on ``_step_kernel``: ``state`` [B, H, K, V] fp32 updated in place; returns o [B, H, V]."""
    B, H, K, V = state.shape
    BK, BV = max(16, triton.next_power_of_2(K)), max(16, min(32, triton.next_power_of_2(V)))
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    work = state if state.is_contiguous() else state.contiguous()
    _step_kernel[(triton.cdiv(V, BV), B * H)](work, q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                             o, scale, H, K, V, BK=BK, BV=BV, SCALAR=g.dim() == 2)
    if work is not state:
        state.copy_(work)
    return o
