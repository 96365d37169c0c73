"""Multi-head attention mixers: MHA / GQA / MQA, sliding window, linear attention, cross-attention.

``MHA`` keeps the constructor of mamba_ssm's MHA (``embed_dim, num_heads, num_heads_kv, head_dim, ...``)
but is **causal by default**: a language model built from it cannot see the future.

Inputs and conventions (shared by every class here):

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

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads, K head width, V value width,
M memory length, S cache slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.layers.attention.cache import (
    CrossAttentionCache,
    KVCache,
    LinearAttentionCache,
    RollingKVCache,
    capture_safe,
)
from seqblocks.layers.attention.score_mods import mod_kind
from seqblocks.layers.mixer import Mixer
from seqblocks.layers.position import ALiBi, PositionBase, RotaryEmbedding
from seqblocks.ops.attention import ATTENTION_BACKENDS, FEATURE_MAPS, attention, linear_attention
from seqblocks.registry import MIXERS

__all__ = ["MHA", "GQA", "MQA", "SlidingWindowAttention", "CrossAttention", "ATTENTION_TYPES"]

ATTENTION_TYPES = ATTENTION_BACKENDS + ("linear",)


def _check_mods(score_mod, mask_mod, owner: str) -> None:
    if score_mod is not None and mod_kind(score_mod) != "score":
        raise TypeError(f"{owner}: score_mod must take (score, b, h, q_idx, kv_idx); got a mask mod "
                        f"{score_mod!r} (pass it as mask_mod)")
    if mask_mod is not None and mod_kind(mask_mod) != "mask":
        raise TypeError(f"{owner}: mask_mod must take (b, h, q_idx, kv_idx); got a score mod {mask_mod!r}")


def _positions(position_ids: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    if position_ids is None:
        return default
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != default.shape[-1]:
        raise ValueError(f"position_ids must be [T] or [B, T] with T={default.shape[-1]}, got "
                         f"{tuple(position_ids.shape)}")
    return position_ids


def _split_mask(mask: torch.Tensor | None, B: int, Tq: int, Tk: int, owner: str):
    """(key_valid [B, Tk] bool or None, attn_mask [B or 1, H or 1, Tq, Tk] or None) from a user mask."""
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


def _length_valid(lengths: torch.Tensor | None, B: int, T: int, device, owner: str) -> torch.Tensor | None:
    if lengths is None:
        return None
    if lengths.shape != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"{owner}: lengths must be an integer [B] = [{B}] tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if not capture_safe() and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"{owner}: lengths must lie in [0, {T}], got {lengths.tolist()}")
    return torch.arange(T, device=device)[None] < lengths.to(device)[:, None]


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


class _AttentionCore(Mixer):
    """What the attention mixers share: backend options, positions, the attention call."""

    def _init_core(self, *, num_heads, attention_type, attention_block_size, linear_attention_chunk_size,
                   linear_feature_map, dropout, score_mod, mask_mod, softmax_scale, window_size,
                   position) -> None:
        owner = type(self).__name__
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"{owner}: unknown attention_type {attention_type!r}; expected one of {ATTENTION_TYPES}")
        if not isinstance(attention_block_size, int) or attention_block_size <= 0:
            raise ValueError(f"{owner}: attention_block_size={attention_block_size!r} must be a positive int")
        if not isinstance(linear_attention_chunk_size, int) or linear_attention_chunk_size <= 0:
            raise ValueError(f"{owner}: linear_attention_chunk_size={linear_attention_chunk_size!r} must be a "
                             f"positive int")
        if linear_feature_map not in FEATURE_MAPS:
            raise ValueError(f"{owner}: linear_feature_map={linear_feature_map!r}; expected one of {FEATURE_MAPS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout={dropout} must be in [0, 1)")
        if window_size is not None and (not isinstance(window_size, int) or window_size <= 0):
            raise ValueError(f"{owner}: window_size={window_size!r} must be a positive int or None")
        if position is not None and not isinstance(position, PositionBase):
            raise TypeError(f"{owner}: position must be a seqblocks PositionBase (rope / alibi), got "
                            f"{type(position).__name__}")
        _check_mods(score_mod, mask_mod, owner)
        if attention_type == "linear":
            bad = {"dropout": dropout > 0, "score_mod": score_mod is not None, "mask_mod": mask_mod is not None,
                   "window_size": window_size is not None,
                   "ALiBi / bias positions": position is not None and position.kind == "bias"}
            bad = [k for k, v in bad.items() if v]
            if bad:
                raise ValueError(f"{owner}: attention_type='linear' (kernelized, no softmax scores) cannot "
                                 f"apply {bad}")
        self.attention_type = attention_type
        self.attention_block_size = attention_block_size
        self.linear_attention_chunk_size = linear_attention_chunk_size
        self.linear_feature_map = linear_feature_map
        self.dropout = float(dropout)
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.softmax_scale = softmax_scale
        self.window_size = window_size
        self.num_heads = num_heads
        if position is not None and position.kind == "bias" and isinstance(position, ALiBi) \
                and position.num_heads != num_heads:
            raise ValueError(f"{owner}: ALiBi has {position.num_heads} slopes for {num_heads} heads")
        self.position = position

    # Rotary positions -------------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, rotary: nn.Module | None) -> torch.Tensor:
        if rotary is None:
            return x
        return rotary.rotate(x, positions)

    def _bias_kwargs(self, q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None, Tq: int, Tk: int,
                     device) -> dict[str, Any]:
        """ALiBi slopes (or another bias position's dense bias) for the attention call."""
        pos = self.position
        if pos is None or pos.kind != "bias":
            return {}
        if isinstance(pos, ALiBi):
            return {"alibi_slopes": pos.slopes}
        qp = q_pos if q_pos is not None else torch.arange(Tk - Tq, Tk, device=device)
        kp = kv_pos if kv_pos is not None else torch.arange(Tk, device=device)
        return {"extra_bias": pos.score_bias(qp, kp)}

    def _static_kv(self, q: torch.Tensor) -> bool:
        """Whether cached calls should attend to the whole static cache (flex on CUDA compiles per shape)."""
        sparse = self.score_mod is not None or self.mask_mod is not None or self.window_size is not None
        flex = self.attention_type == "flex" or (self.attention_type == "auto" and sparse)
        return flex and q.is_cuda

    def _attend(self, q, k, v, *, causal, window, q_pos, kv_pos, key_valid, attn_mask) -> torch.Tensor:
        """Softmax attention of [B, H, Tq, K] queries on [B, Hkv, Tk, K] keys with the layer's options."""
        kwargs = self._bias_kwargs(q_pos, kv_pos, q.shape[2], k.shape[2], q.device)
        extra = kwargs.pop("extra_bias", None)
        if extra is not None:
            attn_mask = extra if attn_mask is None else (
                extra + attn_mask if attn_mask.dtype != torch.bool
                else extra.masked_fill(~attn_mask, float("-inf")))
        return attention(
            q, k, v, causal=causal, window=window, scale=self.softmax_scale, q_positions=q_pos,
            kv_positions=kv_pos, key_valid=key_valid, attn_mask=attn_mask, score_mod=self.score_mod,
            mask_mod=self.mask_mod, dropout_p=self.dropout if self.training else 0.0,
            backend=self.attention_type, block_size=self.attention_block_size, **kwargs,
        )


class MHA(_AttentionCore):
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
        attention_type (str): "auto", "standard", "memory_efficient", "flash", "flex" or "linear".
            Default: "auto".
        attention_block_size (int): key block of "memory_efficient". Default: 128.
        linear_attention_chunk_size (int): chunk of "linear". Default: 64.
        linear_feature_map (str): feature map of "linear": "elu", "relu", "identity". Default: "elu".
        dropout (float): attention-probability dropout, active in training mode only. Default: 0.0.
        score_mod (Callable | None): ``(score, b, h, q_idx, kv_idx) -> score`` at token indices. Default: None.
        mask_mod (Callable | None): ``(b, h, q_idx, kv_idx) -> bool`` at token indices. Default: None.
        position (PositionBase | None): a block's rotary or bias (ALiBi) position module (what
            ``ConfigurableBlock`` passes); additive positions belong to the model input. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: missing / inconsistent sizes, unknown attention_type, options the chosen
            attention_type cannot serve.
    """

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if num_heads is None:
            raise ValueError(f"{owner} needs num_heads (e.g. {owner}({embed_dim}, num_heads=8), or "
                             f"attn_cfg / mixer_kwargs={{'num_heads': 8}} in a model)")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"{owner}: embed_dim={embed_dim} and num_heads={num_heads} must be positive")
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads_kv <= 0 or num_heads % num_heads_kv:
            raise ValueError(f"{owner}: num_heads_kv={num_heads_kv} must be a positive divisor of "
                             f"num_heads={num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"{owner}: embed_dim={embed_dim} is not a multiple of num_heads={num_heads}; "
                                 f"set head_dim explicitly")
            head_dim = embed_dim // num_heads
        if window_size is not None and not causal:
            raise ValueError(f"{owner}: window_size={window_size} is a causal sliding window; it needs causal=True")
        self._init_core(num_heads=num_heads, attention_type=attention_type,
                        attention_block_size=attention_block_size,
                        linear_attention_chunk_size=linear_attention_chunk_size,
                        linear_feature_map=linear_feature_map, dropout=dropout, score_mod=score_mod,
                        mask_mod=mask_mod, softmax_scale=softmax_scale, window_size=window_size,
                        position=position)
        self.embed_dim, self.num_heads_kv, self.head_dim = embed_dim, num_heads_kv, head_dim
        self.causal, self.layer_idx = causal, layer_idx
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, (num_heads + 2 * num_heads_kv) * head_dim, bias=qkv_proj_bias,
                                 **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb_dim = rotary_emb_dim
        if rotary_emb_dim > 0:
            if position is not None and position.kind == "rotary":
                raise ValueError(f"{owner}: rotary_emb_dim={rotary_emb_dim} and a rotary position module both "
                                 f"given; use one")
            self.rotary_emb = RotaryEmbedding(head_dim, base=rotary_emb_base, rotary_dim=rotary_emb_dim,
                                              interleaved=rotary_emb_interleaved, device=device)
        else:
            self.rotary_emb = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()

    @property
    def rotary(self) -> nn.Module | None:
        if self.rotary_emb is not None:
            return self.rotary_emb
        return self.position if self.position is not None and self.position.kind == "rotary" else None

    @classmethod
    def from_config(cls, config, position: PositionBase | None = None, **kwargs: Any) -> MHA:
        """Build from a ``BlockConfig``: n_heads, n_kv_heads, head_dim, bias, causal, window_size,
        attention_type, attention_block_size, linear_attention_chunk_size, attention dropout, plus
        ``config.mixer_kwargs`` and ``kwargs`` (which win)."""
        args: dict[str, Any] = dict(
            num_heads=config.n_heads, num_heads_kv=config.n_kv_heads, head_dim=config.head_dim,
            qkv_proj_bias=config.bias, out_proj_bias=config.bias, causal=config.causal,
            window_size=config.window_size, attention_type=config.attention_type,
            attention_block_size=config.attention_block_size,
            linear_attention_chunk_size=config.linear_attention_chunk_size,
            dropout=config.effective_attention_dropout, position=position,
        )
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
                                 **kwargs: Any):
        """A ``KVCache``; a ``RollingKVCache`` of min(window_size, max_seqlen) slots with a window; a
        ``LinearAttentionCache`` for attention_type="linear"."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: a non-causal attention cannot decode with a cache "
                             f"(each step would have to see future tokens)")
        device = self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        del H
        if self.attention_type == "linear":
            return LinearAttentionCache.allocate(batch_size, max_seqlen, Hkv, K, K, device=device, dtype=dtype)
        if self.window_size is not None:
            return RollingKVCache.allocate(batch_size, max_seqlen, min(self.window_size, max_seqlen), Hkv, K, K,
                                           device=device, dtype=dtype)
        return KVCache.allocate(batch_size, max_seqlen, Hkv, K, K, device=device, dtype=dtype)

    # Forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D] (see the module docstring for cache, mask, position_ids, lengths)."""
        owner = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{owner}: x must be [B, T, {self.embed_dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = self.in_proj(x).split((H * K, Hkv * K, Hkv * K), dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
        rotary = self.rotary
        index = None  # token indices; only rotary and cached calls need them (no extra launch otherwise)
        if cache is not None:
            index = cache.seqlen_offset[:, None] + torch.arange(T, device=x.device)
        elif rotary is not None:
            index = torch.arange(T, device=x.device)[None]
        if rotary is not None:
            rope_pos = _positions(position_ids, index)
            q, k = rotary.rotate(q, rope_pos), rotary.rotate(k, rope_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, K]
        key_valid, attn_mask = _split_mask(mask, B, T, T, owner)
        length_valid = _length_valid(lengths, B, T, x.device, owner)
        key_valid = _and(key_valid, length_valid)
        if cache is None:
            out = self._full(q, k, v, key_valid, attn_mask)
        else:
            if attn_mask is not None:
                raise ValueError(f"{owner}: with a cache, mask must be a [B, T] key-padding mask (full masks "
                                 f"cannot be remembered for later steps)")
            if not self.causal:
                raise ValueError(f"{owner}: a non-causal attention cannot decode with a cache")
            out = self._cached(q, k, v, key_valid, index, cache, lengths)
        y = self.out_proj(out.transpose(1, 2).reshape(B, T, H * out.shape[-1]))
        if length_valid is not None:
            y = y * length_valid[..., None].to(y.dtype)
        return y

    def _full(self, q, k, v, key_valid, attn_mask):
        if self.attention_type == "linear":
            if attn_mask is not None:
                raise ValueError(f"{type(self).__name__}: attention_type='linear' takes key-padding masks only")
            out, _ = linear_attention(q, k, v, causal=self.causal, chunk_size=self.linear_attention_chunk_size,
                                      feature=self.linear_feature_map, key_valid=key_valid)
            return out
        return self._attend(q, k, v, causal=self.causal, window=self.window_size, q_pos=None, kv_pos=None,
                            key_valid=key_valid, attn_mask=attn_mask)

    def _cached(self, q, k, v, key_valid, index, cache, lengths):
        owner = type(self).__name__
        B, T = q.shape[0], q.shape[2]
        new_valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        used = None
        if not capture_safe():
            cache.check_capacity(T, owner)
            used = int(cache.seqlen_offset.max()) + T
        # A prefill into an empty cache with no padding is the plain full pass: attend to this call's keys
        # directly (aligned positions, so SDPA's flash kernel / flex's cached block mask serve it).
        fresh = used == T and key_valid is None and self.attention_type != "linear"
        out = None
        if fresh:
            out = self._attend(q, k, v, causal=True, window=self.window_size, q_pos=None, kv_pos=None,
                               key_valid=None, attn_mask=None)
        if self.attention_type == "linear":
            if not isinstance(cache, LinearAttentionCache):
                raise TypeError(f"{owner}: attention_type='linear' needs a LinearAttentionCache, got "
                                f"{type(cache).__name__}")
            out, (S, z) = linear_attention(q, k, v, causal=True, chunk_size=self.linear_attention_chunk_size,
                                           feature=self.linear_feature_map, key_valid=new_valid,
                                           initial_state=(cache.state, cache.normalizer))
            cache.state.copy_(S)
            cache.normalizer.copy_(z)
        elif isinstance(cache, RollingKVCache):
            out = self._rolling(q, k, v, new_valid, index, cache, lengths, out)
        elif isinstance(cache, KVCache):
            b_idx = torch.arange(B, device=q.device)[:, None]
            cache.k[b_idx, :, index] = k.transpose(1, 2).to(cache.k.dtype)
            cache.v[b_idx, :, index] = v.transpose(1, 2).to(cache.v.dtype)
            cache.key_valid[b_idx, index] = new_valid
            # Outside capture, attend only to the slots in use; under capture (and for flex, whose compiled
            # kernel is specialised to shapes), to all slots: the same result, the unused slots are invalid.
            S = cache.k.shape[2] if used is None or self._static_kv(q) else used
            if out is None:
                out = self._attend(q, cache.k[:, :, :S].to(q.dtype), cache.v[:, :, :S].to(q.dtype), causal=True,
                                   window=self.window_size, q_pos=index, kv_pos=None,
                                   key_valid=cache.key_valid[:, :S], attn_mask=None)
        else:
            raise TypeError(f"{owner}: expected a cache from allocate_inference_cache, got {type(cache).__name__}")
        cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        return out

    def _rolling(self, q, k, v, new_valid, index, cache: RollingKVCache, lengths, out=None):
        """Attend to the window's cached tokens plus this call's (unless ``out`` is given), then keep the
        newest W tokens."""
        B, T = q.shape[0], q.shape[2]
        W = cache.window
        if out is None:
            keys = torch.cat((cache.k.to(q.dtype), k), dim=2)  # [B, Hkv, W + T, K]
            vals = torch.cat((cache.v.to(q.dtype), v), dim=2)
            kv_pos = torch.cat((cache.slot_positions, index), dim=1)  # [B, W + T]
            kv_valid = torch.cat((cache.key_valid & (cache.slot_positions >= 0), new_valid), dim=1)
            out = self._attend(q, keys, vals, causal=True, window=self.window_size or W, q_pos=index,
                               kv_pos=kv_pos, key_valid=kv_valid, attn_mask=None)
        # Slot s keeps the newest position p < end with p % W == s; it is new when p >= offset.
        offset = cache.seqlen_offset
        consumed = torch.full_like(offset, T) if lengths is None else lengths.to(offset)
        end = (offset + consumed)[:, None]
        slots = torch.arange(W, device=q.device)[None]
        newest = end - 1 - torch.remainder(end - 1 - slots, W)  # [B, W]
        is_new = newest >= offset[:, None]
        t_idx = (newest - offset[:, None]).clamp(0, T - 1)  # [B, W]
        gather = t_idx[:, None, :, None]
        new_k = k.gather(2, gather.expand(B, k.shape[1], W, k.shape[3]))
        new_v = v.gather(2, gather.expand(B, v.shape[1], W, v.shape[3]))
        sel = is_new[:, None, :, None]
        cache.k.copy_(torch.where(sel, new_k.to(cache.k.dtype), cache.k))
        cache.v.copy_(torch.where(sel, new_v.to(cache.v.dtype), cache.v))
        cache.key_valid.copy_(torch.where(is_new, new_valid.gather(1, t_idx), cache.key_valid))
        cache.slot_positions.copy_(torch.where(is_new, newest, cache.slot_positions))
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


MIXERS.register("mha", MHA)
MIXERS.register("attn", MHA, description="alias of 'mha': multi-head attention, the short name for mixer_types lists")


class CrossAttention(_AttentionCore):
    """Cross-attention: queries from ``x`` [B, T, D], keys / values from a memory [B, M, Dm].

    Args:
        embed_dim (int): query / output width D.
        num_heads (int): query heads.
        num_heads_kv (int | None): key/value heads. Default: None (= num_heads).
        head_dim (int | None): head width. Default: None (= embed_dim // num_heads).
        kdim (int | None): memory width Dm. Default: None (= embed_dim).
        qkv_proj_bias, out_proj_bias (bool): projection biases. Default: True.
        softmax_scale (float | None): score scale. Default: None (head_dim ** -0.5).
        layer_idx (int | None): layer index. Default: None.
        rotary_emb_dim (int): RoPE on queries (at ``position_ids``) and keys (at ``memory_position_ids``);
            0 disables. Default: 0.
        rotary_emb_base (float): RoPE base. Default: 10000.0.
        attention_type (str): as ``MHA`` (not "linear"). Default: "auto".
        attention_block_size (int): key block of "memory_efficient". Default: 128.
        dropout (float): attention dropout in training. Default: 0.0.
        device, dtype: parameter placement. Default: None.

    With a ``CrossAttentionCache`` the memory's keys / values are computed on the first call that
    passes ``memory`` and reused by every later call (which may pass ``memory=None``).
    """

    causal = False

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None,
                 head_dim: int | None = None, kdim: int | None = None, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None, layer_idx: int | None = None,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, *, attention_type: str = "auto",
                 attention_block_size: int = 128, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        if attention_type == "linear":
            raise ValueError(f"{owner}: attention_type='linear' is not offered for cross-attention")
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads <= 0 or num_heads_kv <= 0 or num_heads % num_heads_kv:
            raise ValueError(f"{owner}: num_heads={num_heads}, num_heads_kv={num_heads_kv}: need positive "
                             f"heads with num_heads_kv dividing num_heads")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"{owner}: embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
            head_dim = embed_dim // num_heads
        self._init_core(num_heads=num_heads, attention_type=attention_type,
                        attention_block_size=attention_block_size, linear_attention_chunk_size=64,
                        linear_feature_map="elu", dropout=dropout, score_mod=None, mask_mod=None,
                        softmax_scale=softmax_scale, window_size=None, position=None)
        self.embed_dim, self.num_heads_kv, self.head_dim = embed_dim, num_heads_kv, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.layer_idx = layer_idx
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_proj_bias, **factory)
        self.kv_proj = nn.Linear(self.kdim, 2 * num_heads_kv * head_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb = (RotaryEmbedding(head_dim, base=rotary_emb_base, rotary_dim=rotary_emb_dim, device=device)
                           if rotary_emb_dim > 0 else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.kv_proj, self.out_proj):
            lin.reset_parameters()

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 *, memory_seqlen: int | None = None, **kwargs: Any) -> CrossAttentionCache:
        """A cache for the keys / values of a memory of up to ``memory_seqlen`` (default max_seqlen) tokens."""
        device = self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        M = max_seqlen if memory_seqlen is None else memory_seqlen
        return CrossAttentionCache.allocate(batch_size, M, self.num_heads_kv, self.head_dim, self.head_dim,
                                            device=device, dtype=dtype)

    def _memory_kv(self, memory, memory_position_ids):
        owner = type(self).__name__
        if memory.dim() != 3 or memory.shape[-1] != self.kdim:
            raise ValueError(f"{owner}: memory must be [B, M, {self.kdim}], got {tuple(memory.shape)}")
        B, M, _ = memory.shape
        Hkv, K = self.num_heads_kv, self.head_dim
        k, v = self.kv_proj(memory).view(B, M, 2, Hkv, K).unbind(dim=2)
        if self.rotary_emb is not None:
            pos = _positions(memory_position_ids, torch.arange(M, device=memory.device)[None])
            k = self.rotary_emb.rotate(k, pos)
        return k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, M, K]

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, cache: CrossAttentionCache | None = None,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                memory_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x (Tensor): [B, T, D] queries.
            memory (Tensor | None): [B, M, Dm]; may be None only with a filled cache.
            cache (CrossAttentionCache | None): memory keys / values computed once. Default: None.
            mask (Tensor | None): [B, M] bool memory padding (True = real), or a full mask
                [B or 1, (H or 1,) T, M] without a cache. Default: None.
            position_ids (Tensor | None): query RoPE positions. Default: token indices.
            memory_position_ids (Tensor | None): memory RoPE positions. Default: arange(M).
        """
        owner = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{owner}: x must be [B, T, {self.embed_dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, K)
        if self.rotary_emb is not None:
            index = (torch.arange(T, device=x.device)[None] if cache is None
                     else cache.seqlen_offset[:, None] + torch.arange(T, device=x.device))
            q = self.rotary_emb.rotate(q, _positions(position_ids, index))
        q = q.transpose(1, 2)
        if cache is not None and cache.filled and memory is None:
            k, v, key_valid, attn_mask = cache.k.to(q.dtype), cache.v.to(q.dtype), cache.key_valid, None
        else:
            if memory is None:
                raise ValueError(f"{owner}: memory is required (the cache holds no memory keys yet)")
            k, v = self._memory_kv(memory, memory_position_ids)
            M = k.shape[2]
            key_valid, attn_mask = _split_mask(mask, B, T, M, owner)
            if cache is not None:
                if attn_mask is not None:
                    raise ValueError(f"{owner}: with a cache, mask must be a [B, M] memory-padding mask")
                if M > cache.max_seqlen or B != cache.batch_size:
                    raise ValueError(f"{owner}: memory [B={B}, M={M}] does not fit the cache "
                                     f"[B={cache.batch_size}, M<={cache.max_seqlen}]")
                cache.k.zero_()
                cache.v.zero_()
                cache.k[:, :, :M] = k.to(cache.k.dtype)
                cache.v[:, :, :M] = v.to(cache.v.dtype)
                cache.key_valid.zero_()
                cache.key_valid[:, :M] = True if key_valid is None else key_valid
                cache.filled = True
                k, v, key_valid = cache.k.to(q.dtype), cache.v.to(q.dtype), cache.key_valid
        out = self._attend(q, k, v, causal=False, window=None, q_pos=None, kv_pos=None, key_valid=key_valid,
                           attn_mask=attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * K))
