"""What the attention mixers share: head sizes, option checks, masks, positions, the softmax core.

``mha.py`` (MHA / GQA / MQA / sliding window), ``mla.py``, ``cross_attention.py`` and
``linear_attention.py`` build on these names; none of them reaches into another's internals.

- ``resolve_heads``: key/value heads and head width from the constructor arguments.
- ``check_mods``, ``check_position``: a score_mod / mask_mod of the right kind, a rotary or bias
  position module that fits the heads.
- ``make_rotary``, ``rotary_of``: a layer's own RoPE (``rotary_emb_dim``) or a block's rotary module.
- ``token_index``, ``rope_positions``: absolute token indices (cache offset + index in the call) and
  the RoPE angles (``position_ids`` when given, else the token indices).
- ``split_mask``, ``intersect_valid``: a user ``mask`` as (key_valid [B, Tk], full attn_mask), and the
  intersection of two key-validity masks.
- ``AttentionCore``: the base of the softmax-attention mixers: backend options and ``attend``.
- ``poisoned_queries``: which queries a non-finite key poisons (``seqblocks.layers.finite``'s rule:
  zero it before the softmax, poison the queries that may see it, never an earlier one).
- ``AttentionCore.attend_context_parallel`` and ``context_parallel_poisoned``: the same attention and
  rule when the sequence is split along time over a context-parallel group (``seqblocks.parallel``).

Shapes: B batch, T time, H query heads, Hkv key/value heads, K head width, Tq queries, Tk keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.attention.attention_fn import call_attention_fn, check_attention_fn
from seqblocks.layers.attention.score_mods import and_masks, compose, mod_kind, soft_cap
from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixer import Mixer
from seqblocks.layers.norm import RMSNorm
from seqblocks.layers.position import ALiBi, PositionBase, RotaryEmbedding
from seqblocks.ops.attention import ATTENTION_BACKENDS, attention
from seqblocks.parallel.attention import gather_token_masks, global_positions, ring_attention
from seqblocks.parallel.context import ContextParallel, gather_time

#: Other spellings of the softmax backends. "pallas_flash" (a fused flash kernel with the score mod in its
#: inner loop) maps to "auto", our fastest fused path: SDPA's flash kernel on CUDA, FlexAttention there when a
#: score_mod / mask_mod / window is given.
ATTENTION_TYPE_ALIASES = {"pallas_flash": "auto"}

__all__ = ["AttentionCore", "ATTENTION_TYPE_ALIASES",
           "resolve_heads", "check_mods", "check_position", "make_rotary", "rotary_of",
           "token_index", "rope_positions", "split_mask", "intersect_valid", "poisoned_queries", "document_mods",
           "context_parallel_poisoned",
           "make_qk_norm",
           "with_softcap", "split_call_mod"]


def resolve_heads(owner: str, embed_dim: int, num_heads: int | None, num_heads_kv: int | None,
                  head_dim: int | None) -> tuple[int, int, int]:
    """(num_heads, num_heads_kv, head_dim) with the defaults resolved: Hkv = H, K = embed_dim // H.

    Raises:
        ValueError: num_heads missing, sizes not positive, Hkv not dividing H, embed_dim not a multiple
            of H when head_dim is not given.
    """
    if num_heads is None:
        raise ValueError(f"{owner} needs num_heads (e.g. {owner}({embed_dim}, num_heads=8), or "
                         f"attn_cfg / mixer_kwargs={{'num_heads': 8}} in a model)")
    check_positive(owner, embed_dim=embed_dim, num_heads=num_heads)
    num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
    check_positive(owner, num_heads_kv=num_heads_kv)
    if num_heads_kv <= 0 or num_heads % num_heads_kv:
        raise ValueError(f"{owner}: num_heads_kv={num_heads_kv} must be a positive divisor of num_heads={num_heads}")
    if head_dim is None:
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: embed_dim={embed_dim} is not a multiple of num_heads={num_heads}; "
                             f"set head_dim explicitly")
        head_dim = embed_dim // num_heads
    check_positive(owner, head_dim=head_dim)
    return num_heads, num_heads_kv, head_dim


def check_mods(owner: str, score_mod: Callable | None, mask_mod: Callable | None) -> None:
    """``score_mod`` must be a score mod and ``mask_mod`` a mask mod (``TypeError`` otherwise)."""
    if score_mod is not None and mod_kind(score_mod) != "score":
        raise TypeError(f"{owner}: score_mod must take (score, b, h, q_idx, kv_idx); got a mask mod "
                        f"{score_mod!r} (pass it as mask_mod)")
    if mask_mod is not None and mod_kind(mask_mod) != "mask":
        raise TypeError(f"{owner}: mask_mod must take (b, h, q_idx, kv_idx); got a score mod {mask_mod!r}")


def check_position(owner: str, position: Any, num_heads: int) -> None:
    """``position`` must be None or a ``PositionBase``; an ALiBi module must have one slope per head."""
    if position is None:
        return
    if not isinstance(position, PositionBase):
        raise TypeError(f"{owner}: position must be a seqblocks PositionBase (rope / alibi), got "
                        f"{type(position).__name__}")
    if isinstance(position, ALiBi) and position.num_heads != num_heads:
        raise ValueError(f"{owner}: ALiBi has {position.num_heads} slopes for {num_heads} heads")


def make_rotary(owner: str, head_dim: int, rotary_emb_dim: int, base: float, interleaved: bool,
                position: PositionBase | None, device=None) -> RotaryEmbedding | None:
    """The layer's own RoPE over the first ``rotary_emb_dim`` channels of each head (None for 0).

    Raises:
        ValueError: both ``rotary_emb_dim`` and a rotary ``position`` module given.
    """
    if isinstance(rotary_emb_dim, bool) or not isinstance(rotary_emb_dim, int) or rotary_emb_dim < 0:
        raise ValueError(f"{owner}: rotary_emb_dim={rotary_emb_dim!r} must be a non-negative int (0: no RoPE)")
    if rotary_emb_dim == 0:
        return None
    if rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
        raise ValueError(f"{owner}: rotary_emb_dim={rotary_emb_dim} must be even and at most head_dim={head_dim}")
    check_range(owner, "rotary_emb_base", base, 0.0, lo_open=True)
    if position is not None and position.kind == "rotary":
        raise ValueError(f"{owner}: rotary_emb_dim={rotary_emb_dim} and a rotary position module both given; "
                         f"use one")
    return RotaryEmbedding(head_dim, base=base, rotary_dim=rotary_emb_dim, interleaved=interleaved, device=device)


def make_qk_norm(owner: str, enabled: bool, head_dim: int, eps: float, *, device=None,
                 dtype=None) -> tuple[RMSNorm | None, RMSNorm | None]:
    """(q_norm, k_norm): RMSNorms over the head width K, one learnable [K] weight each, or (None, None).

    Raises:
        ValueError: ``eps`` not positive.
    """
    if not enabled:
        return None, None
    check_range(owner, "qk_norm_eps", eps, 0.0, lo_open=True)
    return (RMSNorm(head_dim, eps, device=device, dtype=dtype), RMSNorm(head_dim, eps, device=device, dtype=dtype))


def with_softcap(owner: str, softcap: float | None, score_mod: Callable | None) -> Callable | None:
    """``score_mod`` preceded by tanh soft-capping at ``softcap`` (None: ``score_mod`` unchanged).

    Raises:
        ValueError: ``softcap`` not a positive number.
    """
    if softcap is None:
        return score_mod
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not softcap > 0:
        raise ValueError(f"{owner}: softcap={softcap!r} must be a positive number or None")
    cap = soft_cap(float(softcap))
    return cap if score_mod is None else compose(cap, score_mod)


def split_call_mod(owner: str, score_mod: Callable | None) -> tuple[Callable | None, Callable | None]:
    """A per-call ``score_mod`` as (score mod, mask mod): a mask mod given there is routed to the mask.

    Raises:
        TypeError: neither a score mod nor a mask mod.
    """
    if score_mod is None:
        return None, None
    if not callable(score_mod):
        raise TypeError(f"{owner}: score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score, got "
                        f"{type(score_mod).__name__}")
    return (score_mod, None) if mod_kind(score_mod) == "score" else (None, score_mod)


def rotary_of(rotary_emb: nn.Module | None, position: PositionBase | None) -> nn.Module | None:
    """The rotary module a layer applies: its own ``rotary_emb``, else a rotary ``position`` module."""
    if rotary_emb is not None:
        return rotary_emb
    return position if position is not None and position.kind == "rotary" else None


def token_index(cache: Cache | None, T: int, device) -> torch.Tensor:
    """Absolute token indices of this call: [1, T] ``arange(T)`` without a cache, else [B, T]
    ``cache.seqlen_offset + arange(T)``."""
    steps = torch.arange(T, device=device)
    return steps[None] if cache is None else cache.seqlen_offset[:, None] + steps


def rope_positions(position_ids: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B or 1, T]: ``position_ids`` ([T] or [B, T], checked by the caller with
    ``seqblocks.layers.checks.check_position_ids``) when given, else the token indices ``index``."""
    if position_ids is None:
        return index
    return position_ids[None] if position_ids.dim() == 1 else position_ids


