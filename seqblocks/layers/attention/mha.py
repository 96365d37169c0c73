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
- ``cu_seqlens`` [N + 1] (``MHA`` and its subclasses): N documents packed in x [1, total, D]. Without a
  cache or mask, attention is block-diagonal (a FlexAttention document mask on CUDA, a boolean mask in
  SDPA otherwise), RoPE angles and score / mask mods use in-document positions; with a cache or a mask
  the documents run as a padded batch (``seqblocks.layers.packing.run_unpacked``).
- Attention dropout (``dropout``) acts on the attention probabilities in training mode only.
- Non-finite values (``seqblocks.layers.finite``): a NaN / Inf in token t's query, key or value is
  zeroed before the softmax (a masked key's ``0 * NaN`` would reach every query) and the outputs of
  the queries that may see that key (causal: t and later, within the window) are set to NaN; padded
  or masked-out keys never poison anything, and outputs at padding are 0.
- Context parallelism (``context_parallel = "native"``): under ``seqblocks.parallel.context_parallel``
  x is this rank's time chunk [B, T_local, D] and the layer attends over the whole sequence through
  ``AttentionCore.attend_context_parallel`` (ring or all-gather): token indices, RoPE angles (default
  ``position_ids``), windows, ALiBi and mods are global; ``position_ids`` and a [B, T_local] key-padding
  ``mask`` are this rank's chunks, ``lengths`` [B] and ``cu_seqlens`` (over the whole sequence, B = 1)
  the whole sequence's; ``d_conv`` takes its left context from the previous ranks. Not with a cache,
  a full mask or ``attention_type="lite"`` (``ValueError``). Subclasses with their own forward
  (``SparseGQA``) set their own.

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads, K head width, V value width,
M memory length, S cache slots.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import host_sync_unsafe
from seqblocks.layers.attention.cache import KVCache, RollingKVCache
from seqblocks.layers.attention.common import (
    AttentionCore,
    context_parallel_poisoned,
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
from seqblocks.layers.attention.paged import PagedKVCache
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
from seqblocks.layers.finite import poison
from seqblocks.layers.mixer import active_context_parallel, run_mixer
from seqblocks.layers.packing import document_index, packed_positions, run_unpacked
from seqblocks.layers.position import PositionBase, RotaryEmbedding
from seqblocks.ops._packing import check_cu_seqlens
from seqblocks.ops.attention import ATTENTION_BACKENDS
from seqblocks.ops.attention.paged import PAGED_MAX_QUERIES, paged_attention, paged_kernel_runs
from seqblocks.ops.attention.prologue import rope_nonfinite_qkv
from seqblocks.ops.causal_conv1d import causal_conv1d
from seqblocks.parallel.attention import global_positions, previous_tokens
from seqblocks.parallel.context import ContextParallel
from seqblocks.registry import MIXERS

# CrossAttention is re-exported here, where it lived before cross_attention.py.
__all__ = ["lite_attention", "MHA", "GQA", "MQA", "SlidingWindowAttention", "CrossAttention", "ATTENTION_TYPES"]

#: Every ``attention_type`` MHA accepts: the softmax backends, "linear" (builds a LinearAttention) and "lite".
ATTENTION_TYPES = ATTENTION_BACKENDS + ("linear", "lite")


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
            alias: the call returns a ``LinearAttention``, see below); "pallas_flash" is read as "auto",
            the fastest fused path (SDPA flash on CUDA, FlexAttention with a mod or window); "lite" is
            element-wise gated attention (see ``lite_attention``; non-causal, one extra [head_dim -> 1]
            gate ``lite_gate``). Default: "auto".
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
        mlp_dim (int): width of a gated MLP fused into the projections (rounded up to a multiple of
            256): ``in_proj`` also gives ``[up, gate]``, and ``out_proj`` reads the attention output
            concatenated with ``up * silu(gate)`` (mlp_dim / 2 features). 0 disables. Default: 0.
        d_conv (int): width of a causal depthwise convolution over the q / k / v projections before
            attention (``conv_weight`` [q+k+v width, d_conv], ``conv_bias``); decoding keeps its last
            d_conv - 1 inputs in the cache. 0 disables. Default: 0.
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

    inputs = frozenset({"mask", "position_ids", "lengths", "cu_seqlens"})
    context_parallel = "native"

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
        mlp_dim: int = 0,
        d_conv: int = 0,
        attention_fn: Callable | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        num_heads, num_heads_kv, head_dim = resolve_heads(owner, embed_dim, num_heads, num_heads_kv, head_dim)
        for name, value in (("mlp_dim", mlp_dim), ("d_conv", d_conv)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}: {name}={value!r} must be a non-negative int")
        if window_size is not None and not causal:
            raise ValueError(f"{owner}: window_size={window_size} is a causal sliding window; it needs causal=True")
        if not isinstance(qk_norm, bool):
            raise TypeError(f"{owner}: qk_norm must be a bool, got {qk_norm!r}")
        lite = attention_type == "lite"
        if lite:
            if causal:
                raise ValueError(f"{owner}: attention_type='lite' normalises its weights over the whole sequence, "
                                 f"so it is not causal; it needs causal=False")
            bad = [name for name, value in (("window_size", window_size), ("score_mod", score_mod),
                                            ("mask_mod", mask_mod), ("softcap", softcap), ("position", position),
                                            ("attention_fn", attention_fn))
                   if value is not None]
            if bad or rotary_emb_dim:
                raise ValueError(f"{owner}: attention_type='lite' has no scores for {bad or ['rotary_emb_dim']}")
        own_score_mod = score_mod is not None
        score_mod = with_softcap(owner, softcap, score_mod)
        # linear_attention_chunk_size / linear_feature_map serve only the "linear" alias (see __new__).
        self.init_core(num_heads=num_heads, attention_type="standard" if lite else attention_type,
                       attention_block_size=attention_block_size, dropout=dropout, score_mod=score_mod,
                       mask_mod=mask_mod, softmax_scale=softmax_scale, window_size=window_size, position=position,
                       attention_fn=attention_fn)
        if lite:
            self.attention_type = "lite"
        self.embed_dim, self.num_heads_kv, self.head_dim = embed_dim, num_heads_kv, head_dim
        self.causal, self.layer_idx = causal, layer_idx
        factory = {"device": device, "dtype": dtype}
        self.mlp_dim = -(-mlp_dim // 256) * 256
        self.d_conv = d_conv
        qkv_dim = (num_heads + 2 * num_heads_kv) * head_dim
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory)
        if d_conv > 0:
            self.conv_weight = nn.Parameter(torch.empty(qkv_dim, d_conv, **factory))
            self.conv_bias = nn.Parameter(torch.empty(qkv_dim, **factory))
        self.lite_gate = nn.Linear(head_dim, 1, **factory) if lite else None
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb = make_rotary(owner, head_dim, rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved,
                                      position, device)
        self.softcap = softcap
        self._own_score_mod = own_score_mod  # a score_mod beyond the softcap (the paged kernel has none)
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
        if self.lite_gate is not None:
            self.lite_gate.reset_parameters()
        if self.d_conv > 0:  # as a depthwise nn.Conv1d: uniform in +-1/sqrt(fan_in), fan_in = d_conv
            bound = 1 / math.sqrt(self.d_conv)
            with torch.no_grad():
                self.conv_weight.uniform_(-bound, bound)
                self.conv_bias.uniform_(-bound, bound)
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
            cache = RollingKVCache.allocate(batch_size, max_seqlen, min(self.window_size, max_seqlen), Hkv, K, K,
                                            device=device, dtype=dtype)
        else:
            cache = KVCache.allocate(batch_size, max_seqlen, Hkv, K, K, device=device, dtype=dtype)
        if self.d_conv > 0:  # the conv's last d_conv - 1 inputs, as an extra cache entry
            cache.conv_state = torch.zeros(batch_size, self.d_conv - 1, self.conv_weight.shape[0], device=device,
                                           dtype=torch.promote_types(dtype, torch.float32))
        return cache

    def allocate_paged_cache(self, block_table: torch.Tensor, num_pages: int, page_size: int, max_seqlen: int,
                             dtype: torch.dtype | None = None) -> PagedKVCache:
        """A ``PagedKVCache`` over ``block_table`` [B, max_pages] with a pool of ``num_pages`` pages
        (sliding-window layers too: they page their keys like a global layer and mask by the window)."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: a non-causal attention cannot decode with a cache")
        dtype = dtype or self.in_proj.weight.dtype
        return PagedKVCache.allocate_paged(block_table, num_pages, page_size, max_seqlen, self.num_heads_kv,
                                           self.head_dim, self.head_dim, device=self.in_proj.weight.device,
                                           dtype=dtype)

    # Forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: KVCache | RollingKVCache | None = None, *,
                mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                score_mod: Callable | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D] (see the module docstring for cache, mask, position_ids, lengths,
        cu_seqlens).

        ``score_mod``: a per-call score mod (or mask mod), applied after the layer's own ``score_mod``
        (composed) or intersected with its ``mask_mod``; like them it sees token indices (in-document
        indices with ``cu_seqlens``)."""
        owner = type(self).__name__
        call_mods = split_call_mod(owner, score_mod)
        if score_mod is not None and self.lite_gate is not None:
            raise ValueError(f"{owner}: attention_type='lite' has no scores for a per-call score_mod")
        cp = active_context_parallel(owner, cache)
        if cp is not None and self.lite_gate is not None:
            raise ValueError(f"{owner}: attention_type='lite' normalises over the whole sequence; it does not run "
                             f"under context parallelism")
        if cp is not None and cu_seqlens is not None and (mask is not None or lengths is not None):
            raise ValueError(f"{owner}: under context parallelism packed documents (cu_seqlens) take no mask or "
                             f"lengths")
        if cu_seqlens is not None and (cache is not None or mask is not None or lengths is not None):
            given = {"cu_seqlens": cu_seqlens, "mask": mask, "lengths": lengths, "position_ids": position_ids}
            given = {k: v for k, v in given.items() if v is not None}
            if score_mod is None:
                return run_unpacked(self, x, cache, given, run_mixer)

            def run_with_mod(mixer, padded, cache, inputs):  # the contract call, the per-call score_mod along
                return mixer(padded, cache, **{k: v for k, v in inputs.items() if v is not None}, score_mod=score_mod)

            return run_unpacked(self, x, cache, given, run_with_mod)
        check_input(owner, x, self.embed_dim, device=self.in_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.in_proj.weight.dtype)
        B, T, _ = x.shape
        T_all = T if cp is None else T * cp.world_size  # the whole sequence's length
        check_lengths(owner, lengths, B, T_all)
        check_position_ids(owner, position_ids, B, T)
        documents = None
        if cu_seqlens is not None:
            check_cu_seqlens(owner, cu_seqlens, B, T_all)
            cu = cu_seqlens.to(x.device)
            documents = (document_index(cu, T_all), packed_positions(cu, T_all))
        if cache is not None:
            kind = RollingKVCache if self.window_size is not None and not isinstance(cache, KVCache) else KVCache
            check_cache(owner, cache, kind, B, x.device)
            if not self.causal:
                raise ValueError(f"{owner}: a non-causal attention cannot decode with a cache")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, Hkv, K = self.num_heads, self.num_heads_kv, self.head_dim
        qkv = self.in_proj(x)
        x_mlp = None
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split((qkv.shape[-1] - self.mlp_dim, self.mlp_dim), dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            qkv = self._conv(qkv, cache, lengths, cp)
        q, k, v = qkv.split((H * K, Hkv * K, Hkv * K), dim=-1)
        q, k, v = q.view(B, T, H, K), k.view(B, T, Hkv, K), v.view(B, T, Hkv, K)
        if self.q_norm is not None:  # QK-norm comes before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        rotary = self.rotary
        index = None  # token indices; only rotary and cached calls need them (no extra launch otherwise)
        if cache is not None:
            index = cache.seqlen_offset[:, None] + torch.arange(T, device=x.device)
        elif rotary is not None and cp is not None:
            here = global_positions(T, x.device, cp)
            index = (here if documents is None else documents[1][here])[None]
        elif rotary is not None:
            index = torch.arange(T, device=x.device)[None] if documents is None else documents[1][None]
        cos = sin = None
        if rotary is not None:
            rope_pos = rope_positions(position_ids, index)
            if isinstance(rotary, RotaryEmbedding):
                cos, sin = rotary.cos_sin(q, rope_pos)
            else:
                q, k = rotary.rotate_qk(q, k, rope_pos)
        # RoPE and the non-finite rule in one pass (one Triton launch when decoding on the GPU)
        q, k, v, bad_q, bad_kv = rope_nonfinite_qkv(  # bad_q, bad_kv: [B, T]
            q, k, v, cos, sin, rotary_dim=None if cos is None else rotary.rotary_dim,
            interleaved=cos is not None and rotary.interleaved)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, K]
        key_valid, attn_mask = split_mask(owner, mask, B, T, T)
        if cp is None:
            length_valid = lengths_mask(lengths, T, x.device)
        else:
            if attn_mask is not None:
                raise ValueError(f"{owner}: under context parallelism mask must be this rank's [B, T_local] bool "
                                 f"key-padding chunk; a full mask does not split along time")
            length_valid = None if lengths is None else (
                global_positions(T, x.device, cp)[None] < lengths.to(x.device)[:, None])
        key_valid = intersect_valid(key_valid, length_valid)
        bad_key = bad_kv if key_valid is None else bad_kv & key_valid
        if cp is not None:
            poisoned, key_valid = context_parallel_poisoned(
                cp, bad_key, key_valid, causal=self.causal, window=self.window_size,
                document=None if documents is None else documents[0])
            out = self.attend_context_parallel(cp, q, k, v, causal=self.causal, window=self.window_size,
                                               key_valid=key_valid, call_score_mod=call_mods[0],
                                               call_mask_mod=call_mods[1], documents=documents)
        elif cache is None and self.lite_gate is not None:
            if attn_mask is not None:
                raise ValueError(f"{owner}: attention_type='lite' takes a [B, T] key-padding mask only")
            out = lite_attention(q, k, v, self.lite_gate, key_valid)
            out = F.dropout(out, self.dropout, self.training)
            poisoned, _ = poisoned_queries(bad_key, torch.arange(T, device=x.device)[None], causal=False, window=None)
        elif cache is None:
            out = self.attend(q, k, v, causal=self.causal, window=self.window_size, q_pos=None, kv_pos=None,
                              key_valid=key_valid, attn_mask=attn_mask, call_score_mod=call_mods[0],
                              call_mask_mod=call_mods[1], documents=documents)
            poisoned, _ = poisoned_queries(bad_key, torch.arange(T, device=x.device)[None], causal=self.causal,
                                           window=self.window_size,
                                           document=None if documents is None else documents[0])
        else:
            if attn_mask is not None:
                raise ValueError(f"{owner}: with a cache, mask must be a [B, T] key-padding mask (full masks "
                                 f"cannot be remembered for later steps)")
            poisoned, last = poisoned_queries(bad_key, index, causal=True, window=self.window_size,
                                              prior=cache.nonfinite_last)
            out = self._cached(q, k, v, key_valid, index, cache, lengths, call_mods)
            cache.nonfinite_last.copy_(last[:, -1])
        context = out.transpose(1, 2).reshape(B, T, H * out.shape[-1])
        if x_mlp is not None:
            context = torch.cat((context, x_mlp.to(context.dtype)), dim=-1)
        y = self.out_proj(context)
        y = poison(y, poisoned | bad_q)
        if length_valid is not None:
            y = y.masked_fill(~length_valid[..., None], 0.0)
        return y.to(in_dtype)

    def _conv(self, qkv: torch.Tensor, cache: KVCache | RollingKVCache | None,
              lengths: torch.Tensor | None, cp: ContextParallel | None = None) -> torch.Tensor:
        """The causal depthwise conv over [B, T, q+k+v] (continuing and updating the cache's conv state).
        Under context parallelism the d_conv - 1 tokens before this rank's chunk come first and their
        outputs are dropped (a valid output never reads past its own token, so ``lengths`` is not needed)."""
        if cp is not None:
            n = self.d_conv - 1
            y, _ = causal_conv1d(torch.cat((previous_tokens(qkv, n, cp), qkv), dim=1), self.conv_weight,
                                 self.conv_bias)
            return y[:, n:].to(qkv.dtype)
        state = None if cache is None else getattr(cache, "conv_state", None)
        if cache is not None and state is None:
            raise ValueError(f"{type(self).__name__}(d_conv={self.d_conv}): the cache has no conv_state; allocate "
                             f"it with this layer's allocate_inference_cache")
        y, final = causal_conv1d(qkv, self.conv_weight, self.conv_bias, initial_state=state, lengths=lengths)
        if state is not None:
            state.copy_(final)
        return y.to(qkv.dtype)

    def _reads_cache_in_place(self, q: torch.Tensor, cache: KVCache, T: int,
                              call_mods: tuple[Callable | None, Callable | None]) -> bool:
        """Whether a cached call attends through ``paged_attention`` (the cache read where it lies) rather
        than slicing or gathering it for SDPA: at most ``PAGED_MAX_QUERIES`` queries, the "auto" backend,
        no option the op lacks (score / mask mods beyond softcap and window, a bias position, dropout, a
        kernel of one's own), and the op's Triton kernel runs here (``paged_kernel_runs``: CUDA; on the
        CPU slicing plus SDPA's fused kernel is faster than the op's reference). A paged cache is read
        through its block table; a contiguous ``KVCache`` [B, Hkv, S, K] is the same layout with one
        page of S positions per row. Either way the kernel stops at each row's length on the device,
        where SDPA under a CUDA graph reads every slot. It computes the same function as the
        slicing / gathering path (tested)."""
        pools = (cache.k_pages, cache.v_pages) if isinstance(cache, PagedKVCache) else (cache.k, cache.v)
        return (T <= PAGED_MAX_QUERIES and self.attention_type == "auto"
                and self.attention_fn is None and not self._own_score_mod and self.mask_mod is None
                and call_mods == (None, None) and (self.position is None or self.position.kind != "bias")
                and not (self.training and self.dropout > 0) and paged_kernel_runs(q, *pools))

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
            S = cache.capacity if used is None or self.static_kv(q) else used
            if out is None and self._reads_cache_in_place(q, cache, T, call_mods):
                # decode-shaped calls: attention reads the cache where it lies (a paged cache through its
                # block table, a contiguous one as one page of S positions a row)
                if isinstance(cache, PagedKVCache):
                    pages, table, valid = (cache.k_pages, cache.v_pages), cache.block_table, cache.valid_pages
                else:
                    pages, valid = (cache.k, cache.v), cache.key_valid
                    table = torch.arange(B, device=q.device)[:, None]
                out = paged_attention(q, *pages, table, cache.seqlen_offset + T, valid_pages=valid,
                                      scale=self.softmax_scale, window=self.window_size, softcap=self.softcap,
                                      max_seqlen=S)
            if out is None:
                keys, vals, valid = cache.read(S, T)  # a paged cache gathers its pages here
                out = self.attend(q, keys.to(q.dtype), vals.to(q.dtype), causal=True, window=self.window_size,
                                  q_pos=index, kv_pos=None, key_valid=valid, attn_mask=None, **mods)
        cache.advance(consumed)
        return out


def lite_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: nn.Linear,
                   key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise gated attention: a Hadamard product in place of the q.k scores.

    ``g_t = gate(q_t ⊙ k_t)`` (one scalar per head and position), ``w = softmax_t(g)`` over the
    sequence, ``out_t = w_t v_t``: each position keeps its own value, weighted by how its query and key
    agree relative to the other positions. Padded positions (``key_valid`` False) get weight 0 and the
    rest renormalise.

    Args:
        q (Tensor): [B, H, T, K]; k, v (Tensor): [B, Hkv, T, K] (Hkv divides H).
        gate (nn.Linear): K -> 1.
        key_valid (Tensor | None): [B, T] bool. Default: None (all valid).

    Returns:
        Tensor: [B, H, T, K] in q's dtype (fp32 softmax).
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    g = gate((q * k).to(gate.weight.dtype)).float()  # [B, H, T, 1]
    if key_valid is not None:
        g = g.masked_fill(~key_valid[:, None, :, None], float("-inf"))
    w = torch.softmax(g, dim=2).nan_to_num(0.0)  # a row with no valid position: all 0
    return (w * v.float()).to(q.dtype)


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
    ``window_size`` is required, except from a ``BlockConfig``, where it defaults to ``max_seq_len``
    when ``window_size`` is None (a window as long as the context).
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
    def from_config(cls, config, position: PositionBase | None = None, **kwargs: Any) -> SlidingWindowAttention:
        """As ``MHA.from_config``; without a window in the config (``window_size``, ``mixer_kwargs``) or
        ``kwargs``, the window is ``config.max_seq_len``."""
        if config.window_size is None and "window_size" not in config.mixer_kwargs and "window_size" not in kwargs:
            kwargs = {**kwargs, "window_size": config.max_seq_len}
        return super().from_config(config, position=position, **kwargs)

    @classmethod
    def _alias_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("SlidingWindowAttention: attention_type='linear' has no window (kernelized attention "
                         "sees every earlier token); use LinearAttention ('linear_attention') without a window")


MIXERS.register("sliding_window_gqa", SlidingWindowAttention,
                description="alias of 'sliding_window' (the name some configs use): GQA with a causal sliding window")
MIXERS.register("mha", MHA)
MIXERS.register("attn", MHA, description="alias of 'mha': multi-head attention, the short name for mixer_types lists")
