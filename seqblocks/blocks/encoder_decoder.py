"""``EncoderBlock`` and ``DecoderBlock``: transformer encoder / decoder blocks with score mods and attention backends.

EncoderBlock: self-attention then a feed-forward network, each with a residual connection and a norm::

    pre_norm=True:  x = x + attn(ln1(x));            x = x + ffn(ln2(x))
    pre_norm=False: x = ln1(x + attn(x));            x = ln2(x + ffn(x))

DecoderBlock adds cross-attention to an encoder output ("memory") between the two, with a third norm::

    pre_norm=True:  x = x + self_attn(ln1(x)); x = x + cross_attn(ln2(x), memory); x = x + ffn(ln3(x))

The textbook pre-LN block (two LayerNorms, Dense -> ReLU -> Dense) is
``EncoderBlock(d_model, num_heads, d_ff, pre_norm=True, norm_type="layer_norm", ff_activation="relu")``;
its attribute names ``ln1, attn, ln2, ff1, ff2`` are kept.

Self-attention is an ``MHA`` (GQA with ``num_kv_heads``, RoPE with ``use_rope``, a causal sliding
window with ``attention_window``, ``score_mod``); the decoder's self-attention is causal and cached, its
cross-attention K/V are computed once per memory and cached. Dropout (``dropout_rate``) acts on the
attention probabilities and on each sublayer's output, in training mode only.

Shapes: B batch, T time, D width, M memory length, F FFN width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.attention import CrossAttention
from seqblocks.layers.attention.mha import MHA
from seqblocks.layers.attention.score_mods import mod_kind
from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixer import run_mixer
from seqblocks.layers.position import ALiBi
from seqblocks.registry import NORMS

__all__ = ["EncoderBlock", "DecoderBlock", "DecoderCache", "FF_ACTIVATIONS", "FeedForward", "block_norm"]


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
    "tanh": torch.tanh, "relu2": _relu2,
}
_GATED = {"swiglu": F.silu, "geglu": F.gelu}
FF_ACTIVATIONS = tuple(_ACTIVATIONS) + tuple(_GATED)


class FeedForward(nn.Module):
    """ff2(act(ff1(x))), or ff2(act(gate) * up) with [gate, up] = ff1(x) for the gated activations."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        if activation not in FF_ACTIVATIONS:
            raise ValueError(f"ff_activation={activation!r} is unknown; expected one of {FF_ACTIVATIONS}")
        self.gated = activation in _GATED
        self.activation_name = activation
        self.act = _GATED[activation] if self.gated else _ACTIVATIONS[activation]
        factory = {"device": device, "dtype": dtype}
        self.ff1 = nn.Linear(d_model, (2 if self.gated else 1) * d_ff, bias=bias, **factory)
        self.ff2 = nn.Linear(d_ff, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ff1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.ff2(self.act(gate) * up)
        return self.ff2(self.act(h))


def block_norm(norm_type: str, d_model: int, eps: float, device, dtype) -> nn.Module:
    """The norm registry's ``norm_type`` over ``d_model`` features (the blocks' norms)."""
    return NORMS.get(norm_type)(d_model, eps=eps, device=device, dtype=dtype)


def _split_mod(score_mod, mask_mod):
    """Callers may give a mask mod as ``score_mod`` (one argument for both); it is routed to ``mask_mod``."""
    if score_mod is not None and mod_kind(score_mod) == "mask":
        if mask_mod is not None:
            raise ValueError("score_mod is a mask mod and mask_mod is also given; pass one mask mod")
        return None, score_mod
    return score_mod, mask_mod


def _call_mod(score_mod) -> dict[str, Any]:
    """The per-call ``score_mod`` keyword for the attention (none when not given: linear attention takes none)."""
    return {} if score_mod is None else {"score_mod": score_mod}


class _BlockBase(nn.Module):
    def _common(self, *, d_model, num_heads, d_ff, dropout_rate, pre_norm, attention_type, attention_block_size,
                linear_attention_chunk_size, norm_type, ff_activation, num_kv_heads, attention_window, score_mod,
                mask_mod, use_rope, rope_base, rope_max_positions, causal, alibi, bias, norm_eps, layer_idx,
                device, dtype, attention_fn=None) -> dict[str, Any]:
        owner = type(self).__name__
        check_positive(owner, d_model=d_model, num_heads=num_heads, d_ff=d_ff, rope_max_positions=rope_max_positions)
        check_range(owner, "norm_eps", norm_eps, 0.0, lo_open=True)
        if d_model % num_heads:
            raise ValueError(f"{owner}: d_model={d_model} must be a multiple of num_heads={num_heads}")
        check_range(owner, "dropout_rate", dropout_rate, 0.0, 1.0, hi_open=True)
        if use_rope and alibi:
            raise ValueError(f"{owner}: use_rope and alibi are exclusive")
        self.d_model, self.num_heads, self.d_ff = d_model, num_heads, d_ff
        self.pre_norm, self.dropout_rate = pre_norm, dropout_rate
        self.use_rope, self.rope_max_positions, self.layer_idx = use_rope, rope_max_positions, layer_idx
        score_mod, mask_mod = _split_mod(score_mod, mask_mod)
        head_dim = d_model // num_heads
        return dict(
            num_heads=num_heads, num_heads_kv=num_kv_heads, qkv_proj_bias=bias, out_proj_bias=bias,
            causal=causal or attention_window is not None, layer_idx=layer_idx,
            rotary_emb_dim=head_dim if use_rope else 0, rotary_emb_base=rope_base, window_size=attention_window,
            attention_type=attention_type, attention_block_size=attention_block_size,
            linear_attention_chunk_size=linear_attention_chunk_size,
            # Kernelized attention has no probabilities to drop; dropout_rate still acts on the sublayer outputs.
            dropout=0.0 if attention_type == "linear" else dropout_rate, score_mod=score_mod,
            mask_mod=mask_mod, position=ALiBi(num_heads, device=device) if alibi else None, device=device,
            dtype=dtype, **({} if attention_fn is None else {"attention_fn": attention_fn}),
        )

    def _check_length(self, T: int, cache) -> None:
        if self.use_rope and cache is None and T > self.rope_max_positions:
            raise ValueError(f"{type(self).__name__}: sequence of {T} tokens exceeds rope_max_positions="
                             f"{self.rope_max_positions}")

    def _check_cache_len(self, max_seqlen: int) -> None:
        if self.use_rope and max_seqlen > self.rope_max_positions:
            raise ValueError(f"{type(self).__name__}: max_seqlen={max_seqlen} exceeds rope_max_positions="
                             f"{self.rope_max_positions}")


class EncoderBlock(_BlockBase):
    """Transformer encoder block: self-attention and FFN sublayers with residuals and norms.

    Args:
        d_model (int): model width.
        num_heads (int): query heads.
        d_ff (int): FFN hidden width.
        dropout_rate (float): dropout on attention probabilities (none under ``attention_type="linear"``,
            which has none) and sublayer outputs (training only).
            Default: 0.0.
        pre_norm (bool): pre-norm layout when True, post-norm otherwise. Default: True.
        attention_type (str): "auto", "standard", "memory_efficient", "flash", "flex" or "linear".
            Default: "auto".
        attention_block_size (int): key block of "memory_efficient". Default: 128.
        linear_attention_chunk_size (int): chunk of "linear". Default: 64.
        norm_type (str): norm registry name: "layer_norm" (or "layer"), "rms_norm" (or "rms"). Default: "layer_norm".
        ff_activation (str): "relu", "gelu", "gelu_tanh", "silu", "tanh", "relu2", or the gated
            "swiglu" / "geglu". Default: "gelu".
        num_kv_heads (int | None): key/value heads (GQA / MQA). Default: None (= num_heads).
        attention_window (int | None): causal sliding-window size (makes the attention causal).
            Default: None.
        score_mod (Callable | None): score mod of the self-attention (a mask mod is accepted too).
            Default: None.
        use_rope (bool): RoPE on the self-attention. Default: False.
        rope_base (float): RoPE base theta. Default: 10000.0.
        rope_max_positions (int): longest sequence the RoPE positions may reach (ValueError beyond).
            Default: 2048.
        causal (bool): causal self-attention (a decoder-only stack). Default: False.
        mask_mod (Callable | None): mask mod of the self-attention. Default: None.
        alibi (bool): ALiBi biases in the self-attention. Default: False.
        bias (bool): biases in the linear layers. Default: True.
        norm_eps (float): norm epsilon. Default: 1e-5.
        layer_idx (int | None): Default: None.
        attention_fn (Callable | None): a kernel of one's own for the attention,
            ``fn(query, key, value, *, mask, score_mod, dropout_rate, deterministic) -> out``
            (``seqblocks.layers.attention.attention_fn``). Default: None.
        device, dtype: parameter placement. Default: None.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout_rate: float = 0.0, pre_norm: bool = True,
                 attention_type: str = "auto", attention_block_size: int = 128,
                 linear_attention_chunk_size: int = 64, norm_type: str = "layer_norm", ff_activation: str = "gelu",
                 num_kv_heads: int | None = None, attention_window: int | None = None,
                 score_mod: Callable | None = None, use_rope: bool = False, rope_base: float = 10000.0,
                 rope_max_positions: int = 2048, *, causal: bool = False, mask_mod: Callable | None = None,
                 alibi: bool = False, bias: bool = True, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 attention_fn: Callable | None = None, device=None, dtype=None) -> None:
        super().__init__()
        attn_kwargs = self._common(
            d_model=d_model, num_heads=num_heads, d_ff=d_ff, dropout_rate=dropout_rate, pre_norm=pre_norm,
            attention_type=attention_type, attention_block_size=attention_block_size,
            linear_attention_chunk_size=linear_attention_chunk_size, norm_type=norm_type,
            ff_activation=ff_activation, num_kv_heads=num_kv_heads, attention_window=attention_window,
            score_mod=score_mod, mask_mod=mask_mod, use_rope=use_rope, rope_base=rope_base,
            rope_max_positions=rope_max_positions, causal=causal, alibi=alibi, bias=bias, norm_eps=norm_eps,
            layer_idx=layer_idx, device=device, dtype=dtype, attention_fn=attention_fn)
        self.ln1 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.attn = MHA(d_model, **attn_kwargs)
        self.ln2 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.ffn = FeedForward(d_model, d_ff, ff_activation, bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout_rate)

    @property
    def ff1(self) -> nn.Linear:
        return self.ffn.ff1

    @property
    def ff2(self) -> nn.Linear:
        return self.ffn.ff2

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Cache:
        """The self-attention's cache (causal blocks only)."""
        self._check_cache_len(max_seqlen)
        return self.attn.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Cache | None = None,
                position_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, score_mod: Callable | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. ``mask``: [B, T] key padding (True = real) or a full mask (see
        ``MHA``); ``cache``: the self-attention cache (causal blocks); ``lengths`` [B] valid prefixes;
        ``cu_seqlens`` [N + 1]: documents packed in x [1, total, D], each attending only to itself;
        ``score_mod``: a per-call score mod (or mask mod) on top of the block's own."""
        if cu_seqlens is None:
            self._check_length(x.shape[1], cache)
            kw = dict(cache=cache, mask=mask, position_ids=position_ids, lengths=lengths, **_call_mod(score_mod))

            def attn(h: torch.Tensor) -> torch.Tensor:
                return self.attn(h, **kw)
        else:  # positions restart per document: the longest document must fit
            self._check_length(int(cu_seqlens.diff().max()), cache)
            kw = dict(mask=mask, position_ids=position_ids, lengths=lengths, cu_seqlens=cu_seqlens)
            if score_mod is None:
                def attn(h: torch.Tensor) -> torch.Tensor:
                    return run_mixer(self.attn, h, cache, kw)
            else:  # a per-call mod: the softmax attention takes it along with cu_seqlens
                def attn(h: torch.Tensor) -> torch.Tensor:
                    return self.attn(h, cache, **kw, score_mod=score_mod)
        if self.pre_norm:
            x = x + self.dropout(attn(self.ln1(x)))
            return x + self.dropout(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.dropout(attn(x)))
        return self.ln2(x + self.dropout(self.ffn(x)))


@dataclasses.dataclass(eq=False)
class DecoderCache(Cache):
    """A DecoderBlock's caches: its self-attention KV cache and its cross-attention memory K/V.

    ``seqlen_offset`` is the self-attention cache's own tensor.
    """

    self_attn: Cache = None
    cross_attn: Cache = None

    def reset(self) -> None:
        self.self_attn.reset()
        self.cross_attn.reset()


class DecoderBlock(_BlockBase):
    """Transformer decoder block: causal self-attention (cached), cross-attention to the
    encoder output (its K/V computed once per memory), FFN; three norms.

    Args: those of ``EncoderBlock`` (``num_kv_heads``, ``attention_window``, ``score_mod``,
        ``use_rope`` apply to the self-attention; ``attention_fn`` to both attentions), plus
        memory_dim (int | None): width of the encoder output. Default: None (= d_model).

    The self-attention is always causal.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout_rate: float = 0.0, pre_norm: bool = True,
                 attention_type: str = "auto", attention_block_size: int = 128,
                 linear_attention_chunk_size: int = 64, norm_type: str = "layer_norm", ff_activation: str = "gelu",
                 num_kv_heads: int | None = None, attention_window: int | None = None,
                 score_mod: Callable | None = None, use_rope: bool = False, rope_base: float = 10000.0,
                 rope_max_positions: int = 2048, *, mask_mod: Callable | None = None, alibi: bool = False,
                 memory_dim: int | None = None, bias: bool = True, norm_eps: float = 1e-5,
                 layer_idx: int | None = None, attention_fn: Callable | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        attn_kwargs = self._common(
            d_model=d_model, num_heads=num_heads, d_ff=d_ff, dropout_rate=dropout_rate, pre_norm=pre_norm,
            attention_type=attention_type, attention_block_size=attention_block_size,
            linear_attention_chunk_size=linear_attention_chunk_size, norm_type=norm_type,
            ff_activation=ff_activation, num_kv_heads=num_kv_heads, attention_window=attention_window,
            score_mod=score_mod, mask_mod=mask_mod, use_rope=use_rope, rope_base=rope_base,
            rope_max_positions=rope_max_positions, causal=True, alibi=alibi, bias=bias, norm_eps=norm_eps,
            layer_idx=layer_idx, device=device, dtype=dtype, attention_fn=attention_fn)
        self.ln1 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.self_attn = MHA(d_model, **attn_kwargs)
        self.ln2 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        cross_type = "auto" if attention_type in ("linear", "lite") else attention_type
        self.cross_attn = CrossAttention(d_model, num_heads, num_kv_heads, kdim=memory_dim, qkv_proj_bias=bias,
                                         out_proj_bias=bias, layer_idx=layer_idx, attention_type=cross_type,
                                         attention_block_size=attention_block_size, dropout=dropout_rate,
                                         attention_fn=attention_fn, device=device, dtype=dtype)
        self.ln3 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.ffn = FeedForward(d_model, d_ff, ff_activation, bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout_rate)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, *,
                                 memory_seqlen: int, **kwargs: Any) -> DecoderCache:
        """Caches for ``max_seqlen`` decoder tokens and a memory of up to ``memory_seqlen`` tokens."""
        self._check_cache_len(max_seqlen)
        self_cache = self.self_attn.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
        cross = self.cross_attn.allocate_inference_cache(batch_size, memory_seqlen, dtype=dtype)
        return DecoderCache(seqlen_offset=self_cache.seqlen_offset, max_seqlen=max_seqlen, self_attn=self_cache,
                            cross_attn=cross)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: DecoderCache | None = None,
                position_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                score_mod: Callable | None = None) -> torch.Tensor:
        """Args:
            x (Tensor): [B, T, D] decoder states.
            memory (Tensor | None): [B, M, Dm] encoder output; None only when ``cache`` already holds
                its K/V.
            mask (Tensor | None): self-attention key padding [B, T] (or a full mask without a cache).
            memory_mask (Tensor | None): [B, M] bool memory padding (True = real token).
            cache (DecoderCache | None): from ``allocate_inference_cache``. Default: None.
            position_ids (Tensor | None): RoPE positions of the decoder tokens. Default: token indices.
            lengths (Tensor | None): [B] valid prefix of each decoder sequence. Default: None.
            score_mod (Callable | None): a per-call score mod (or mask mod) of the self-attention, on
                top of the block's own. Default: None.
        """
        self._check_length(x.shape[1], cache)
        sa_cache = None if cache is None else cache.self_attn
        ca_cache = None if cache is None else cache.cross_attn
        sa = dict(cache=sa_cache, mask=mask, position_ids=position_ids, lengths=lengths, **_call_mod(score_mod))
        ca = dict(memory=memory, cache=ca_cache, mask=memory_mask)
        if self.pre_norm:
            x = x + self.dropout(self.self_attn(self.ln1(x), **sa))
            x = x + self.dropout(self.cross_attn(self.ln2(x), **ca))
            return x + self.dropout(self.ffn(self.ln3(x)))
        x = self.ln1(x + self.dropout(self.self_attn(x, **sa)))
        x = self.ln2(x + self.dropout(self.cross_attn(x, **ca)))
        return self.ln3(x + self.dropout(self.ffn(x)))
