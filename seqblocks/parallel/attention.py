"""Softmax attention with the sequence split along time over a context-parallel group.

Every rank holds the queries, keys and values of its own chunk of ``T_local`` tokens (rank ``r``: tokens
``[r * T_local, (r + 1) * T_local)``, ``seqblocks.parallel.context``) and computes the outputs of its
own queries against the keys of the whole sequence. The attention function is exactly that of
``seqblocks.ops.attention.attention`` at GLOBAL positions: causal and window masks, ALiBi and every
``score_mod`` / ``mask_mod`` see a query at ``r * T_local + i`` and a key at ``s * T_local + j``, as the
same tokens would be seen by one process holding the whole sequence. Two ways to get there:

- ``allgather_attention``: the keys and values of every rank are gathered (differentiable,
  ``gather_time``) and the local queries attend to all of them through ``ops.attention.attention`` with
  their positions offset by ``r * T_local``. Memory O(T) per rank for K / V (and their gradients); any
  backend serves it (SDPA / flex on CUDA). The short-context path.
- ``ring_attention``: one block of keys and values at a time. At step ``d`` every rank sends its own
  block to the rank ``d`` places after it (around the ring, mod the world size) and receives the block
  of the rank ``d`` places before it, so rank ``r`` sees the blocks ``r, r - 1, ..., r - D``; each block
  is folded into a running online softmax (maximum, normaliser, unnormalised output), so the result is
  merged by log-sum-exp exactly as one long softmax. Causal attention needs no block from a later rank:
  those steps exchange nothing for the ranks that would receive them, and with a sliding window only
  the ``D = ceil((window - 1) / T_local)`` nearest earlier blocks are visited at all. Inside a block the keys
  are taken in sub-blocks of ``block_size``; a sub-block entirely in every query's future or before
  every query's window is skipped. The backward pass (``_RingAttention.backward``) walks the same
  blocks again, recomputes each block's probabilities from the saved global log-sum-exp (the flash
  recipe), accumulates the query gradient locally and sends each block's key / value gradient back to
  the rank that owns the block. Saved per rank: q, k, v, the output and the log-sum-exp; memory
  O(T_local) whatever the world size.

Communication uses only point-to-point sends and receives (``torch.distributed.batch_isend_irecv``) and
all-gathers, which gloo (CPU) and NCCL (CUDA) both provide. The per-block math is the fp32 (float64
for float64 inputs) blockwise attention of ``ops/attention/memory_efficient.py``: the scores of
``ops.attention._common.block_scores`` (the spec's rules), a running maximum and normaliser, dropout
masks regenerated in the backward from one seed per call and rank.

``ContextParallel.attention`` ("ring" by default, or "allgather"; ``context_parallel(group,
attention=...)``) is the choice the attention layers follow.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tl local tokens (T_local), T = Tl * W
tokens in all, W ranks, K key width, V value width, C key sub-block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from seqblocks.ops._backend import autocast_off
from seqblocks.ops.attention import attention
from seqblocks.ops.attention._common import AttentionArgs, acc_dtype, block_scores, grouped, make_args
from seqblocks.parallel.context import ContextParallel, current_context_parallel, gather_time

__all__ = ["ring_attention", "allgather_attention", "context_parallel_attention", "global_positions",
           "gather_token_masks", "previous_tokens", "ring_steps"]


def _active(cp: ContextParallel | None) -> ContextParallel | None:
    cp = cp if cp is not None else current_context_parallel()
    return cp if cp is not None and cp.world_size > 1 else None


def global_positions(local_len: int, device=None, cp: ContextParallel | None = None) -> torch.Tensor:
    """[T_local] int64 positions of this rank's tokens in the whole sequence (``arange`` outside a group)."""
    cp = _active(cp)
    start = 0 if cp is None else cp.offset(local_len)
    return torch.arange(start, start + local_len, device=device)


