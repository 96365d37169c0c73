"""Kernelized linear attention (Katharopoulos et al., 2020) as a mixer of its own: ``"linear_attention"``.

With a feature map phi (``elu`` + 1 by default) the causal form is a recurrence over a [K, V] state::

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t),   y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

Training runs the chunked parallel form (``chunk_size`` tokens at a time, ``ops.attention.linear``);
decoding carries (S, z) in a ``LinearAttentionCache``, so a step costs O(1) in the sequence length.
It is a different function from softmax attention: no scores exist to mask, modify, bias or drop, so
windows, score / mask mods, ALiBi and attention dropout are not offered (``ValueError``).

``MHA(..., attention_type="linear")`` is an alias that builds this class (see ``from_mha_arguments``).
The parameters have MHA's names (``in_proj``, ``out_proj``, ``rotary_emb``), so a state dict saved from
an MHA built that way loads into it unchanged.

Inputs follow ``mha.py``: ``mask`` is a [B, T] bool key-padding mask only (True = a real token),
``position_ids`` set the RoPE angles, ``lengths`` [B] mark each row's valid prefix.

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads, K head width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqblocks.layers.attention.cache import LinearAttentionCache
from seqblocks.layers.attention.common import (
    check_position,
    intersect_valid,
    make_rotary,
    resolve_heads,
    rope_positions,
    rotary_of,
    split_mask,
    token_index,
)
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
from seqblocks.layers.finite import nonfinite_tokens, poison, poisoned_from, zero_nonfinite
from seqblocks.layers.mixer import Mixer
from seqblocks.layers.position import PositionBase
from seqblocks.ops.attention import FEATURE_MAPS, linear_attention
from seqblocks.registry import MIXERS

__all__ = ["LinearAttention"]

# MHA options that only softmax attention has, with the value that means "not used".
_SOFTMAX_ONLY = {"window_size": None, "score_mod": None, "mask_mod": None, "dropout": 0.0, "softmax_scale": None,
                 "qk_norm": False, "softcap": None, "mlp_dim": 0, "d_conv": 0, "attention_fn": None}


@MIXERS.register("linear_attention")
class LinearAttention(Mixer):
    """Causal (or bidirectional) kernelized linear attention with grouped key/value heads.

    Args:
        embed_dim (int): model width D.
        num_heads (int): query heads H. Required (a ValueError says so when missing).
        num_heads_kv (int | None): key/value heads Hkv; must divide num_heads. Default: None (= num_heads).
        head_dim (int | None): width of a head. Default: None (= embed_dim // num_heads).
        qkv_proj_bias (bool): bias in the fused q/k/v projection. Default: True.
        out_proj_bias (bool): bias in the output projection. Default: True.
        causal (bool): causal (recurrent) form; False lets every query see every key (no cache).
            Default: True.
        layer_idx (int | None): position of the layer in a model. Default: None.
        rotary_emb_dim (int): RoPE on the first rotary_emb_dim channels of q and k; 0 disables. Default: 0.
        rotary_emb_base (float): RoPE base. Default: 10000.0.
        rotary_emb_interleaved (bool): GPT-J pair layout instead of halves. Default: False.
        chunk_size (int): tokens per chunk of the parallel form (speed only; outputs do not depend on
            it). Default: 64.
        feature_map (str): phi: "elu" (elu + 1), "relu" or "identity". Default: "elu".
        position (PositionBase | None): a block's rotary position module; bias positions (ALiBi) are
            refused. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: missing / inconsistent sizes, a chunk size that is not a positive int, an unknown
            feature map, a bias position.
    """

    inputs = frozenset({"mask", "position_ids", "lengths"})
    #: The name of this function among MHA's ``attention_type`` values (MHA's alias builds this class).
    attention_type = "linear"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int | None = None,
        num_heads_kv: int | None = None,
        head_dim: int | None = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        causal: bool = True,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        *,
        chunk_size: int = 64,
        feature_map: str = "elu",
        position: PositionBase | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        num_heads, num_heads_kv, head_dim = resolve_heads(owner, embed_dim, num_heads, num_heads_kv, head_dim)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"{owner}: chunk_size={chunk_size!r} must be a positive int")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"{owner}: feature_map={feature_map!r}; expected one of {FEATURE_MAPS}")
        check_position(owner, position, num_heads)
        if position is not None and position.kind == "bias":
            raise ValueError(f"{owner}: linear attention (kernelized, no softmax scores) cannot apply a bias "
                             f"position ({type(position).__name__}); use RoPE or an additive position")
        self.embed_dim, self.num_heads, self.num_heads_kv, self.head_dim = embed_dim, num_heads, num_heads_kv, head_dim
        self.causal, self.layer_idx = causal, layer_idx
        self.chunk_size, self.feature_map = chunk_size, feature_map
        self.position = position
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(embed_dim, (num_heads + 2 * num_heads_kv) * head_dim, bias=qkv_proj_bias,
                                 **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb = make_rotary(owner, head_dim, rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved,
                                      position, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()

    @property
    def rotary(self) -> nn.Module | None:
        return rotary_of(self.rotary_emb, self.position)

    @classmethod
    def from_mha_arguments(cls, owner: str, arguments: dict[str, Any]) -> LinearAttention:
        """Build from ``MHA``'s constructor arguments (by name), as ``MHA(..., attention_type="linear")`` does.

        ``linear_attention_chunk_size`` and ``linear_feature_map`` become ``chunk_size`` and
        ``feature_map``; ``attention_block_size`` (a softmax backend's block) is not used. The
        softmax-only options must keep their unused values.

        Raises:
            ValueError: a window, score / mask mod, dropout or softmax scale was given (``owner`` names
                the class the user called).
        """
        args = dict(arguments)
        args.pop("attention_type", None)
        args.pop("attention_block_size", None)
        args.pop("qk_norm_eps", None)  # serves qk_norm only, which linear attention refuses
        bad = [name for name, unused in _SOFTMAX_ONLY.items() if args.pop(name, unused) != unused]
        if bad:
            raise ValueError(f"{owner}: attention_type='linear' (kernelized, no softmax scores) cannot apply "
                             f"{bad}")
        if "linear_attention_chunk_size" in args:
            args["chunk_size"] = args.pop("linear_attention_chunk_size")
        if "linear_feature_map" in args:
            args["feature_map"] = args.pop("linear_feature_map")
        return cls(**args)

    @classmethod
    def from_config(cls, config, position: PositionBase | None = None, **kwargs: Any) -> LinearAttention:
        """Build from a ``BlockConfig``: n_heads, n_kv_heads, head_dim, bias, causal,
        linear_attention_chunk_size, plus ``config.mixer_kwargs`` and ``kwargs`` (which win).

        Raises:
            ValueError: the config asks for what linear attention cannot do: a window, attention
                dropout (set ``attention_dropout=0.0`` to keep sublayer dropout), or a softmax backend
                in ``attention_type``.
        """
        owner = cls.__name__
        if config.window_size is not None:
            raise ValueError(f"{owner}: linear attention has no sliding window (BlockConfig.window_size="
                             f"{config.window_size})")
        if config.effective_attention_dropout > 0:
            raise ValueError(f"{owner}: linear attention has no attention probabilities to drop "
                             f"(attention dropout {config.effective_attention_dropout}); set "
                             f"BlockConfig.attention_dropout=0.0")
        if config.qk_norm or config.attn_logit_softcapping is not None:
            raise ValueError(f"{owner}: linear attention takes no qk_norm / attn_logit_softcapping (BlockConfig."
                             f"qk_norm={config.qk_norm}, attn_logit_softcapping={config.attn_logit_softcapping})")
        if config.attention_type not in ("auto", "linear"):
            raise ValueError(f"{owner}: BlockConfig.attention_type={config.attention_type!r} is a softmax "
                             f"backend; linear attention takes 'auto' or 'linear'")
        args: dict[str, Any] = dict(
            num_heads=config.n_heads, num_heads_kv=config.n_kv_heads, head_dim=config.head_dim,
            qkv_proj_bias=config.bias, out_proj_bias=config.bias, causal=config.causal,
            chunk_size=config.linear_attention_chunk_size, position=position,
        )
        args.update(config.mixer_kwargs)
        args.update(kwargs)
        return cls(config.d_model, **args)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_heads_kv={self.num_heads_kv}, "
                f"head_dim={self.head_dim}, causal={self.causal}, chunk_size={self.chunk_size}, "
                f"feature_map={self.feature_map!r}")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> LinearAttentionCache:
        """A ``LinearAttentionCache``: the (S, z) state in fp32 (float64 for a float64 model)."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: a non-causal attention cannot decode with a cache "
                             f"(each step would have to see future tokens)")
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        w = self.in_proj.weight
        return LinearAttentionCache.allocate(batch_size, max_seqlen, self.num_heads_kv, self.head_dim,
                                             self.head_dim, device=w.device, dtype=dtype or w.dtype)

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache | None = None, *,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]; with a cache, continue its stream and update it in place.

        Args:
            mask (Tensor | None): [B, T] bool key padding (True = a real token). Default: None.
            position_ids (Tensor | None): [T] or [B, T] RoPE positions. Default: the token indices.
            lengths (Tensor | None): [B] valid prefix of each row; later tokens do not enter the state
                and output 0. Default: None.
        """
        owner = type(self).__name__
        check_input(owner, x, self.embed_dim, device=self.in_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.in_proj.weight.dtype)
        B, T, _ = x.shape
        check_lengths(owner, lengths, B, T)
        check_position_ids(owner, position_ids, B, T)
        if cache is not None:
            check_cache(owner, cache, LinearAttentionCache, B, x.device)
            if not self.causal:
                raise ValueError(f"{owner}: a non-causal attention cannot decode with a cache")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        q, k, v = self.in_proj(x).split((H * K, Hkv * K, Hkv * K), dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
        rotary = self.rotary
        if rotary is not None:
            pos = rope_positions(position_ids, token_index(cache, T, x.device))
            q, k = rotary.rotate_qk(q, k, pos)
        # The chunked form multiplies masked (future, padded) keys by 0, and 0 * NaN = NaN: zero non-finite
        # values first, then poison the outputs from them on and the state (seqblocks.layers.finite).
        bad_q, bad_kv = nonfinite_tokens(q), nonfinite_tokens(k, v)
        q, k, v = zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, K]
        key_valid, attn_mask = split_mask(owner, mask, B, T, T)
        if attn_mask is not None:
            raise ValueError(f"{owner}: linear attention takes a [B, T] bool key-padding mask only, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        length_valid = lengths_mask(lengths, T, x.device)
        key_valid = intersect_valid(key_valid, length_valid)
        bad_key = bad_kv if key_valid is None else bad_kv & key_valid
        if cache is None:
            out, _ = linear_attention(q, k, v, causal=self.causal, chunk_size=self.chunk_size,
                                      feature=self.feature_map, key_valid=key_valid)
        else:
            cache.check_capacity(T, owner)
            out, (S, z) = linear_attention(q, k, v, causal=True, chunk_size=self.chunk_size,
                                           feature=self.feature_map, key_valid=key_valid,
                                           initial_state=(cache.state, cache.normalizer))
            row_bad = bad_key.any(1)
            cache.state.copy_(S.masked_fill(row_bad.view(B, *([1] * (S.dim() - 1))), float("nan")))
            cache.normalizer.copy_(z.masked_fill(row_bad.view(B, *([1] * (z.dim() - 1))), float("nan")))
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        y = self.out_proj(out.transpose(1, 2).reshape(B, T, H * K))
        y = poison(y, poisoned_from(bad_key, causal=self.causal) | bad_q)
        if length_valid is not None:
            y = y.masked_fill(~length_valid[..., None], 0.0)
        return y.to(in_dtype)
