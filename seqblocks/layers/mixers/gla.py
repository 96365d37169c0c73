"""Gated linear attention (Yang et al., 2024) as fla builds the layer: ``"gla"``.

    q, k, v   = q_proj(x), k_proj(x), v_proj(x)              # [B, T, H, K], K = expand_k * D / H; V likewise
    g         = logsigmoid(gk_proj(x)) / gate_logit_normalizer   # low-rank: D -> gate_low_rank_dim -> K per head
    o         = gla(phi(q), phi(k), v, g)                     # S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o         = rmsnorm(o) * weight * silu(g_proj(x))         # per head (fla's FusedRMSNormGated)
    y         = o_proj(o)

Parameter names are fla 0.6.0's ``GatedLinearAttention`` (``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``,
``gk_proj.0`` / ``gk_proj.1``, ``o_proj``, ``g_norm_swish_gate.weight``, or ``g_norm.weight`` without the
output gate), so its state dict loads unchanged. fla's short convolutions (``use_short_conv``) are not
offered. The decode cache holds the [H, K, V] state (fla's layer keeps it transposed, [H, V, K]).

``GLAFamilyBase`` holds what GLA and RetNet (``retnet.py``) share: the projections, the gated norm, the
cache, lengths / cu_seqlens, and the non-finite rule (``seqblocks.layers.finite``).

Shapes: B batch, T time, D model width, H heads, Hkv key/value heads, K key head width, V value head width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.checks import (
    check_allocation,
    check_call,
    check_positive,
    check_range,
    is_empty,
    lengths_mask,
)
from seqblocks.layers.finite import nonfinite_tokens, poison, zero_nonfinite
from seqblocks.layers.mixer import Mixer
from seqblocks.ops.gla import gla, gla_step, simple_gla, simple_gla_step
from seqblocks.parallel.scan import (
    carried_poison,
    chunk_lengths,
    gla_cp,
    local_cu_seqlens,
    mixer_context,
    simple_gla_cp,
)
from seqblocks.registry import MIXERS

__all__ = ["GatedLinearAttention", "GLACache", "GLAFamilyBase", "HeadRMSNormGated", "FEATURE_MAPS"]

#: Feature maps on q and k (fla's ``ACT2FN`` names that the papers use); None: no map.
FEATURE_MAPS = {"relu": F.relu, "elu": F.elu, "swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid,
                "identity": lambda x: x}


class HeadRMSNormGated(nn.Module):
    """RMSNorm over each head's V channels, then ``* weight * silu(gate)`` (fla's ``FusedRMSNormGated`` with
    swish; without a gate, its ``RMSNorm``). The weight [V] is shared by the heads. Computed in fp32."""

    def __init__(self, width: int, eps: float = 1e-5, elementwise_affine: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """o [B, T, H, V], gate [B, T, H, V] or None -> [B, T, H, V] in o's dtype."""
        acc = torch.promote_types(torch.float32, o.dtype)
        h = o.to(acc)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            h = h * self.weight.to(acc)
        if gate is not None:
            h = h * F.silu(gate.to(acc))
        return h.to(o.dtype)


@dataclasses.dataclass(eq=False)
class GLACache(Cache):
    """Decoding state of ``GatedLinearAttention`` / ``MultiScaleRetention``.

    Attributes:
        state (Tensor): [B, H, K, V] the recurrent state, fp32 (float64 for a float64 module).
    """

    state: torch.Tensor = None


def _document_poison(bad: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: outputs poisoned by a non-finite token: from it to the end of its row (its document
    with ``cu_seqlens``), with no host sync."""
    count = bad.to(torch.int32).cumsum(1)
    if cu_seqlens is None:
        return count > 0
    T = bad.shape[1]
    starts = cu_seqlens[:-1].to(torch.long)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.long), torch.arange(T, device=bad.device), right=True)
    before = torch.cat([count.new_zeros(1, 1), count[:, :-1]], dim=1)  # bad tokens strictly before t
    return (count - before[:, starts.clamp(max=T - 1)][:, doc]) > 0


def document_positions(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[1, T] position of each packed token inside its own document."""
    t = torch.arange(T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.long), t, right=True)
    return (t - cu_seqlens.to(torch.long)[doc])[None]