def gather_token_masks(*masks: torch.Tensor | None,
                       cp: ContextParallel | None = None) -> tuple[torch.Tensor | None, ...]:
    """The whole sequence's [B, T] bool masks from every rank's [B, T_local] chunks, in one all-gather
    (None stays None; every rank must pass None in the same places). Not differentiable."""
    cp = _active(cp)
    if cp is None or all(m is None for m in masks):
        return masks
    given = [m for m in masks if m is not None]
    packed = torch.zeros(given[0].shape, dtype=torch.uint8, device=given[0].device)
    for bit, m in enumerate(given):
        packed |= m.to(torch.uint8) << bit
    full = gather_time(packed, dim=1, cp=cp)
    out, bit = [], 0
    for m in masks:
        if m is None:
            out.append(None)
        else:
            out.append(((full >> bit) & 1).to(torch.bool))
            bit += 1
    return tuple(out)


def previous_tokens(x: torch.Tensor, n: int, cp: ContextParallel | None = None) -> torch.Tensor:
    """The ``n`` tokens [B, n, C] just before this rank's chunk ``x`` [B, T_local, C] in the whole
    sequence (zeros before its start), differentiable: the halo a causal convolution of width n + 1
    needs. Rank 0 gets zeros; outside a group, zeros."""
    B, Tl, C = x.shape
    cp = _active(cp)
    zeros = x.new_zeros(B, n, C)
    if cp is None or n == 0:
        return zeros
    tail = gather_time(x[:, max(Tl - n, 0):], dim=1, cp=cp)  # every rank's last min(n, Tl) tokens
    before = tail[:, : cp.rank * min(n, Tl)]
    return torch.cat((zeros, before), dim=1)[:, -n:]


