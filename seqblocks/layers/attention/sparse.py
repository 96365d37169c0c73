"""Top-k sparse attention with a lightweight indexer (DeepSeek sparse attention): ``SparseGQA``, "sparse_gqa".

A small indexer scores every (query, key) pair and each query attends, with ordinary softmax attention,
only to the ``sparse_select_k`` visible keys it scores highest (all of them while fewer are visible).
The indexer is DeepSeek-V3.2's "lightning indexer"::

    I[t, s] = sum_j w[t, j] * relu(qI[t, j] . kI[s])        qI = x Wq_I, kI = x Wk_I, w = x Ww_I

with ``indexer_heads`` heads j of width ``indexer_dim``, one key kI per token shared by the heads, scores
in fp32. Visible keys are causal (s <= t), valid (not padding) and allowed by a user mask; selection
happens among them only, so no query can pick a future key. Decoding caches the indexer keys kI beside
the keys and values (``SparseKVCache``), so a step scores exactly the keys the full pass scored.

Two optional branches complete the three-branch design of DeepSeek's sparse attention papers, each a
separate softmax whose output is added to the selection branch's before the output projection:

- compression (``sparse_compress_ratio`` r): the pre-RoPE keys and the values are mean-pooled over
  blocks of r positions (valid positions only) and projected (``compress_k`` / ``compress_v``, square
  maps of the KV width); a query at t sees block j once the block is complete, (j + 1) r - 1 <= t, so no
  query sees a future token through a block;
- sliding window (``window_size`` w): ordinary causal attention on the w latest keys (t - w < s <= t).

The selection is causal, as every branch is: the top-k are picked among keys s <= t only. The field
names ``sparse_select_k`` and ``sparse_compress_ratio`` are the configuration names these designs use.
The top-k choice is piecewise constant, so the LM loss gives the indexer no gradient (DeepSeek-V3.2
trains it with a separate KL loss to the dense attention, which this layer does not compute): its
projections stay at their initialisation unless a caller trains them.

The reference form below materialises the [B, T, T] index scores and a boolean selection mask; it is
O(T^2) in memory (no gather kernel).

Non-finite values follow the causal rule of every attention (``seqblocks.layers.finite``): a NaN / Inf
in token t's query, key, value or indexer key is zeroed and poisons the outputs from t on, whether or
not a later query selects it (selection depends on the data, the rule must not).

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads, K head width, J indexer
heads, E indexer width, S cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import host_sync_unsafe
from seqblocks.layers.attention.cache import KVCache
from seqblocks.layers.attention.common import (
    intersect_valid,
    poisoned_queries,
    rope_positions,
    split_mask,
    token_index,
)
from seqblocks.layers.attention.mha import GQA
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_input,
    check_lengths,
    check_position_ids,
    is_empty,
    lengths_mask,
    to_module_dtype,
)
from seqblocks.layers.finite import nonfinite_tokens, poison, zero_nonfinite
from seqblocks.registry import MIXERS

__all__ = ["SparseGQA", "SparseKVCache", "index_scores", "top_k_mask"]


@dataclasses.dataclass(eq=False)
class SparseKVCache(KVCache):
    """A ``KVCache`` plus the indexer key of every position.

    Attributes:
        index_k (Tensor): [B, S, E] indexer keys (zeroed where non-finite), fp32 whatever the cache dtype.
        raw_k (Tensor | None): [B, Hkv, S, K] the keys before RoPE, which the compression branch pools
            (None without that branch).
    """

    index_k: torch.Tensor = None
    raw_k: torch.Tensor | None = None

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, v_dim: int,
                 index_dim: int, *, raw_keys: bool = False, device=None, dtype=None) -> SparseKVCache:
        cache = super().allocate(batch_size, max_seqlen, num_kv_heads, head_dim, v_dim, device=device, dtype=dtype)
        if raw_keys:
            cache.raw_k = torch.zeros_like(cache.k)
        # fp32 (float64 for float64 models) like the indexer: bf16 keys would change which keys a step picks
        wide = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        cache.index_k = torch.zeros(batch_size, max_seqlen, index_dim, device=device, dtype=wide)
        return cache

    def write_index(self, index: torch.Tensor, index_k: torch.Tensor) -> None:
        """Store indexer keys [B, T, E] at positions ``index`` [B, T]."""
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        self.index_k[b_idx, index] = index_k.to(self.index_k.dtype)

    def write_raw(self, index: torch.Tensor, raw_k: torch.Tensor) -> None:
        """Store pre-RoPE keys [B, Hkv, T, K] at positions ``index`` [B, T]."""
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        self.raw_k[b_idx, :, index] = raw_k.transpose(1, 2).to(self.raw_k.dtype)


def index_scores(index_q: torch.Tensor, index_w: torch.Tensor, index_k: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores I [B, Tq, Tk] = sum_j w[b, t, j] * relu(qI[b, t, j] . kI[b, s]), in fp32
    (float64 for float64 inputs), also under autocast.

    Args:
        index_q (Tensor): [B, Tq, J, E]. index_w (Tensor): [B, Tq, J]. index_k (Tensor): [B, Tk, E].
    """
    wide = torch.promote_types(index_q.dtype, torch.float32)
    with torch.autocast(index_q.device.type, enabled=False):  # autocast would run the einsum's bmm in bf16
        dots = torch.einsum("btje,bse->btjs", index_q.to(wide), index_k.to(wide)).relu()  # [B, Tq, J, Tk]
        return (dots * index_w.to(wide)[..., None]).sum(2)