class GLAFamilyBase(Mixer):
    """The shared layer of GLA and RetNet: q / k / v / output-gate projections, a decay, the gated
    linear-attention op, a per-head gated RMSNorm, ``o_proj``. Subclasses give ``_decay`` (and may
    rotate q, k in ``_positions``)."""

    inputs = frozenset({"lengths", "cu_seqlens"})
    scalar_decay = False
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (the op passes its
    # state across ranks: parallel/scan.py; positions and the non-finite rule see the whole sequence).
    context_parallel = "native"

    def _build_common(self, owner, d_model, expand_k, expand_v, num_heads, num_kv_heads, feature_map,
                      use_output_gate, elementwise_affine, norm_eps, chunk_size, fk) -> None:
        check_positive(owner, d_model=d_model, num_heads=num_heads, chunk_size=chunk_size)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(owner, num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{owner}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        key_dim, value_dim = d_model * expand_k, d_model * expand_v
        if not (math.isclose(key_dim, round(key_dim)) and math.isclose(value_dim, round(value_dim))) \
                or round(key_dim) <= 0 or round(value_dim) <= 0:
            raise ValueError(f"{owner}: d_model * expand_k = {key_dim} and d_model * expand_v = {value_dim} "
                             f"must be positive integers")
        key_dim, value_dim = round(key_dim), round(value_dim)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"{owner}: key dim {key_dim} and value dim {value_dim} must be divisible by "
                             f"num_heads={num_heads}")
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"{owner}: feature_map={feature_map!r}; expected None or one of "
                             f"{sorted(FEATURE_MAPS)}")
        self.d_model, self.expand_k, self.expand_v = d_model, expand_k, expand_v
        self.num_heads, self.num_kv_heads, self.num_kv_groups = num_heads, num_kv_heads, num_heads // num_kv_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.feature_map, self.use_output_gate, self.chunk_size = feature_map, use_output_gate, chunk_size
        self.q_proj = nn.Linear(d_model, key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(d_model, key_dim // self.num_kv_groups, bias=False, **fk)
        self.v_proj = nn.Linear(d_model, value_dim // self.num_kv_groups, bias=False, **fk)
        if use_output_gate:
            self.g_proj = nn.Linear(d_model, value_dim, bias=False, **fk)
            self.g_norm_swish_gate = HeadRMSNormGated(self.head_v_dim, norm_eps, elementwise_affine, **fk)
        else:
            self.g_norm = HeadRMSNormGated(self.head_v_dim, norm_eps, elementwise_affine, **fk)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False, **fk)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> GLACache:
        """A zeroed ``GLACache`` (``max_seqlen`` does not change its size)."""
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        w = self.q_proj.weight
        state_dtype = torch.promote_types(torch.float32, w.dtype)
        return GLACache.empty(batch_size, max_seqlen, device=w.device,
                              state=torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim,
                                                device=w.device, dtype=state_dtype))

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        # [B, T, Hkv * width] -> [B, T, H, width], each key/value head read by its group of query heads.
        t = t.unflatten(-1, (-1, width))
        return t.repeat_interleave(self.num_kv_groups, dim=2) if self.num_kv_groups > 1 else t

    def _positions(self, q, k, cache, cu_seqlens, cp=None):
        return q, k

    def forward(self, x: torch.Tensor, cache: GLACache | None = None, *, lengths: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]; with a cache, continue its stream and update it in place.

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (GLACache | None): continue from and update this cache (prefill, or a decode step when
                T = 1). Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; later tokens neither enter the state
                nor output anything but 0. Default: None.
            cu_seqlens (Tensor | None): [N + 1] offsets of N documents packed in a batch of one; the state
                restarts at each. Not with a cache or lengths. Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size,
                cu_seqlens with a cache or lengths.
        """
        owner = type(self).__name__
        cp = mixer_context(owner, cache)  # None: the whole sequence is here
        x, in_dtype = check_call(owner, x, self.d_model, self.q_proj.weight, lengths if cp is None else None, cache,
                                 GLACache)
        B, T, _ = x.shape
        if cu_seqlens is not None:  # its values are checked by the op
            if cache is not None or lengths is not None:
                raise ValueError(f"{owner}: cu_seqlens packs whole documents; it takes no cache and no lengths")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        local = chunk_lengths(owner, lengths, B, T, cp)  # lengths of this chunk (all of it without cp)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_k_dim))
        k, v = self._heads(self.k_proj(x), self.head_k_dim), self._heads(self.v_proj(x), self.head_v_dim)
        g = self._decay(x)  # [B, T, H, K] or [B, T, H]
        if self.feature_map is not None:
            q, k = FEATURE_MAPS[self.feature_map](q), FEATURE_MAPS[self.feature_map](k)
        q, k = self._positions(q, k, cache, cu_seqlens, cp)
        if cache is not None and T == 1 and lengths is None:
            step = simple_gla_step if self.scalar_decay else gla_step
            o = step(cache.state, q[:, 0], k[:, 0], v[:, 0], g[:, 0]).unsqueeze(1)
            cache.advance(1)
        else:
            o = self._sequence(q, k, v, g, cache, local, cu_seqlens, cp)
        o = o.to(x.dtype)
        if self.use_output_gate:
            o = self.g_norm_swish_gate(o, self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim)))
        else:
            o = self.g_norm(o)
        y = self.o_proj(o.flatten(-2))
        valid = lengths_mask(local, T, x.device)
        if valid is not None:
            y = y.masked_fill(~valid[..., None], 0.0)
        return y.to(in_dtype)

    def _sequence(self, q, k, v, g, cache, lengths, cu_seqlens, cp=None):
        """The full / prefill pass: padding kept out of the state, non-finite tokens poisoning from themselves.
        Under a context-parallel group ``cp``: this rank's chunk, ``lengths`` its own, ``cu_seqlens`` the
        full sequence's."""
        B, T = q.shape[:2]
        valid = lengths_mask(lengths, T, q.device)
        if valid is not None:  # padding: no write (k = 0, v = 0) and no decay (g = 0); NaN there is dropped
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            vm = valid.view(B, T, *([1] * (q.dim() - 2)))
            q, k, v = torch.where(vm, q, zero), torch.where(vm, k, zero), torch.where(vm, v, zero)
            g = torch.where(valid.view(B, T, *([1] * (g.dim() - 2))), g, torch.zeros((), dtype=g.dtype,
                                                                                       device=g.device))
        # The chunked form multiplies future keys by 0 and 0 * NaN = NaN: zero non-finite values, then
        # poison the outputs from them on and the state (seqblocks.layers.finite).
        bad = nonfinite_tokens(q, k, v, g)
        q, k, v, g = zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v), zero_nonfinite(g)
        if cp is None:
            op = simple_gla if self.scalar_decay else gla
            o, final = op(q, k, v, g, initial_state=None if cache is None else cache.state,
                          output_final_state=cache is not None, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size)
            o = poison(o, _document_poison(bad, cu_seqlens))
        else:  # no cache here (mixer_context): the chunk's outputs, poisoned by bad tokens here or before
            op = simple_gla_cp if self.scalar_decay else gla_cp
            o, final = op(q, k, v, g, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, cp=cp)
            poisoned = _document_poison(bad, local_cu_seqlens(cu_seqlens, T, cp))
            o = poison(o, poisoned | carried_poison(bad, cu_seqlens=cu_seqlens, cp=cp))
        if cache is not None:
            cache.state.copy_(final.masked_fill(bad.any(1).view(B, 1, 1, 1), float("nan")))
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        return o


