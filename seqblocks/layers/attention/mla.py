"""Multi-head latent attention (MLA, DeepSeek-V2): keys and values from a small cached latent.

Per token, MLA computes a compressed latent ``c_kv = norm(W_dkv x)`` of width R = ``kv_lora_rank`` and
a decoupled rotary key ``k_pe`` of width P = ``qk_rope_head_dim`` shared by all heads; per-head keys and
values are up-projections of the latent (``[k_nope, v] = W_ukv c_kv``). Queries are full-rank or,
with ``q_lora_rank``, also low-rank (``W_uq norm(W_dq x)``), and split into ``q_nope`` and a rotary
``q_pe``. The score of head h is ``(q_nope . k_nope + q_pe . k_pe) * (Kn + P) ** -0.5``.

The decoding cache (``MLACache``) stores only ``c_kv`` and the rotated ``k_pe``: R + P numbers per
token instead of 2 * H * K. Each call up-projects the cached latents it attends to (the "naive" MLA
form; the weight-absorbed form is an optimisation of the same function).

Shapes: B batch, T time, D width, H heads, R kv_lora_rank, Rq q_lora_rank, Kn qk_nope_head_dim,
P qk_rope_head_dim, V v_head_dim, S cache slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.cache import host_sync_unsafe
from seqblocks.layers.attention.cache import MLACache
from seqblocks.layers.attention.common import (
    AttentionCore,
    context_parallel_poisoned,
    intersect_valid,
    poisoned_queries,
    rope_positions,
    split_mask,
    token_index,
)
from seqblocks.layers.attention.paged import PagedMLACache
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_input,
    check_lengths,
    check_position_ids,
    check_positive,
    check_range,
    is_empty,
    lengths_mask,
    to_module_dtype,
)
from seqblocks.layers.finite import nonfinite_tokens, poison, zero_nonfinite
from seqblocks.layers.mixer import active_context_parallel
from seqblocks.layers.norm import RMSNorm
from seqblocks.layers.position import PositionBase, RotaryEmbedding
from seqblocks.parallel.attention import global_positions
from seqblocks.registry import MIXERS

__all__ = ["MLA"]


@MIXERS.register("mla")
class MLA(AttentionCore):
    """Multi-head latent attention with a latent KV cache.

    Args:
        d_model (int): model width D.
        num_heads (int): heads H.
        kv_lora_rank (int | None): latent width R. Default: None (= 4 * qk_nope_head_dim, DeepSeek-V2's
            512 for 128-wide heads).
        q_lora_rank (int | None): low-rank query width; None keeps full-rank queries. Default: None.
        qk_nope_head_dim (int | None): per-head non-rotary query/key width. Default: None (= D // H).
        qk_rope_head_dim (int | None): decoupled rotary width P (even). Default: None
            (= qk_nope_head_dim // 2 rounded to even, at least 2).
        v_head_dim (int | None): per-head value width. Default: None (= qk_nope_head_dim).
        causal (bool): causal attention. Default: True.
        rope_base (float): RoPE base of the decoupled keys. Default: 10000.0.
        softmax_scale (float | None): Default: None ((Kn + P) ** -0.5).
        bias (bool): biases in the projections. Default: False.
        layer_idx (int | None): Default: None.
        attention_type (str): "auto", "standard", "memory_efficient", "flash", "flex". Default: "auto".
        attention_block_size (int): key block of "memory_efficient". Default: 128.
        dropout (float): attention dropout, training only. Default: 0.0.
        score_mod, mask_mod (Callable | None): as ``MHA``. Default: None.
        position (PositionBase | None): an ALiBi module adds its bias; a rotary one is ignored (MLA
            rotates its decoupled keys itself). Default: None.
        norm_eps (float): eps of the latent RMSNorms. Default: 1e-6.
        device, dtype: parameter placement. Default: None.
    """

    inputs = frozenset({"mask", "position_ids", "lengths"})
    # Under context parallelism each rank projects its own tokens and attends over the whole sequence
    # (AttentionCore.attend_context_parallel, global positions); the per-head keys and values travel.
    context_parallel = "native"

    def __init__(
        self,
        d_model: int,
        num_heads: int | None = None,
        kv_lora_rank: int | None = None,
        q_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        causal: bool = True,
        rope_base: float = 10000.0,
        softmax_scale: float | None = None,
        bias: bool = False,
        layer_idx: int | None = None,
        *,
        attention_type: str = "auto",
        attention_block_size: int = 128,
        dropout: float = 0.0,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        position: PositionBase | None = None,
        norm_eps: float = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads is None:
            raise ValueError(f"MLA needs a positive num_heads, got {num_heads!r}")
        check_positive("MLA", d_model=d_model, num_heads=num_heads)
        check_range("MLA", "rope_base", rope_base, 0.0, lo_open=True)
        check_range("MLA", "norm_eps", norm_eps, 0.0, lo_open=True)
        if attention_type == "linear":
            raise ValueError("MLA: attention_type='linear' is not offered (MLA is softmax attention)")
        if qk_nope_head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"MLA: d_model={d_model} is not a multiple of num_heads={num_heads}; set "
                                 f"qk_nope_head_dim")
            qk_nope_head_dim = d_model // num_heads
        check_positive("MLA", qk_nope_head_dim=qk_nope_head_dim)
        if qk_rope_head_dim is None:
            qk_rope_head_dim = max(2, (qk_nope_head_dim // 2) // 2 * 2)
        check_positive("MLA", qk_rope_head_dim=qk_rope_head_dim)
        if qk_rope_head_dim % 2:
            raise ValueError(f"MLA: qk_rope_head_dim={qk_rope_head_dim} must be positive and even")
        kv_lora_rank = 4 * qk_nope_head_dim if kv_lora_rank is None else kv_lora_rank
        v_head_dim = qk_nope_head_dim if v_head_dim is None else v_head_dim
        check_positive("MLA", kv_lora_rank=kv_lora_rank, v_head_dim=v_head_dim)
        if q_lora_rank is not None:
            check_positive("MLA", q_lora_rank=q_lora_rank)
        if position is not None and position.kind == "rotary":
            position = None  # MLA's decoupled RoPE is its rotary encoding
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.init_core(num_heads=num_heads, attention_type=attention_type, attention_block_size=attention_block_size,
                       dropout=dropout, score_mod=score_mod, mask_mod=mask_mod,
                       softmax_scale=qk_dim**-0.5 if softmax_scale is None else softmax_scale,
                       window_size=None, position=position)
        self.d_model, self.causal, self.layer_idx = d_model, causal, layer_idx
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        factory = {"device": device, "dtype": dtype}
        H = num_heads
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, H * qk_dim, bias=bias, **factory)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias, **factory)
            self.q_a_norm = RMSNorm(q_lora_rank, eps=norm_eps, **factory)
            self.q_b_proj = nn.Linear(q_lora_rank, H * qk_dim, bias=False, **factory)
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias, **factory)
        self.kv_a_norm = RMSNorm(kv_lora_rank, eps=norm_eps, **factory)
        self.kv_b_proj = nn.Linear(kv_lora_rank, H * (qk_nope_head_dim + v_head_dim), bias=False, **factory)
        self.out_proj = nn.Linear(H * v_head_dim, d_model, bias=bias, **factory)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, base=rope_base, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @classmethod
    def from_config(cls, config, position: PositionBase | None = None, **kwargs: Any) -> MLA:
        """Build from a ``BlockConfig``: n_heads, kv_lora_rank, q_lora_rank, rope_dim, head_dim (as
        qk_nope_head_dim), rope_theta, bias, causal, attention_type, attention_block_size, dropout, ``mup``
        (softmax_scale = 1 / (qk_nope_head_dim + qk_rope_head_dim))."""
        if config.window_size is not None:
            raise ValueError(f"MLA does not take a sliding window (BlockConfig.window_size={config.window_size})")
        if config.qk_norm or config.attn_logit_softcapping is not None:
            raise ValueError(f"MLA does not take qk_norm / attn_logit_softcapping (BlockConfig.qk_norm="
                             f"{config.qk_norm}, attn_logit_softcapping={config.attn_logit_softcapping})")
        args: dict[str, Any] = dict(
            num_heads=config.n_heads, kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank,
            qk_nope_head_dim=config.head_dim, qk_rope_head_dim=config.rope_dim, rope_base=config.rope_theta,
            bias=config.bias, causal=config.causal, attention_type=config.attention_type,
            attention_block_size=config.attention_block_size, dropout=config.effective_attention_dropout,
            position=position, norm_eps=config.norm_eps,
        )
        args.update(config.mixer_kwargs)
        args.update(kwargs)
        mla = cls(config.d_model, **args)
        if config.mup and args.get("softmax_scale") is None:
            # muP: 1 / qk_dim instead of qk_dim ** -0.5 (qk_dim is known once the defaults are resolved).
            mla.softmax_scale = 1.0 / (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        return mla

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"q_lora_rank={self.q_lora_rank}, qk_nope={self.qk_nope_head_dim}, "
                f"qk_rope={self.qk_rope_head_dim}, v={self.v_head_dim}, causal={self.causal}")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> MLACache:
        """An ``MLACache`` of the latents (R + P numbers per token)."""
        if not self.causal:
            raise ValueError("MLA: a non-causal attention cannot decode with a cache")
        check_allocation("MLA", batch_size, max_seqlen, dtype)
        w = self.kv_a_proj.weight
        return MLACache.allocate(batch_size, max_seqlen, self.kv_lora_rank, self.qk_rope_head_dim,
                                 device=w.device, dtype=dtype or w.dtype)

    def allocate_paged_cache(self, block_table: torch.Tensor, num_pages: int, page_size: int, max_seqlen: int,
                             dtype: torch.dtype | None = None) -> PagedMLACache:
        """A ``PagedMLACache`` over ``block_table`` [B, max_pages] with a pool of ``num_pages`` pages."""
        if not self.causal:
            raise ValueError("MLA: a non-causal attention cannot decode with a cache")
        w = self.kv_a_proj.weight
        return PagedMLACache.allocate_paged(block_table, num_pages, page_size, max_seqlen, self.kv_lora_rank,
                                            self.qk_rope_head_dim, device=w.device, dtype=dtype or w.dtype)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cache: MLACache | None = None, *, mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]; cache, mask, position_ids, lengths as ``MHA`` (context
        parallelism too: x is this rank's chunk, positions are global, ``lengths`` the whole sequence's)."""
        cp = active_context_parallel("MLA", cache)
        check_input("MLA", x, self.d_model, device=self.kv_a_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.kv_a_proj.weight.dtype)
        B, T, _ = x.shape
        check_lengths("MLA", lengths, B, T if cp is None else T * cp.world_size)
        check_position_ids("MLA", position_ids, B, T)
        if cache is not None:
            check_cache("MLA", cache, MLACache, B, x.device)
            if not self.causal:
                raise ValueError("MLA: a non-causal attention cannot decode with a cache")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, Kn, P, V = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        R = self.kv_lora_rank
        index = token_index(cache, T, x.device) if cp is None else global_positions(T, x.device, cp)[None]
        rope_pos = rope_positions(position_ids, index)
        q = self._queries(x).view(B, T, H, Kn + P)
        q_nope, q_pe = q.split((Kn, P), dim=-1)
        q = torch.cat((q_nope, self.rotary.rotate(q_pe, rope_pos)), dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split((R, P), dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # [B, T, R]
        k_pe = self.rotary.rotate(k_pe[:, :, None], rope_pos)[:, :, 0]  # [B, T, P]
        # Non-finite values are zeroed here (and so cached zeroed); the queries they reach are poisoned below.
        bad_q, bad_kv = nonfinite_tokens(q), nonfinite_tokens(c_kv, k_pe)
        q, c_kv, k_pe = zero_nonfinite(q), zero_nonfinite(c_kv), zero_nonfinite(k_pe)
        key_valid, attn_mask = split_mask("MLA", mask, B, T, T)
        length_valid = lengths_mask(lengths, T, x.device) if cp is None or lengths is None else (
            index < lengths.to(x.device)[:, None])
        key_valid = intersect_valid(key_valid, length_valid)
        bad_key = bad_kv if key_valid is None else bad_kv & key_valid
        if cp is not None:
            if attn_mask is not None:
                raise ValueError("MLA: under context parallelism mask must be this rank's [B, T_local] bool "
                                 "key-padding chunk; a full mask does not split along time")
            poisoned, key_valid = context_parallel_poisoned(cp, bad_key, key_valid, causal=self.causal, window=None)
            k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, Kn + V).split((Kn, V), dim=-1)
            k = torch.cat((k_nope, k_pe[:, :, None].expand(B, T, H, P)), dim=-1)
            out = self.attend_context_parallel(cp, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=self.causal, window=None, key_valid=key_valid)
            y = poison(self.out_proj(out.transpose(1, 2).reshape(B, T, H * V)), poisoned | bad_q)
            if length_valid is not None:
                y = y.masked_fill(~length_valid[..., None], 0.0)
            return y.to(in_dtype)
        poisoned, last = poisoned_queries(bad_key, index, causal=self.causal, window=None,
                                          prior=None if cache is None else cache.nonfinite_last)
        q_pos = None
        if cache is not None:
            cache.nonfinite_last.copy_(last[:, -1])
            if attn_mask is not None:
                raise ValueError("MLA: with a cache, mask must be a [B, T] key-padding mask")
            S = cache.capacity
            if not host_sync_unsafe():
                cache.check_capacity(T, "MLA")
                used = int(cache.seqlen_offset.max()) + T
                S = used if used == T or not self.static_kv(x) else S
            cache.write(index, c_kv, k_pe, key_valid if key_valid is not None
                        else torch.ones(B, T, dtype=torch.bool, device=x.device))
            if not (S == T and key_valid is None):
                # Otherwise (an empty cache, no padding) this call's latents are all there is to attend to.
                c_kv, k_pe, key_valid = cache.read(S, T)  # a paged cache gathers its pages here
                c_kv, k_pe, q_pos = c_kv.to(x.dtype), k_pe.to(x.dtype), index
        Tk = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, Tk, H, Kn + V).split((Kn, V), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, Tk, H, P)), dim=-1)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=self.causal,
                           window=None, q_pos=q_pos, kv_pos=None, key_valid=key_valid, attn_mask=attn_mask)
        if cache is not None:
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        y = poison(self.out_proj(out.transpose(1, 2).reshape(B, T, H * V)), poisoned | bad_q)
        if length_valid is not None:
            y = y.masked_fill(~length_valid[..., None], 0.0)
        return y.to(in_dtype)