def ring_steps(rank: int, world_size: int, local_len: int, causal: bool, window: int | None) -> int:
    """D, the last ring step ``ring_attention`` takes: rank ``r`` visits the blocks of ranks
    ``r - d`` (mod W) for d = 0..D. Causal with a window: only the blocks a window of ``window``
    reaches back into."""
    if not causal or window is None:
        return world_size - 1
    return min(world_size - 1, (local_len + window - 2) // local_len)


@dataclasses.dataclass
class _RingSpec:
    """One ring-attention call: the group, the rules of the scores, and the whole sequence's key mask."""

    cp: ContextParallel
    causal: bool
    window: int | None
    scale: float | None
    key_valid: torch.Tensor | None  # [B, T] bool over the whole sequence
    score_mod: Callable | None
    mask_mod: Callable | None
    alibi_slopes: torch.Tensor | None
    dropout_p: float
    seed: int | None
    block_size: int

    def steps(self, local_len: int) -> int:
        return ring_steps(self.cp.rank, self.cp.world_size, local_len, self.causal, self.window)

    def uses(self, rank: int, d: int) -> bool:
        """Whether ``rank`` attends to the block of rank ``rank - d`` (a causal rank never to a later one)."""
        return not self.causal or rank - d >= 0

    def peer(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (P2P ops name global ranks)."""
        group_rank %= self.cp.world_size
        return group_rank if self.cp.group is None else dist.get_global_rank(self.cp.group, group_rank)


def _exchange(spec: _RingSpec, send: torch.Tensor | None, dest: int, recv_like: torch.Tensor | None, src: int,
              tag: int) -> tuple[list, torch.Tensor | None]:
    """Post a send of ``send`` to group rank ``dest`` and a receive (a buffer like ``recv_like``) from
    ``src``; either may be None. Returns (works to wait on, the receive buffer)."""
    ops, recv = [], None
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, spec.peer(dest), spec.cp.group, tag))
    if recv_like is not None:
        recv = torch.empty_like(recv_like)
        ops.append(dist.P2POp(dist.irecv, recv, spec.peer(src), spec.cp.group, tag))
    return (dist.batch_isend_irecv(ops) if ops else []), recv


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _kv_exchange(spec: _RingSpec, own: torch.Tensor, d: int) -> tuple[list, torch.Tensor | None]:
    """Step ``d`` of the ring: send this rank's [k | v] block to rank r + d if that rank uses it, receive
    rank r - d's if this rank uses it."""
    r, W = spec.cp.rank, spec.cp.world_size
    send = own if not spec.causal or r + d < W else None  # a causal rank r + d >= W would wrap to an earlier one
    recv_like = own if spec.uses(r, d) else None
    return _exchange(spec, send, r + d, recv_like, r - d, tag=2 * d)


def _skipped(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, window: int | None) -> bool:
    """Whether keys at positions [k_lo, k_hi] are hidden from every query in [q_lo, q_hi]."""
    if causal and k_lo > q_hi:
        return True  # the whole key range lies in every query's future
    return window is not None and q_lo - k_hi >= window  # ... or before every query's window


def _block_args(spec: _RingSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src: int) -> AttentionArgs:
    """The checked request of this rank's queries against the block of rank ``src`` (global positions)."""
    Tl = q.shape[2]
    q_pos = torch.arange(spec.cp.rank * Tl, (spec.cp.rank + 1) * Tl, device=q.device)
    k_pos = torch.arange(src * Tl, (src + 1) * Tl, device=q.device)
    valid = None if spec.key_valid is None else spec.key_valid[:, src * Tl:(src + 1) * Tl]
    return make_args(q, k, v, scale=spec.scale, causal=spec.causal, window=spec.window, q_positions=q_pos,
                     kv_positions=k_pos, key_valid=valid, attn_mask=None, score_mod=spec.score_mod,
                     mask_mod=spec.mask_mod, alibi_slopes=spec.alibi_slopes, dropout_p=spec.dropout_p)


def _sub_blocks(spec: _RingSpec, Tl: int, src: int) -> list[tuple[int, int]]:
    """The key sub-blocks (start, stop) of rank ``src``'s block that some local query may see."""
    q_lo, q_hi = spec.cp.rank * Tl, spec.cp.rank * Tl + Tl - 1
    out = []
    for start in range(0, Tl, spec.block_size):
        stop = min(start + spec.block_size, Tl)
        if not _skipped(q_lo, q_hi, src * Tl + start, src * Tl + stop - 1, spec.causal, spec.window):
            out.append((start, stop))
    return out


def _generator(spec: _RingSpec, device) -> torch.Generator | None:
    if spec.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(spec.seed)
    return g


def _dropout_keep(shape, p: float, gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor | None:
    if gen is None:
        return None
    return (torch.rand(shape, generator=gen, device=like.device) >= p).to(like.dtype) / (1.0 - p)


class _RingAttention(torch.autograd.Function):
    """Ring attention of the local queries over every rank's keys and values (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _RingSpec) -> torch.Tensor:
        B, H, Tl, K = q.shape
        Hkv, V = k.shape[1], v.shape[-1]
        G = H // Hkv
        dt = acc_dtype(q)
        r = spec.cp.rank
        own = torch.cat((k, v.to(k.dtype)), dim=-1).contiguous()  # [B, Hkv, Tl, K + V]: one message per block
        qf = grouped(q.to(dt), G)
        m = torch.full((B, H, Tl), float("-inf"), device=q.device, dtype=dt)
        l = torch.zeros(B, H, Tl, device=q.device, dtype=dt)
        acc = torch.zeros(B, H, Tl, V, device=q.device, dtype=dt)
        gen = _generator(spec, q.device)
        D = spec.steps(Tl)
        pending = None
        for d in range(D + 1):
            current = pending
            pending = _kv_exchange(spec, own, d + 1) if d < D else None  # the next block travels meanwhile
            block = own
            if d > 0:
                _wait(current[0])
                block = current[1]
            if block is None or not spec.uses(r, d):
                continue
            src = (r - d) % spec.cp.world_size
            kb, vb = block[..., :K], block[..., K:].to(v.dtype)
            a = _block_args(spec, q, kb, vb, src)
            for start, stop in _sub_blocks(spec, Tl, src):
                s = block_scores(a, qf, kb[:, :, None, start:stop].to(dt), start, stop)  # [B, H, Tl, C]
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l = l * alpha + p.sum(dim=-1)
                keep = _dropout_keep(p.shape, spec.dropout_p, gen, p)
                if keep is not None:
                    p = p * keep
                pv = torch.matmul(p.view(B, Hkv, G, Tl, stop - start), vb[:, :, None, start:stop].to(dt))
                acc = acc * alpha[..., None] + pv.reshape(B, H, Tl, V)
                m = m_new
        empty = l == 0
        out = acc / l.masked_fill(empty, 1.0)[..., None]
        lse = torch.where(empty, float("-inf"), m + torch.log(l.masked_fill(empty, 1.0)))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        with autocast_off(dout.device):
            return _RingAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        B, H, Tl, K = q.shape
        Hkv, V = k.shape[1], v.shape[-1]
        G = H // Hkv
        dt = acc_dtype(q)
        r, W = spec.cp.rank, spec.cp.world_size
        do = dout.to(dt)
        Dsum = (do * out).sum(dim=-1)  # [B, H, Tl]: rowsum(dP * P), by the softmax Jacobian
        lse_safe = lse.masked_fill(torch.isinf(lse), 0.0)
        do_g = do.view(B, Hkv, G, Tl, V)
        own = torch.cat((k, v.to(k.dtype)), dim=-1).contiguous()
        dq = torch.zeros(B, H, Tl, K, device=q.device, dtype=dt)
        d_own = torch.zeros(B, Hkv, Tl, K + V, device=q.device, dtype=dt)  # [dk | dv] of this rank's block
        gen = _generator(spec, q.device)
        D = spec.steps(Tl)
        pending = None
        returns: list = []  # (works, receive buffer, send buffer) of the key / value gradients on their way back
        for d in range(D + 1):
            current = pending
            pending = _kv_exchange(spec, own, d + 1) if d < D else None
            block = own
            if d > 0:
                _wait(current[0])
                block = current[1]
            grad = None
            if block is not None and spec.uses(r, d):
                grad = _block_backward(spec, q, block, K, v.dtype, (r - d) % W, do_g, Dsum, lse_safe, gen, dq)
            if d == 0:
                if grad is not None:
                    d_own += grad
                continue
            # The block's gradient goes back to the rank that owns it (r - d); this rank's own block comes
            # back from the rank r + d that used it at this step.
            receives = not spec.causal or r + d < W
            works, recv = _exchange(spec, grad, r - d, d_own if receives else None, r + d, tag=2 * d + 1)
            returns.append((works, recv, grad))
            if len(returns) > 1:  # at most two blocks of gradients in flight
                works, recv, _ = returns.pop(0)
                _wait(works)
                if recv is not None:
                    d_own += recv
        for works, recv, _ in returns:
            _wait(works)
            if recv is not None:
                d_own += recv
        dk, dv = d_own[..., :K], d_own[..., K:]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _block_backward(spec: _RingSpec, q: torch.Tensor, block: torch.Tensor, K: int, v_dtype: torch.dtype, src: int,
                    do_g: torch.Tensor, Dsum: torch.Tensor, lse_safe: torch.Tensor, gen: torch.Generator | None,
                    dq: torch.Tensor) -> torch.Tensor:
    """Add the local queries' gradient against rank ``src``'s block to ``dq`` and return that block's
    [dk | dv] [B, Hkv, Tl, K + V] (fp32; float64 for float64 inputs)."""
    B, H, Tl, _ = q.shape
    Hkv = block.shape[1]
    G = H // Hkv
    V = block.shape[-1] - K
    dt = dq.dtype
    kb, vb = block[..., :K], block[..., K:].to(v_dtype)
    a = _block_args(spec, q, kb, vb, src)
    grad = torch.zeros(B, Hkv, Tl, K + V, device=q.device, dtype=dt)
    for start, stop in _sub_blocks(spec, Tl, src):
        C = stop - start
        with torch.enable_grad():
            qd = q.detach().to(dt).requires_grad_()
            kd = kb[:, :, start:stop].detach().to(dt).requires_grad_()
            s = block_scores(a, grouped(qd, G), kd[:, :, None], start, stop)
        p = torch.exp(s.detach() - lse_safe[..., None])  # [B, H, Tl, C]
        keep = _dropout_keep(p.shape, spec.dropout_p, gen, p)
        pd = p if keep is None else p * keep
        vs = vb[:, :, None, start:stop].to(dt)  # [B, Hkv, 1, C, V]
        grad[:, :, start:stop, K:] = torch.matmul(pd.view(B, Hkv, G, Tl, C).transpose(-1, -2), do_g).sum(dim=2)
        dp = torch.matmul(do_g, vs.transpose(-1, -2)).reshape(B, H, Tl, C)
        if keep is not None:
            dp = dp * keep
        ds = p * (dp - Dsum[..., None])
        gq, gk = torch.autograd.grad(s, (qd, kd), ds, allow_unused=True)
        if gq is not None:
            dq += gq
        if gk is not None:
            grad[:, :, start:stop, :K] = gk
    return grad


def _check_local(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {label} must be a 4-D tensor [B, H, T_local, K], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{name}: q and k must hold the same {q.shape[2]} local tokens (this rank's chunk), "
                         f"got {k.shape[2]} keys")


def _global_key_valid(name: str, key_valid: torch.Tensor | None, B: int, Tl: int,
                      cp: ContextParallel) -> torch.Tensor | None:
    """[B, T] of the whole sequence from this rank's [B, T_local] chunk (gathered) or the whole [B, T]."""
    if key_valid is None:
        return None
    T = Tl * cp.world_size
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool or key_valid.dim() != 2 \
            or key_valid.shape[0] != B or key_valid.shape[1] not in (Tl, T):
        raise ValueError(f"{name}: key_valid must be a bool [B, T_local] = [{B}, {Tl}] chunk or the whole "
                         f"[B, T] = [{B}, {T}], got {getattr(key_valid, 'dtype', type(key_valid).__name__)} "
                         f"{tuple(getattr(key_valid, 'shape', ()))}")
    if key_valid.shape[1] == T:
        return key_valid
    return gather_token_masks(key_valid, cp=cp)[0]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, window: int | None = None,
                   scale: float | None = None, key_valid: torch.Tensor | None = None,
                   score_mod: Callable | None = None, mask_mod: Callable | None = None,
                   alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0, block_size: int = 128,
                   cp: ContextParallel | None = None) -> torch.Tensor:
    """Ring attention of this rank's queries over the whole sequence's keys and values.

    Args:
        q (Tensor): [B, H, T_local, K] this rank's queries.
        k (Tensor): [B, Hkv, T_local, K] this rank's keys (H a multiple of Hkv: GQA / MQA).
        v (Tensor): [B, Hkv, T_local, V] this rank's values.
        causal (bool): a query sees keys at global positions <= its own. Default: True.
        window (int | None): sliding window (implies causal): a query at p sees keys in (p - window, p].
            Default: None.
        scale (float | None): score scale. Default: None (K ** -0.5).
        key_valid (Tensor | None): bool, False for padding keys: this rank's [B, T_local] chunk or the
            whole sequence's [B, T]. Default: None.
        score_mod (Callable | None): ``(score, b, h, q_idx, kv_idx) -> score`` at global positions.
            Default: None.
        mask_mod (Callable | None): ``(b, h, q_idx, kv_idx) -> bool`` at global positions. Default: None.
        alibi_slopes (Tensor | None): [H] ALiBi slopes (global distances). Default: None.
        dropout_p (float): dropout of the attention probabilities (pass 0 in eval). Default: 0.0.
        block_size (int): keys per sub-block inside a rank's block. Default: 128.
        cp (ContextParallel | None): the group. Default: None (``current_context_parallel()``).

    Returns:
        Tensor: [B, H, T_local, V] in q's dtype: the local rows of the whole sequence's attention
        (``ops.attention.attention`` over all T tokens); outside a group (or a group of one), that
        attention itself.

    Raises:
        ValueError / TypeError: as ``ops.attention.attention``; chunks of different lengths.

    Gradients reach q, k and v (through score_mod too); tensors a score_mod captures are constants here,
    as in the ``memory_efficient`` backend.
    """
    _check_local("ring_attention", q, k, v)
    if torch.is_autocast_enabled(q.device.type) and all(t.is_floating_point() for t in (q, k, v)):
        dtype = torch.get_autocast_dtype(q.device.type)  # as ops.attention.attention: q, k, v in its dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"ring_attention: block_size={block_size!r} must be a positive int")
    causal = bool(causal) or window is not None
    # The checks of the plain op (shapes, dtypes, window, dropout, masks), on the local operands.
    make_args(q, k, v, scale=scale, causal=causal, window=window, q_positions=None, kv_positions=None,
              key_valid=None, attn_mask=None, score_mod=score_mod, mask_mod=mask_mod, alibi_slopes=alibi_slopes,
              dropout_p=dropout_p)
    group = _active(cp)
    if group is None:  # one process: the same algorithm with a ring of one (no communication)
        group = ContextParallel(group=None, rank=0, world_size=1)
    key_valid = _global_key_valid("ring_attention", key_valid, q.shape[0], q.shape[2], group)
    seed = None
    if dropout_p > 0:
        # One seed per call and rank: the backward regenerates exactly the forward's dropout masks.
        seed = (int(torch.randint(0, 2**62, (1,)).item()) + 7919 * group.rank) % 2**62
    spec = _RingSpec(cp=group, causal=causal, window=window, scale=scale, key_valid=key_valid, score_mod=score_mod,
                     mask_mod=mask_mod, alibi_slopes=alibi_slopes, dropout_p=float(dropout_p), seed=seed,
                     block_size=block_size)
    with autocast_off(q.device):  # the block math accumulates in fp32 whatever autocast would do
        return _RingAttention.apply(q, k, v, spec)


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        window: int | None = None, scale: float | None = None, key_valid: torch.Tensor | None = None,
                        score_mod: Callable | None = None, mask_mod: Callable | None = None,
                        alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0, backend: str = "auto",
                        block_size: int = 128, cp: ContextParallel | None = None) -> torch.Tensor:
    """This rank's queries over the whole sequence's keys and values, gathered on every rank.

    Arguments and result as ``ring_attention``; ``backend`` and ``block_size`` are those of
    ``ops.attention.attention``, which computes the attention of the local queries (at their global
    positions) on the gathered [B, Hkv, T, K] keys and values. Memory O(T) per rank.
    """
    _check_local("allgather_attention", q, k, v)
    group = _active(cp)
    if group is None:
        return attention(q, k, v, causal=causal, window=window, scale=scale, key_valid=key_valid,
                         score_mod=score_mod, mask_mod=mask_mod, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         backend=backend, block_size=block_size)
    key_valid = _global_key_valid("allgather_attention", key_valid, q.shape[0], q.shape[2], group)
    keys, values = gather_time(k, dim=2, cp=group), gather_time(v, dim=2, cp=group)
    return attention(q, keys, values, causal=causal, window=window, scale=scale,
                     q_positions=global_positions(q.shape[2], q.device, group), key_valid=key_valid,
                     score_mod=score_mod, mask_mod=mask_mod, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                     backend=backend, block_size=block_size)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str | None = None,
                               cp: ContextParallel | None = None, **kwargs) -> torch.Tensor:
    """``ring_attention`` or ``allgather_attention`` as ``method`` says (default: the group's
    ``ContextParallel.attention``); ``kwargs`` as theirs (``backend`` only for "allgather").

    Raises:
        ValueError: an unknown method.
    """
    group = _active(cp)
    method = method if method is not None else (group.attention if group is not None else "ring")
    if method == "ring":
        return ring_attention(q, k, v, cp=group, **kwargs)
    if method == "allgather":
        return allgather_attention(q, k, v, cp=group, **kwargs)
    raise ValueError(f"context_parallel_attention: method={method!r} must be 'ring' or 'allgather'")