@MIXERS.register("gla")
class GatedLinearAttention(GLAFamilyBase):
    """Gated linear attention: fla 0.6.0's ``GatedLinearAttention`` arguments and defaults.

    Args:
        d_model (int): model width D (fla's ``hidden_size``).
        expand_k (float): key width D * expand_k over all heads. Default: 0.5.
        expand_v (float): value width D * expand_v over all heads. Default: 1.0.
        num_heads (int): heads H. Default: 4.
        num_kv_heads (int | None): key/value heads (their projections are shared by groups). Default: None (= H).
        feature_map (str | None): map on q and k, one of ``FEATURE_MAPS``. Default: None.
        use_output_gate (bool): swish output gate ``g_proj`` fused with the norm. Default: True.
        elementwise_affine (bool): a weight in the norm. Default: True.
        norm_eps (float): norm epsilon. Default: 1e-5.
        gate_logit_normalizer (float): g = logsigmoid(gate logits) / this. Default: 16.
        gate_low_rank_dim (int): inner width of the low-rank gate projection. Default: 16.
        clamp_min (float | None): lower clamp of g. Default: None.
        chunk_size (int): chunk length of the PyTorch path. Default: 64.
        layer_idx, device, dtype: placement. Default: None.

    Raises:
        ValueError: non-integer / indivisible widths, non-positive sizes, an unknown feature map.
    """

    def __init__(self, d_model: int, expand_k: float = 0.5, expand_v: float = 1.0, num_heads: int = 4,
                 num_kv_heads: int | None = None, feature_map: str | None = None, use_output_gate: bool = True,
                 elementwise_affine: bool = True, norm_eps: float = 1e-5, gate_logit_normalizer: float = 16,
                 gate_low_rank_dim: int = 16, clamp_min: float | None = None, chunk_size: int = 64,
                 layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self._build_common("GatedLinearAttention", d_model, expand_k, expand_v, num_heads, num_kv_heads,
                           feature_map, use_output_gate, elementwise_affine, norm_eps, chunk_size, fk)
        check_positive("GatedLinearAttention", gate_low_rank_dim=gate_low_rank_dim)
        check_range("GatedLinearAttention", "gate_logit_normalizer", gate_logit_normalizer, 0, lo_open=True)
        if clamp_min is not None:
            check_range("GatedLinearAttention", "clamp_min", clamp_min, -math.inf, 0)
        self.gate_logit_normalizer, self.gate_low_rank_dim, self.clamp_min = \
            gate_logit_normalizer, gate_low_rank_dim, clamp_min
        self.layer_idx = layer_idx
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False, **fk),
                                     nn.Linear(gate_low_rank_dim, self.key_dim // self.num_kv_groups, bias=True,
                                               **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (fla's layer leaves it to the model); norm weight 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear | HeadRMSNormGated):
                m.reset_parameters()

    def _decay(self, x: torch.Tensor) -> torch.Tensor:
        gk = self._heads(self.gk_proj(x), self.head_k_dim)
        acc = torch.promote_types(torch.float32, gk.dtype)  # the decay is formed in fp32
        g = F.logsigmoid(gk.to(acc)) / self.gate_logit_normalizer
        return g if self.clamp_min is None else g.clamp_min(self.clamp_min)
