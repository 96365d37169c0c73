"""Multi-head softmax attention mixers: MHA / GQA / MQA and sliding-window attention.

``MHA`` keeps the constructor of mamba_ssm's MHA (``embed_dim, num_heads, num_heads_kv, head_dim, ...``)
but is **causal by default**: a language model built from it cannot see the future.

``attention_type="linear"`` is an alias that builds a ``LinearAttention`` (``linear_attention.py``);
cross-attention lives in ``cross_attention.py``, MLA in ``mla.py``, what they share in ``common.py``.

Inputs and conventions (shared by every attention mixer):

- ``x`` [B, T, D] -> ``y`` [B, T, D]. With a cache, the call continues the cached stream (prefill when
  T > 1, a decode step when T = 1) and updates the cache in place.
- Token index: the position of a token in its stream, ``cache.seqlen_offset + arange(T)`` (0-based
  without a cache). Causal and window masks, ALiBi and every ``score_mod`` / ``mask_mod`` see token
  indices, so a full pass and cached decoding agree exactly.
- ``position_ids`` [T] or [B, T]: rotary angles only (default: the token indices). They never change
  which keys a query may see, so packed sequences whose positions restart cannot leak the future.
- ``mask``: a bool [B, Tk] key-padding mask (True = a real token; with a cache it marks this call's
  tokens and is remembered for later steps), or a full mask without a cache: bool
  [B or 1, (H or 1,) Tq, Tk] (True = attend) or float (additive), or a float [Tq, Tk] additive mask
  (as ``ConfigurableBlock`` passes it). A query that may see no key outputs 0.
- ``lengths`` [B]: valid prefix of each padded sequence: later tokens are neither attended to nor
  cached, their outputs are 0, and a cache advances by each row's length.
- Attention dropout (``dropout``) acts on the attention probabilities in training mode only.
- Non-finite values (``seqblocks.layers.finite``): a NaN / Inf in token t's query, key or value is
  zeroed before the softmax (a masked key's ``0 * NaN`` would reach every query) and the outputs of
  the queries that may see that key (causal: t and later, within the window) are set to NaN; padded
  or masked-out keys never poison anything, and outputs at padding are 0.

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads, K head width, V value width,
M memory length, S cache slots.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.cache import host_sync_unsafe
from seqblocks.layers.attention.cache import KVCache, RollingKVCache
from seqblocks.layers.attention.common import (
    AttentionCore,
    intersect_valid,
    make_qk_norm,
    make_rotary,
    poisoned_queries,
    resolve_heads,
    rope_positions,
    rotary_of,
    split_call_mod,
    split_mask,
    with_softcap,
)
from seqblocks.layers.attention.cross_attention import CrossAttention
from seqblocks.layers.attention.linear_attention import LinearAttention
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
from seqblocks.layers.position import PositionBase
from seqblocks.ops.attention import ATTENTION_BACKENDS
from seqblocks.registry import MIXERS

# CrossAttention is re-exported here, where it lived before cross_attention.py.
__all__ = ["MHA", "GQA", "MQA", "SlidingWindowAttention", "CrossAttention", "ATTENTION_TYPES"]

#: Every ``attention_type`` MHA accepts: the softmax backends, and "linear" (builds a LinearAttention).
ATTENTION_TYPES = ATTENTION_BACKENDS + ("linear",)


class MHA(AttentionCore):
    """Multi-head self-attention with grouped / multi-query key-value heads, under the mixer contract.

    Args:
        embed_dim (int): model width D.
        num_heads (int): query heads H. Required (a ValueError says so when missing).
        num_heads_kv (int | None): key/value heads Hkv (GQA; 1 is MQA); must divide num_heads.
            Default: None (= num_heads).
        head_dim (int | None): width of a head. Default: None (= embed_dim // num_heads).
        qkv_proj_bias (bool): bias in the fused q/k/v projection. Default: True.
        out_proj_bias (bool): bias in the output projection. Default: True.
        softmax_scale (float | None): score scale. Default: None (head_dim ** -0.5).
        causal (bool): causal self-attention. Default: True (unlike mamba_ssm's MHA, which defaults to
            non-causal and lets a language model see the future).
        layer_idx (int | None): position of the layer in a model. Default: None.
        rotary_emb_dim (int): rotate the first rotary_emb_dim channels of q and k (RoPE); 0 disables.
            Default: 0.
        rotary_emb_base (float): RoPE base. Default: 10000.0.
        rotary_emb_interleaved (bool): GPT-J pair layout instead of halves. Default: False.
        window_size (int | None): causal sliding window: a query sees itself and window_size - 1
            earlier tokens; decoding then uses a rolling window-sized cache. Default: None.
        attention_type (str): "auto", "standard", "memory_efficient", "flash", "flex", or "linear" (an
            alias: the call returns a ``LinearAttention``, see below). Default: "auto".
        attention_block_size (int): key block of "memory_efficient". Default: 128.
        linear_attention_chunk_size (int): ``LinearAttention``'s chunk_size under "linear". Default: 64.
        linear_feature_map (str): ``LinearAttention``'s feature_map under "linear": "elu", "relu",
            "identity". Default: "elu".
        dropout (float): attention-probability dropout, active in training mode only. Default: 0.0.
        score_mod (Callable | None): ``(score, b, h, q_idx, kv_idx) -> score`` at token indices. Default: None.
        mask_mod (Callable | None): ``(b, h, q_idx, kv_idx) -> bool`` at token indices. Default: None.
        position (PositionBase | None): a block's rotary or bias (ALiBi) position module (what
            ``ConfigurableBlock`` passes); additive positions belong to the model input. Default: None.
        qk_norm (bool): RMSNorm over the head width of every query and key head (one learnable
            [head_dim] weight for queries, one for keys), before RoPE (Qwen3 / Gemma 3 / OLMo 2).
            Default: False.
        qk_norm_eps (float): epsilon of the QK-norm. Default: 1e-5.
        softcap (float | None): attention-logit soft-capping, ``softcap * tanh(score / softcap)`` on the
            scaled scores, before any ``score_mod`` (Gemma 2). Default: None.
        attention_fn (Callable | None): a kernel of one's own that computes the attention,
            ``fn(query, key, value, *, mask, score_mod, dropout_rate, deterministic) -> out`` on
            [B, H, T, K] tensors (``seqblocks.layers.attention.attention_fn`` gives the exact contract);
            it replaces the ``attention_type`` backend. Default: None.
        device, dtype: parameter placement. Default: None.

    ``MHA(..., attention_type="linear")`` (also ``GQA`` / ``MQA``) returns a ``LinearAttention`` with
    the same parameters under the same names, so its state dict is the one this class would have; the
    softmax-only options (window_size, score_mod, mask_mod, dropout, softmax_scale, ALiBi) must then be
    left unset. ``isinstance(m, MHA)`` is False for it; it is ``LinearAttention``, registered as
    ``"linear_attention"``.

    Raises:
        ValueError: missing / inconsistent sizes, unknown attention_type, options the chosen
            attention_type cannot serve.
    """

    inputs = frozenset({"mask", "position_ids", "lengths"})

    def __new__(cls, *args: Any, **kwargs: Any):
        if kwargs.get("attention_type") == "linear":
            return cls._linear_alias(args, kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_heads_kv: int | None = None,
        head_dim: int | None = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        softmax_scale: float | None = None,
        causal: bool = True,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        *,
        window_size: int | None = None,
        attention_type: str = "auto",
        attention_block_size: int = 128,
        linear_attention_chunk_size: int = 64,
        linear_feature_map: str = "elu",
        dropout: float = 0.0,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        position: PositionBase | None = None,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        softcap: float | None = None,
        attention_fn: Callable | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        num_heads, num_heads_kv, head_dim = resolve_heads(owner, embed_dim, num_heads, num_heads_kv, head_dim)
        if window_size is not None and not causal:
            raise ValueError(f"{owner}: window_size={window_size} is a causal sliding window; it needs causal=True")
        if not isinstance(qk_norm, bool):
            raise TypeError(f"{owner}: qk_norm must be a bool, got {qk_norm!r}")
        score_mod = with_softcap(owner, softcap, score_mod)
        # linear_attention_chunk_size / linear_feature_map serve only the "linear" alias (see __new__).
        self.init_core(num_heads=num_heads, attention_type=attention_type, attention_block_size=attention_block_size,
                       dropout=dropout, score_mod=score_mod, mask_mod=mask_mod, softmax_scale=softmax_scale,
                       window_size=window_size, position=position, attention_fn=attention_fn)
        self.embed_dim, self.num_heads_kv, self.head_dim = embed_dim, num_heads_kv, head_dim
        self.causal, self.layer_idx = causal, layer_idx
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, (num_heads + 2 * num_heads_kv) * head_dim, bias=qkv_proj_bias,
                                 **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb = make_rotary(owner, head_dim, rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved,
                                      position, device)
        self.softcap = softcap
        self.q_norm, self.k_norm = make_qk_norm(owner, qk_norm, head_dim, qk_norm_eps, **factory)
        self.reset_parameters()

    @classmethod
    def _linear_alias(cls, args: tuple, kwargs: dict[str, Any]) -> LinearAttention:
        """``cls(*args, **kwargs)`` with attention_type="linear": the same arguments, by MHA's names, built
        as a ``LinearAttention``."""
        bound = inspect.signature(MHA.__init__).bind(None, *args, **kwargs)  # TypeError as MHA(...) gives
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        return LinearAttention.from_mha_arguments(cls.__name__, cls._alias_arguments(arguments))

    @classmethod
    def _alias_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        """What a subclass fixes in the arguments of its linear alias (MQA: one key/value head)."""
        return arguments

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    @property
    def rotary(self) -> nn.Module | None:
        return rotary_of(self.rotary_emb, self.position)

    @classmethod
    def from_config(cls, config, position: PositionBase | None = None, **kwargs: Any) -> MHA:
        """Build from a ``BlockConfig``: n_heads, n_kv_heads, head_dim, bias, causal, window_size,
        attention_type, attention_block_size, linear_attention_chunk_size, attention dropout, qk_norm
        (with norm_eps), attn_logit_softcapping (as softcap), ``mup`` (softmax_scale = 1 / head_dim),
        plus ``config.mixer_kwargs`` and ``kwargs`` (which win)."""
        args: dict[str, Any] = dict(
            num_heads=config.n_heads, num_heads_kv=config.n_kv_heads, head_dim=config.head_dim,
            qkv_proj_bias=config.bias, out_proj_bias=config.bias, causal=config.causal,
            window_size=config.window_size, attention_type=config.attention_type,
            attention_block_size=config.attention_block_size,
            linear_attention_chunk_size=config.linear_attention_chunk_size,
            dropout=config.effective_attention_dropout, position=position,
            qk_norm=config.qk_norm, qk_norm_eps=config.norm_eps, softcap=config.attn_logit_softcapping,
        )
        if config.mup and config.attention_type != "linear":
            # muP: scores scale as 1 / head_dim, so q.k (whose entries correlate after training) stays O(1).
            args["softmax_scale"] = 1.0 / config.effective_head_dim
        args.update(cls._config_overrides(config))
        args.update(config.mixer_kwargs)
        args.update(kwargs)
        return cls(config.d_model, **args)

    @classmethod
    def _config_overrides(cls, config) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_heads_kv={self.num_heads_kv}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window_size={self.window_size}, "
                f"attention_type={self.attention_type!r}")

    # Cache ------------------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> KVCache | RollingKVCache:
        """A ``KVCache``; with a window, a ``RollingKVCache`` of min(window_size, max_seqlen) slots."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: a non-causal attention cannot decode with a cache "
                             f"(each step would have to see future tokens)")
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        Hkv, K = self.num_heads_kv, self.head_dim
        if self.window_size is not None:
            return RollingKVCache.allocate(batch_size, max_seqlen, min(self.window_size, max_seqlen), Hkv, K, K,
                                           device=device, dtype=dtype)
        return KVCache.allocate(batch_size, max_seqlen, Hkv, K, K, device=device, dtype=dtype)

    # Forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: KVCache | RollingKVCache | None = None, *,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, score_mod: Callable | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D] (see the module docstring for cache, mask, position_ids, lengths).

        ``score_mod``: a per-call score mod (or mask mod), applied after the layer's own ``score_mod``
        (composed) or intersected with its ``mask_mod``; like them it sees token indices."""
        owner = type(self).__name__
        call_mods = split_call_mod(owner, score_mod)
        check_input(owner, x, self.embed_dim, device=self.in_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.in_proj.weight.dtype)
        B, T, _ = x.shape
        check_lengths(owner, lengths, B, T)
        check_position_ids(owner, position_ids, B, T)
        if cache is not None:
            check_cache(owner, cache, RollingKVCache if self.window_size is not None else KVCache, B, x.device)
            if not self.causal:
                raise ValueError(f"{owner}: a non-causal attention cannot decode with a cache")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = self.in_proj(x).split((H * K, Hkv * K, Hkv * K), dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
        if self.q_norm is not None:  # QK-norm comes before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        rotary = self.rotary
        index = None  # token indices; only rotary and cached calls need them (no extra launch otherwise)
        if cache is not None:
            index = cache.seqlen_offset[:, None] + torch.arange(T, device=x.device)
        elif rotary is not None:
            index = torch.arange(T, device=x.device)[None]
        if rotary is not None:
            rope_pos = rope_positions(position_ids, index)
            q, k = rotary.rotate(q, rope_pos), rotary.rotate(k, rope_pos)
        bad_q, bad_kv = nonfinite_tokens(q), nonfinite_tokens(k, v)  # [B, T]
        q, k, v = zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, K]
        key_valid, attn_mask = split_mask(owner, mask, B, T, T)
        length_valid = lengths_mask(lengths, T, x.device)
        key_valid = intersect_valid(key_valid, length_valid)
        bad_key = bad_kv if key_valid is None else bad_kv & key_valid
        if cache is None:
            out = self.attend(q, k, v, causal=self.causal, window=self.window_size, q_pos=None, kv_pos=None,
                              key_valid=key_valid, attn_mask=attn_mask, call_score_mod=call_mods[0],
                              call_mask_mod=call_mods[1])
            poisoned, _ = poisoned_queries(bad_key, torch.arange(T, device=x.device)[None], causal=self.causal,
                                           window=self.window_size)
        else:
            if attn_mask is not None:
                raise ValueError(f"{owner}: with a cache, mask must be a [B, T] key-padding mask (full masks "
                                 f"cannot be remembered for later steps)")
            poisoned, last = poisoned_queries(bad_key, index, causal=True, window=self.window_size,
                                              prior=cache.nonfinite_last)
            out = self._cached(q, k, v, key_valid, index, cache, lengths, call_mods)
            cache.nonfinite_last.copy_(last[:, -1])
        y = self.out_proj(out.transpose(1, 2).reshape(B, T, H * out.shape[-1]))
        y = poison(y, poisoned | bad_q)
        if length_valid is not None:
            y = y.masked_fill(~length_valid[..., None], 0.0)
        return y.to(in_dtype)

    def _cached(self, q, k, v, key_valid, index, cache: KVCache | RollingKVCache, lengths,
                call_mods: tuple[Callable | None, Callable | None] = (None, None)) -> torch.Tensor:
        B, T = q.shape[0], q.shape[2]
        mods = {"call_score_mod": call_mods[0], "call_mask_mod": call_mods[1]}
        new_valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        used = None
        if not host_sync_unsafe():
            cache.check_capacity(T, type(self).__name__)
            used = int(cache.seqlen_offset.max()) + T
        consumed = torch.full_like(cache.seqlen_offset, T) if lengths is None else lengths.to(cache.seqlen_offset)
        out = None
        if used == T and key_valid is None:
            # A prefill into an empty cache with no padding is the plain full pass: attend to this call's keys
            # directly (aligned positions, so SDPA's flash kernel / flex's cached block mask serve it).
            out = self.attend(q, k, v, causal=True, window=self.window_size, q_pos=None, kv_pos=None,
                              key_valid=None, attn_mask=None, **mods)
        if isinstance(cache, RollingKVCache):
            if out is None:
                # the window's cached tokens plus this call's
                keys = torch.cat((cache.k.to(q.dtype), k), dim=2)  # [B, Hkv, W + T, K]
                vals = torch.cat((cache.v.to(q.dtype), v), dim=2)
                kv_pos = torch.cat((cache.slot_positions, index), dim=1)  # [B, W + T]
                kv_valid = torch.cat((cache.key_valid & (cache.slot_positions >= 0), new_valid), dim=1)
                out = self.attend(q, keys, vals, causal=True, window=self.window_size or cache.window, q_pos=index,
                                  kv_pos=kv_pos, key_valid=kv_valid, attn_mask=None, **mods)
            cache.write(k, v, new_valid, consumed)
        else:
            cache.write(index, k, v, new_valid)
            # Outside capture, attend only to the slots in use; under capture (and for flex, whose compiled
            # kernel is specialised to shapes), to all slots: the same result, the unused slots are invalid.
            S = cache.k.shape[2] if used is None or self.static_kv(q) else used
            if out is None:
                out = self.attend(q, cache.k[:, :, :S].to(q.dtype), cache.v[:, :, :S].to(q.dtype), causal=True,
                                  window=self.window_size, q_pos=index, kv_pos=None,
                                  key_valid=cache.key_valid[:, :S], attn_mask=None, **mods)
        cache.advance(consumed)
        return out


@MIXERS.register("gqa")
class GQA(MHA):
    """Grouped-query attention: ``MHA`` with ``num_heads_kv`` key/value heads shared by groups of query
    heads (BlockConfig.n_kv_heads). Same arguments as ``MHA``."""


@MIXERS.register("mqa")
class MQA(MHA):
    """Multi-query attention: ``MHA`` with one key/value head shared by every query head."""

    def __init__(self, embed_dim: int, num_heads: int | None = None, num_heads_kv: int | None = 1,
                 *args: Any, **kwargs: Any) -> None:
        if num_heads_kv not in (None, 1):
            raise ValueError(f"MQA has exactly one key/value head; got num_heads_kv={num_heads_kv}")
        super().__init__(embed_dim, num_heads, 1, *args, **kwargs)

    @classmethod
    def _config_overrides(cls, config) -> dict[str, Any]:
        return {"num_heads_kv": 1}

    @classmethod
    def _alias_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        if arguments.get("num_heads_kv") not in (None, 1):
            raise ValueError(f"MQA has exactly one key/value head; got num_heads_kv={arguments['num_heads_kv']}")
        return {**arguments, "num_heads_kv": 1}


@MIXERS.register("sliding_window")
class SlidingWindowAttention(MHA):
    """Causal sliding-window attention with a rolling, window-sized KV cache.

    A query at token index p attends to tokens p - window_size + 1 .. p. Same arguments as ``MHA``;
    ``window_size`` is required (``BlockConfig.window_size``).
    """

    def __init__(self, embed_dim: int, num_heads: int | None = None, *args: Any,
                 window_size: int | None = None, **kwargs: Any) -> None:
        if window_size is None:
            raise ValueError("SlidingWindowAttention needs window_size (BlockConfig.window_size or "
                             "window_size=...)")
        if kwargs.get("causal", True) is False:
            raise ValueError("SlidingWindowAttention is causal; causal=False is not supported")
        super().__init__(embed_dim, num_heads, *args, window_size=window_size, **kwargs)

    @classmethod
    def _alias_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("SlidingWindowAttention: attention_type='linear' has no window (kernelized attention "
                         "sees every earlier token); use LinearAttention ('linear_attention') without a window")


MIXERS.register("sliding_window_gqa", SlidingWindowAttention,
                description="alias of 'sliding_window' (the name some configs use): GQA with a causal sliding window")
MIXERS.register("mha", MHA)
MIXERS.register("attn", MHA, description="alias of 'mha': multi-head attention, the short name for mixer_types lists")