def pool_blocks(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, ratio: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of keys [B, Hkv, T, K] and values [B, Hkv, T, V] over each complete block of ``ratio``
    positions, counting valid positions only (``valid`` [B, T] bool or None: all). Returns the pooled
    keys [B, Hkv, T // ratio, K], values [B, Hkv, T // ratio, V] and [B, T // ratio] bool, True where a
    block holds at least one valid position. Sums in fp32 (float64 for float64 inputs)."""
    B, Hkv, T, _ = k.shape
    n = T // ratio
    wide = torch.promote_types(k.dtype, torch.float32)
    w = torch.ones(B, T, dtype=wide, device=k.device) if valid is None else valid.to(wide)
    w = w[:, None, : n * ratio, None]  # [B, 1, n r, 1]
    count = w.view(B, 1, n, ratio, 1).sum(3)  # [B, 1, n, 1]
    def mean(x):
        s = (x[:, :, : n * ratio].to(wide) * w).view(B, Hkv, n, ratio, x.shape[-1]).sum(3)
        return (s / count.clamp_min(1)).to(x.dtype)
    return mean(k), mean(v), count[:, 0, :, 0] > 0


def top_k_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """[B, Tq, Tk] bool: for each query, its ``k`` highest-scoring visible keys (every visible key when
    fewer are visible); equal scores go to the later key. ``scores`` [B, Tq, Tk] float, ``visible``
    [B, Tq, Tk] bool.

    The tie rule matters: relu makes exact ties (score 0) common, and a full pass and a decode step
    must pick the same keys although they see different numbers of slots. A stable sort of the
    key-reversed scores orders ties by position, whatever the slot count."""
    Tk = scores.shape[-1]
    k = min(k, Tk)
    masked = scores.masked_fill(~visible, float("-inf")).flip(-1)  # latest key first
    order = masked.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # [B, Tq, k]
    top = Tk - 1 - order
    chosen = torch.zeros_like(visible).scatter_(-1, top, True)
    return chosen & visible  # a query with fewer than k visible keys picked some invisible ones: drop them


@MIXERS.register("sparse_gqa")
class SparseGQA(GQA):
    """Grouped-query attention in which each query attends only to its top-k keys by a lightning indexer.

    Args:
        embed_dim (int): model width D.
        num_heads (int): query heads. Required.
        sparse_select_k (int): keys per query (``BlockConfig.sparse_select_k``). Required.
        indexer_heads (int): indexer heads J. Default: 4.
        indexer_dim (int | None): indexer width E. Default: None (= the attention head width).
        sparse_compress_ratio (int | None): block length r of the compression branch
            (``BlockConfig.sparse_compress_ratio``). Default: None (no compression branch).
        window_size (int | None): width of the sliding-window branch (``BlockConfig.window_size``).
            Default: None (no window branch).
        *args, **kwargs: the other ``MHA`` arguments (``causal`` must stay True).

    Raises:
        ValueError: ``sparse_select_k`` missing or not a positive int; bad indexer sizes, compression
            ratio or window; ``causal=False``; ``attention_type="linear"``.
    """

    # Packed documents (cu_seqlens) run as a padded batch (run_mixer's fallback): the top-k selection
    # then never picks a key of another document.
    inputs = frozenset({"mask", "position_ids", "lengths"})
    # Under context parallelism run_mixer's full-sequence fallback serves it (the forward below is its own,
    # not MHA's): its reference form scores every (query, key) pair anyway, O(T^2) memory.
    context_parallel = None

    def __init__(self, embed_dim: int, num_heads: int | None = None, *args: Any, sparse_select_k: int | None = None,
                 indexer_heads: int = 4, indexer_dim: int | None = None,
                 sparse_compress_ratio: int | None = None, window_size: int | None = None,
                 device=None, dtype=None, **kwargs: Any) -> None:
        k = sparse_select_k
        if k is None:
            raise ValueError("SparseGQA needs sparse_select_k (BlockConfig.sparse_select_k or sparse_select_k=...)")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"SparseGQA: sparse_select_k={k!r} must be a positive int")
        for name, value in (("indexer_heads", indexer_heads), ("indexer_dim", indexer_dim),
                            ("sparse_compress_ratio", sparse_compress_ratio), ("window_size", window_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"SparseGQA: {name}={value!r} must be a positive int")
        if kwargs.get("causal", True) is False:
            raise ValueError("SparseGQA is causal; causal=False is not supported")
        super().__init__(embed_dim, num_heads, *args, device=device, dtype=dtype, **kwargs)
        self.sparse_select_k = k
        self.indexer_heads = indexer_heads
        self.indexer_dim = indexer_dim if indexer_dim is not None else self.head_dim
        factory = {"device": device, "dtype": dtype}
        J, E = self.indexer_heads, self.indexer_dim
        self.indexer_q = nn.Linear(embed_dim, J * E, bias=False, **factory)
        self.indexer_k = nn.Linear(embed_dim, E, bias=False, **factory)
        self.indexer_w = nn.Linear(embed_dim, J, bias=False, **factory)
        self.window_size = window_size  # the window branch (the parent's own window stays off)
        self.sparse_compress_ratio = sparse_compress_ratio
        if sparse_compress_ratio is not None:
            kv_width = self.num_heads_kv * self.head_dim
            self.compress_k = nn.Linear(kv_width, kv_width, bias=False, **factory)
            self.compress_v = nn.Linear(kv_width, kv_width, bias=False, **factory)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in ("indexer_q", "indexer_k", "indexer_w", "compress_k", "compress_v"):
            if hasattr(self, name):  # MHA.__init__ calls this before the indexer exists
                getattr(self, name).reset_parameters()

    #: the indexer keys are not paged: a serving engine gives this layer a per-slot ``SparseKVCache``
    allocate_paged_cache = None

    @classmethod
    def _config_overrides(cls, config) -> dict[str, Any]:
        return {"sparse_select_k": config.sparse_select_k, "sparse_compress_ratio": config.sparse_compress_ratio}

    @classmethod
    def _linear_alias(cls, args: tuple, kwargs: dict[str, Any]):
        raise ValueError("SparseGQA: attention_type='linear' has no scores to select keys by; use "
                         "LinearAttention ('linear_attention')")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sparse_select_k={self.sparse_select_k}, "
                f"indexer_heads={self.indexer_heads}, indexer_dim={self.indexer_dim}, "
                f"sparse_compress_ratio={self.sparse_compress_ratio}")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> SparseKVCache:
        """A ``SparseKVCache`` of ``max_seqlen`` positions (keys, values and indexer keys)."""
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        K = self.head_dim
        return SparseKVCache.allocate(batch_size, max_seqlen, self.num_heads_kv, K, K, self.indexer_dim,
                                      raw_keys=self.sparse_compress_ratio is not None, device=device, dtype=dtype)

    def indexer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qI [B, T, J, E], w [B, T, J], kI [B, T, E]) of the input x [B, T, D], in fp32 (float64 for a
        float64 input) whatever the model dtype or autocast: the selection is discrete, and a bf16 score
        would flip near-ties between a bf16 and an fp32 run. w carries the J^-1/2 E^-1/2 scale of
        DeepSeek-V3.2 (it does not change the ranking)."""
        B, T, _ = x.shape
        J, E = self.indexer_heads, self.indexer_dim
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xw = x.to(wide)
            q = F.linear(xw, self.indexer_q.weight.to(wide)).view(B, T, J, E)
            w = F.linear(xw, self.indexer_w.weight.to(wide)) * (J * E) ** -0.5
            k = F.linear(xw, self.indexer_k.weight.to(wide))
        return q, w, k

    def forward(self, x: torch.Tensor, cache: SparseKVCache | None = None, *, mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D] (cache, mask, position_ids, lengths as in ``MHA``; a full mask must
        have one head, and with a cache only a [B, T] key-padding mask is accepted)."""
        owner = type(self).__name__
        check_input(owner, x, self.embed_dim, device=self.in_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.in_proj.weight.dtype)
        B, T, _ = x.shape
        check_lengths(owner, lengths, B, T)
        check_position_ids(owner, position_ids, B, T)
        if cache is not None:
            check_cache(owner, cache, SparseKVCache, B, x.device)
        if is_empty(x):
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = self.in_proj(x).split((H * K, Hkv * K, Hkv * K), dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        raw_k = k  # the compression branch pools keys before RoPE
        index = token_index(cache, T, x.device)  # [1 or B, T]
        rotary = self.rotary
        if rotary is not None:
            rope_pos = rope_positions(position_ids, index)
            q, k = rotary.rotate_qk(q, k, rope_pos)
        iq, iw, ik = self.indexer(x)
        bad_q, bad_kv = nonfinite_tokens(q, iq, iw), nonfinite_tokens(k, v, ik)  # [B, T]
        q, k, v, raw_k = zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v), zero_nonfinite(raw_k)
        iq, iw, ik = zero_nonfinite(iq), zero_nonfinite(iw), zero_nonfinite(ik)
        q, k, v, raw_k = (z.transpose(1, 2) for z in (q, k, v, raw_k))  # [B, H(kv), T, K]
        key_valid, attn_mask = split_mask(owner, mask, B, T, T)
        length_valid = lengths_mask(lengths, T, x.device)
        key_valid = intersect_valid(key_valid, length_valid)
        bad_key = bad_kv if key_valid is None else bad_kv & key_valid
        if cache is None:
            out = self._attend_full(q, k, v, iq, iw, ik, key_valid, attn_mask)
            visible = self._visible_full(B, T, key_valid, attn_mask)
            q_pos = torch.arange(T, device=x.device).expand(B, T)
            out = out + self._branches(q, raw_k, k, v, key_valid, visible, q_pos)
            poisoned, _ = poisoned_queries(bad_key, index, causal=True, window=None)
        else:
            if attn_mask is not None:
                raise ValueError(f"{owner}: with a cache, mask must be a [B, T] key-padding mask (full masks "
                                 f"cannot be remembered for later steps)")
            poisoned, last = poisoned_queries(bad_key, index, causal=True, window=None, prior=cache.nonfinite_last)
            out = self._attend_cached(q, k, v, iq, iw, ik, raw_k, key_valid, index, cache, lengths)
            cache.nonfinite_last.copy_(last[:, -1])
        y = self.out_proj(out.transpose(1, 2).reshape(B, T, H * out.shape[-1]))
        y = poison(y, poisoned | bad_q)
        if length_valid is not None:
            y = y.masked_fill(~length_valid[..., None], 0.0)
        return y.to(in_dtype)

    def _visible_full(self, B: int, T: int, key_valid, attn_mask) -> torch.Tensor:
        """[B, Tq, Tk] bool: the keys each query may see in a full pass (causal, valid, allowed by the mask)."""
        pos = torch.arange(T, device=key_valid.device if key_valid is not None else self.in_proj.weight.device)
        visible = (pos[:, None] >= pos[None, :]).expand(B, T, T)  # causal [B, Tq, Tk]
        if key_valid is not None:
            visible = visible & key_valid[:, None, :]
        if attn_mask is not None:
            if attn_mask.shape[1] != 1:
                raise ValueError(f"{type(self).__name__}: a full mask must have one head ([B, 1, Tq, Tk]) so the "
                                 f"indexer selects among the keys it allows; got {tuple(attn_mask.shape)}")
            allowed = attn_mask[:, 0] if attn_mask.dtype == torch.bool else attn_mask[:, 0] > float("-inf")
            visible = visible & allowed
        return visible

    def _attend_full(self, q, k, v, iq, iw, ik, key_valid, attn_mask) -> torch.Tensor:
        B, T = q.shape[0], q.shape[2]
        visible = self._visible_full(B, T, key_valid, attn_mask)
        chosen = top_k_mask(index_scores(iq, iw, ik), visible, self.sparse_select_k)[:, None]  # [B, 1, Tq, Tk]
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            chosen = attn_mask.masked_fill(~chosen, float("-inf"))  # keep the additive values on the chosen keys
        return self.attend(q, k, v, causal=True, window=None, q_pos=None, kv_pos=None, key_valid=key_valid,
                           attn_mask=chosen)

    def _branches(self, q, raw_k, k, v, key_valid, visible, q_pos) -> torch.Tensor:
        """The compression and window branches' outputs [B, H, Tq, V], summed (0 when neither is on).

        q [B, H, Tq, K]; raw_k (pre-RoPE), k, v [B, Hkv, Tk, K] (every position 0..Tk-1 of the sequence);
        key_valid [B, Tk] bool or None; visible [B, Tq, Tk] the keys each query may see; q_pos [B, Tq]."""
        out = torch.zeros_like(q)
        B, Hkv, Tk, K = k.shape
        if self.window_size is not None:
            slots = torch.arange(Tk, device=q.device)
            near = slots[None, None, :] > q_pos[:, :, None] - self.window_size
            out = out + self.attend(q, k, v, causal=False, window=None, q_pos=q_pos, kv_pos=None,
                                    key_valid=None, attn_mask=(visible & near)[:, None])
        r = self.sparse_compress_ratio
        if r is not None and Tk >= r:
            pk, pv, has_valid = pool_blocks(raw_k, v, key_valid, r)
            n = pk.shape[2]
            flat = lambda x: x.transpose(1, 2).reshape(B, n, Hkv * K)  # noqa: E731
            ck = self.compress_k(flat(pk)).view(B, n, Hkv, K).transpose(1, 2)
            cv = self.compress_v(flat(pv)).view(B, n, Hkv, K).transpose(1, 2)
            block_end = torch.arange(n, device=q.device) * r + r - 1  # [n]
            # a block is seen once complete, and only by a query that may see every valid position in it
            # (a block that straddles two packed documents is seen by neither)
            valid = key_valid if key_valid is not None else torch.ones(B, Tk, dtype=torch.bool, device=q.device)
            every = (visible | ~valid[:, None, :])[:, :, : n * r].reshape(B, visible.shape[1], n, r).all(-1)
            ready = (block_end[None, None, :] <= q_pos[:, :, None]) & every & has_valid[:, None, :]
            out = out + self.attend(q, ck.to(q.dtype), cv.to(q.dtype), causal=False, window=None, q_pos=q_pos,
                                    kv_pos=block_end, key_valid=None, attn_mask=ready[:, None])
        return out

    def _attend_cached(self, q, k, v, iq, iw, ik, raw_k, key_valid, index, cache: SparseKVCache,
                       lengths) -> torch.Tensor:
        B, T = q.shape[0], q.shape[2]
        new_valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        S = cache.k.shape[2]
        if not host_sync_unsafe():
            cache.check_capacity(T, type(self).__name__)
            S = int(cache.seqlen_offset.max()) + T  # only the slots in use (the others are invalid anyway)
        cache.write(index, k, v, new_valid)
        cache.write_index(index, ik)
        if cache.raw_k is not None:
            cache.write_raw(index, raw_k)
        slots = torch.arange(S, device=q.device)
        visible = (slots[None, None, :] <= index[:, :, None]) & cache.key_valid[:, None, :S]  # [B, T, S]
        chosen = top_k_mask(index_scores(iq, iw, cache.index_k[:, :S]), visible, self.sparse_select_k)
        out = self.attend(q, cache.k[:, :, :S].to(q.dtype), cache.v[:, :, :S].to(q.dtype), causal=True, window=None,
                          q_pos=index, kv_pos=None, key_valid=cache.key_valid[:, :S], attn_mask=chosen[:, None])
        if self.window_size is not None or self.sparse_compress_ratio is not None:
            raw = cache.raw_k[:, :, :S].to(q.dtype) if cache.raw_k is not None else None
            out = out + self._branches(q, raw, cache.k[:, :, :S].to(q.dtype), cache.v[:, :, :S].to(q.dtype),
                                       cache.key_valid[:, :S], visible, index.expand(B, T))
        consumed = torch.full_like(cache.seqlen_offset, T) if lengths is None else lengths.to(cache.seqlen_offset)
        cache.advance(consumed)
        return out