def split_mask(owner: str, mask: torch.Tensor | None, B: int, Tq: int,
               Tk: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key_valid [B, Tk] bool or None, attn_mask [B or 1, H or 1, Tq, Tk] or None) from a user ``mask``.

    A 2-D bool mask is key padding [B, Tk] (True = a real token); a 2-D float mask is an additive
    [Tq, Tk] mask (as ``ConfigurableBlock`` passes it); a 3-D [B, Tq, Tk] or 4-D [B, H, Tq, Tk] mask
    is a full mask (bool: True = attend; float: additive).

    Raises:
        TypeError: ``mask`` is not a tensor. ValueError: a shape that is none of the above.
    """
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() == 2 and mask.dtype == torch.bool:
        if mask.shape != (B, Tk):
            raise ValueError(f"{owner}: a 2-D bool mask is a key-padding mask [B, Tk] = [{B}, {Tk}], got "
                             f"{tuple(mask.shape)}")
        return mask, None
    if mask.dim() == 2:
        if mask.shape != (Tq, Tk) or not mask.dtype.is_floating_point:
            raise ValueError(f"{owner}: a 2-D float mask is an additive [Tq, Tk] = [{Tq}, {Tk}] mask, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        return None, mask[None, None]
    if mask.dim() in (3, 4):
        return None, (mask[:, None] if mask.dim() == 3 else mask)
    raise ValueError(f"{owner}: mask must be [B, Tk] (key padding), [Tq, Tk], [B, Tq, Tk] or [B, H, Tq, Tk]; "
                     f"got {tuple(mask.shape)}")


def intersect_valid(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a & b`` of two [B, T] bool validity masks, either of which may be None (all valid)."""
    if a is None:
        return b
    return a if b is None else a & b


