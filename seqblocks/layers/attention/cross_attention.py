"""Cross-attention: queries from the sequence, keys and values from a memory (an encoder's output).

``memory`` is this mixer's own argument (it is not one of the routed mixer inputs). With a
``CrossAttentionCache`` the memory's keys / values are computed on the first call that passes
``memory`` and reused by every later call (which may pass ``memory=None``).

Shapes: B batch, T time, D model width, M memory length, Dm memory width, H query heads,
Hkv key/value heads, K head width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.layers.attention.cache import CrossAttentionCache
from seqblocks.layers.attention.common import (
    AttentionCore,
    make_rotary,
    resolve_heads,
    rope_positions,
    split_mask,
    token_index,
)
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_input,
    check_position_ids,
    check_positive,
    is_empty,
    to_module_dtype,
)

__all__ = ["CrossAttention"]


class CrossAttention(AttentionCore):
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
        attention_fn (Callable | None): a kernel of one's own for the attention (the contract of
            ``seqblocks.layers.attention.attention_fn``). Default: None.
        device, dtype: parameter placement. Default: None.
    """

    causal = False
    inputs = frozenset({"mask", "position_ids"})

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None,
                 head_dim: int | None = None, kdim: int | None = None, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None, layer_idx: int | None = None,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, *, attention_type: str = "auto",
                 attention_block_size: int = 128, dropout: float = 0.0, attention_fn: Callable | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        if attention_type == "linear":
            raise ValueError(f"{owner}: attention_type='linear' is not offered for cross-attention")
        num_heads, num_heads_kv, head_dim = resolve_heads(owner, embed_dim, num_heads, num_heads_kv, head_dim)
        self.init_core(num_heads=num_heads, attention_type=attention_type, attention_block_size=attention_block_size,
                       dropout=dropout, score_mod=None, mask_mod=None, softmax_scale=softmax_scale,
                       window_size=None, position=None, attention_fn=attention_fn)
        self.embed_dim, self.num_heads_kv, self.head_dim = embed_dim, num_heads_kv, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        check_positive(owner, kdim=self.kdim)
        self.layer_idx = layer_idx
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_proj_bias, **factory)
        self.kv_proj = nn.Linear(self.kdim, 2 * num_heads_kv * head_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb = make_rotary(owner, head_dim, rotary_emb_dim, rotary_emb_base, False, None, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.kv_proj, self.out_proj):
            lin.reset_parameters()

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 *, memory_seqlen: int | None = None, **kwargs: Any) -> CrossAttentionCache:
        """A cache for the keys / values of a memory of up to ``memory_seqlen`` (default max_seqlen) tokens."""
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        if memory_seqlen is not None:
            check_positive(type(self).__name__, memory_seqlen=memory_seqlen)
        device = self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        M = max_seqlen if memory_seqlen is None else memory_seqlen
        return CrossAttentionCache.allocate(batch_size, M, self.num_heads_kv, self.head_dim, self.head_dim,
                                            device=device, dtype=dtype)

    def _memory_kv(self, memory: torch.Tensor, memory_position_ids: torch.Tensor | None, B: int):
        owner = type(self).__name__
        if not isinstance(memory, torch.Tensor) or not memory.is_floating_point():
            raise TypeError(f"{owner}: memory must be a floating-point tensor, got {type(memory).__name__}")
        if memory.dim() != 3 or memory.shape[0] != B or memory.shape[-1] != self.kdim:
            raise ValueError(f"{owner}: memory must be [B, M, Dm] = [{B}, M, {self.kdim}], got {tuple(memory.shape)}")
        if memory.shape[1] == 0:
            raise ValueError(f"{owner}: memory must be non-empty (M > 0), got shape {tuple(memory.shape)}")
        if memory.device != self.kv_proj.weight.device:
            raise ValueError(f"{owner}: memory is on {memory.device} but the module is on {self.kv_proj.weight.device}")
        memory = to_module_dtype(memory, self.kv_proj.weight.dtype)
        M = memory.shape[1]
        pos = memory_position_ids
        if pos is not None:
            if not isinstance(pos, torch.Tensor) or pos.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{owner}: memory_position_ids must be an int32 or int64 tensor, got "
                                f"{pos.dtype if isinstance(pos, torch.Tensor) else type(pos).__name__}")
            if tuple(pos.shape) not in ((M,), (B, M), (1, M)):
                raise ValueError(f"{owner}: memory_position_ids must have shape [M] or [B, M] = [{B}, {M}], got "
                                 f"{tuple(pos.shape)}")
        Hkv, K = self.num_heads_kv, self.head_dim
        k, v = self.kv_proj(memory).view(B, M, 2, Hkv, K).unbind(dim=2)
        if self.rotary_emb is not None:
            k = self.rotary_emb.rotate(k, rope_positions(memory_position_ids, token_index(None, M, memory.device)))
        return k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, M, K]

    def _fill(self, cache: CrossAttentionCache, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None):
        owner = type(self).__name__
        M = k.shape[2]
        if M > cache.max_seqlen:
            raise ValueError(f"{owner}: a memory of M={M} tokens does not fit the cache (M <= {cache.max_seqlen})")
        cache.k.zero_()
        cache.v.zero_()
        cache.k[:, :, :M] = k.to(cache.k.dtype)
        cache.v[:, :, :M] = v.to(cache.v.dtype)
        cache.key_valid.zero_()
        cache.key_valid[:, :M] = True if key_valid is None else key_valid
        cache.filled = True

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, cache: CrossAttentionCache | None = None,
                *, mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
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
        check_input(owner, x, self.embed_dim, device=self.q_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.q_proj.weight.dtype)
        B, T, _ = x.shape
        check_position_ids(owner, position_ids, B, T)
        if cache is not None:
            check_cache(owner, cache, CrossAttentionCache, B, x.device)
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, K = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, K)
        if self.rotary_emb is not None:
            q = self.rotary_emb.rotate(q, rope_positions(position_ids, token_index(cache, T, x.device)))
        q = q.transpose(1, 2)
        if cache is not None and cache.filled and memory is None:
            k, v, key_valid, attn_mask = cache.k.to(q.dtype), cache.v.to(q.dtype), cache.key_valid, None
        else:
            if memory is None:
                raise ValueError(f"{owner}: memory is required (the cache holds no memory keys yet)")
            k, v = self._memory_kv(memory, memory_position_ids, B)
            key_valid, attn_mask = split_mask(owner, mask, B, T, k.shape[2])
            if cache is not None:
                if attn_mask is not None:
                    raise ValueError(f"{owner}: with a cache, mask must be a [B, M] memory-padding mask")
                self._fill(cache, k, v, key_valid)
                k, v, key_valid = cache.k.to(q.dtype), cache.v.to(q.dtype), cache.key_valid
        out = self.attend(q, k, v, causal=False, window=None, q_pos=None, kv_pos=None, key_valid=key_valid,
                          attn_mask=attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * K)).to(in_dtype)