def document_mods(document: torch.Tensor, positions: torch.Tensor, score_mod: Callable | None,
                  mask_mod: Callable | None) -> tuple[Callable | None, Callable]:
    """(score_mod, mask_mod) of attention over packed documents, at token indices.

    The mask is block-diagonal: a query sees only keys of its own document (``document`` [T], the
    document of each token). A layer's own ``mask_mod`` / ``score_mod`` then see in-document
    positions (``positions`` [T]), exactly as they would with each document alone. Flex serves the
    mask block-sparsely; the dense backends materialise it as a boolean mask.
    """
    def doc_mask(b, h, q_idx, kv_idx):
        same = document[q_idx] == document[kv_idx]
        return same if mask_mod is None else same & mask_mod(b, h, positions[q_idx], positions[kv_idx])

    if score_mod is None:
        return None, doc_mask

    def doc_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, positions[q_idx], positions[kv_idx])

    return doc_score, doc_mask


def poisoned_queries(bad_key: torch.Tensor, index: torch.Tensor, *, causal: bool, window: int | None,
                     prior: torch.Tensor | None = None,
                     document: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(poisoned [B, T] bool, last [B, T] or None): the queries whose outputs a non-finite key poisons.

    ``bad_key`` [B, T] marks this call's valid keys that held a NaN / Inf (already zeroed, so the
    softmax-weighted sums stay finite), at token indices ``index`` [B or 1, T]. Causal: a query at
    index p is poisoned when it may see such a key (index <= p, and > p - window with a window).
    ``last`` is 1 + the index of the latest bad key up to each query (0: none) and ``prior`` [B] the
    same count carried by a cache (``nonfinite_last``), so decoding poisons exactly what the full pass
    does. Non-causal: every query of a row with a bad key. With packed documents (``document`` [T], the
    document of each token; no cache) only queries of the bad key's own document.
    """
    if not causal:
        if document is None:
            return bad_key.any(1, keepdim=True).expand_as(bad_key), None
        n = int(document.max()) + 1 if document.numel() else 0
        per_doc = bad_key.new_zeros(bad_key.shape[0], n, dtype=torch.long).index_add_(1, document, bad_key.long())
        return per_doc[:, document] > 0, None
    idx = index.expand_as(bad_key)
    last = torch.where(bad_key, idx + 1, torch.zeros((), dtype=idx.dtype, device=idx.device)).cummax(1).values
    if prior is not None:
        last = torch.maximum(last, prior[:, None].to(last.dtype))
    if document is None:
        poisoned = last > 0
    else:  # the latest bad key up to the query lies in the query's document
        first = torch.searchsorted(document.contiguous(), document, right=False)  # [T] its document's first token
        poisoned = last > first.to(last.dtype)
    if window is not None:
        poisoned = poisoned & (idx - last + 1 < window)
    return poisoned, last


def context_parallel_poisoned(cp: ContextParallel, bad_key: torch.Tensor, key_valid: torch.Tensor | None, *,
                              causal: bool, window: int | None,
                              document: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(poisoned [B, T_local], key_valid [B, T] or None) under context parallelism: ``poisoned_queries``'s
    rule over the whole sequence, so a non-finite key on one rank poisons the queries of later ranks that
    may see it. ``bad_key`` and ``key_valid`` [B, T_local] are this rank's; both are gathered in one
    all-gather, and the whole sequence's ``key_valid`` comes back for the attention. ``document`` [T]:
    the whole sequence's document of each token (packed documents)."""
    bad_all, valid_all = gather_token_masks(bad_key, key_valid, cp=cp)
    T_local = bad_key.shape[1]
    index = torch.arange(bad_all.shape[1], device=bad_all.device)[None]
    poisoned, _ = poisoned_queries(bad_all, index, causal=causal, window=window, document=document)
    return poisoned[:, global_positions(T_local, bad_all.device, cp)], valid_all


class AttentionCore(Mixer):
    """Base of the softmax-attention mixers (MHA and its variants, MLA, cross-attention).

    ``init_core`` checks and stores the backend options; ``attend`` runs ``ops.attention.attention``
    with them, adding ALiBi (or another bias position) and dropout in training mode.
    """

    def init_core(self, *, num_heads: int, attention_type: str, attention_block_size: int, dropout: float,
                  score_mod: Callable | None, mask_mod: Callable | None, softmax_scale: float | None,
                  window_size: int | None, position: PositionBase | None,
                  attention_fn: Callable | None = None) -> None:
        """Check and store the softmax-attention options (call from ``__init__``).

        Raises:
            ValueError: an unknown attention_type, a block size or window that is not a positive int,
                dropout outside [0, 1), ALiBi slopes that do not match the heads.
            TypeError: mods of the wrong kind, a position that is not a ``PositionBase``.
        """
        owner = type(self).__name__
        attention_type = ATTENTION_TYPE_ALIASES.get(attention_type, attention_type)
        if attention_type not in ATTENTION_BACKENDS:
            raise ValueError(f"{owner}: unknown attention_type {attention_type!r}; expected one of "
                             f"{ATTENTION_BACKENDS + tuple(ATTENTION_TYPE_ALIASES)}")
        if not isinstance(attention_block_size, int) or attention_block_size <= 0:
            raise ValueError(f"{owner}: attention_block_size={attention_block_size!r} must be a positive int")
        check_range(owner, "dropout", dropout, 0.0, 1.0, hi_open=True)
        if softmax_scale is not None:
            check_range(owner, "softmax_scale", softmax_scale, 0.0, lo_open=True)
        if window_size is not None and (not isinstance(window_size, int) or window_size <= 0):
            raise ValueError(f"{owner}: window_size={window_size!r} must be a positive int or None")
        check_position(owner, position, num_heads)
        check_mods(owner, score_mod, mask_mod)
        check_attention_fn(owner, attention_fn, attention_type)
        self.attention_fn = attention_fn
        self.attention_type = attention_type
        self.attention_block_size = attention_block_size
        self.dropout = float(dropout)
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.softmax_scale = softmax_scale
        self.window_size = window_size
        self.num_heads = num_heads
        self.position = position

    def bias_kwargs(self, q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None, Tq: int, Tk: int,
                    device) -> dict[str, Any]:
        """ALiBi slopes (or another bias position's dense bias, as ``extra_bias``) for the attention call."""
        pos = self.position
        if pos is None or pos.kind != "bias":
            return {}
        if isinstance(pos, ALiBi):
            return {"alibi_slopes": pos.slopes}
        qp = q_pos if q_pos is not None else torch.arange(Tk - Tq, Tk, device=device)
        kp = kv_pos if kv_pos is not None else torch.arange(Tk, device=device)
        return {"extra_bias": pos.score_bias(qp, kp)}

    def static_kv(self, q: torch.Tensor) -> bool:
        """Whether cached calls should attend to the whole static cache (flex on CUDA compiles per shape)."""
        sparse = self.score_mod is not None or self.mask_mod is not None or self.window_size is not None
        flex = self.attention_type == "flex" or (self.attention_type == "auto" and sparse)
        return flex and q.is_cuda

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
               q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None, key_valid: torch.Tensor | None,
               attn_mask: torch.Tensor | None, call_score_mod: Callable | None = None,
               call_mask_mod: Callable | None = None,
               documents: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Softmax attention of [B, H, Tq, K] queries on [B, Hkv, Tk, K] keys with the layer's options.

        ``call_score_mod`` / ``call_mask_mod`` (a forward's per-call ``score_mod``) apply after the
        layer's own: the score mods compose (layer's first), the mask mods intersect. ``documents``
        (document [T], in-document position [T]) makes it block-diagonal over packed documents
        (``document_mods``), on top of both: the layer's and the call's mods see in-document positions."""
        kwargs = self.bias_kwargs(q_pos, kv_pos, q.shape[2], k.shape[2], q.device)
        extra = kwargs.pop("extra_bias", None)
        if extra is not None:
            attn_mask = extra if attn_mask is None else (
                extra + attn_mask if attn_mask.dtype != torch.bool
                else extra.masked_fill(~attn_mask, float("-inf")))
        score_mod, mask_mod = self._mods(call_score_mod, call_mask_mod, documents)
        dropout_p = self.dropout if self.training else 0.0
        if self.attention_fn is not None:
            return call_attention_fn(
                self.attention_fn, q, k, v, causal=causal, window=window, scale=self.softmax_scale,
                q_positions=q_pos, kv_positions=kv_pos, key_valid=key_valid, attn_mask=attn_mask,
                score_mod=score_mod, mask_mod=mask_mod, alibi_slopes=kwargs.get("alibi_slopes"),
                dropout_p=self.dropout, deterministic=not self.training)
        return attention(
            q, k, v, causal=causal, window=window, scale=self.softmax_scale, q_positions=q_pos,
            kv_positions=kv_pos, key_valid=key_valid, attn_mask=attn_mask, score_mod=score_mod,
            mask_mod=mask_mod, dropout_p=dropout_p, backend=self.attention_type,
            block_size=self.attention_block_size, **kwargs,
        )

    def _mods(self, call_score_mod: Callable | None, call_mask_mod: Callable | None,
              documents: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Callable | None, Callable | None]:
        """(score_mod, mask_mod) of a call: the layer's, then the call's (composed / intersected), then
        packed documents' block-diagonal mask around both (``attend``)."""
        score_mod, mask_mod = self.score_mod, self.mask_mod
        if call_score_mod is not None:
            score_mod = call_score_mod if score_mod is None else compose(score_mod, call_score_mod)
        if call_mask_mod is not None:
            mask_mod = call_mask_mod if mask_mod is None else and_masks(mask_mod, call_mask_mod)
        if documents is not None:
            score_mod, mask_mod = document_mods(*documents, score_mod, mask_mod)
        return score_mod, mask_mod

    def attend_context_parallel(self, cp: ContextParallel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                causal: bool, window: int | None, key_valid: torch.Tensor | None,
                                call_score_mod: Callable | None = None, call_mask_mod: Callable | None = None,
                                documents: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``attend`` of this rank's queries [B, H, T_local, K] over the whole sequence, the keys and
        values [B, Hkv, T_local, K] split over ``cp`` like the queries; ``key_valid`` [B, T] is the whole
        sequence's, ``documents`` (document [T], in-document position [T]) too. Masks, ALiBi and mods
        see global positions.

        ``cp.attention`` "allgather" gathers the keys and values and runs ``attend`` (any backend, a
        kernel of one's own, any bias position); "ring" runs ``seqblocks.parallel.ring_attention``
        (O(T_local) memory), which takes ALiBi as its bias position and no ``attention_fn``.

        Raises:
            ValueError: "ring" with an ``attention_fn`` or a bias position other than ALiBi.
        """
        owner = type(self).__name__
        q_pos = global_positions(q.shape[2], q.device, cp)[None]
        if cp.attention == "allgather":
            keys, values = gather_time(k, dim=2, cp=cp), gather_time(v, dim=2, cp=cp)
            return self.attend(q, keys, values, causal=causal, window=window, q_pos=q_pos, kv_pos=None,
                               key_valid=key_valid, attn_mask=None, call_score_mod=call_score_mod,
                               call_mask_mod=call_mask_mod, documents=documents)
        if self.attention_fn is not None:
            raise ValueError(f"{owner}: ring attention (context_parallel(..., attention='ring')) computes the "
                             f"attention itself and cannot call attention_fn; use attention='allgather'")
        alibi = None
        if self.position is not None and self.position.kind == "bias":
            if not isinstance(self.position, ALiBi):
                raise ValueError(f"{owner}: ring attention takes ALiBi as its bias position, not "
                                 f"{type(self.position).__name__}; use context_parallel(..., attention='allgather')")
            alibi = self.position.slopes
        score_mod, mask_mod = self._mods(call_score_mod, call_mask_mod, documents)
        return ring_attention(q, k, v, causal=causal, window=window, scale=self.softmax_scale, key_valid=key_valid,
                              score_mod=score_mod, mask_mod=mask_mod, alibi_slopes=alibi,
                              dropout_p=self.dropout if self.training else 0.0,
                              block_size=self.attention_block_size, cp=cp)
