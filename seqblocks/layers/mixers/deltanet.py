"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021; Yang et al. 2024), as fla builds it.

    q, k, v = silu(conv(q_proj(x))), silu(conv(k_proj(x))), silu(conv(v_proj(x)))   # short causal convs
    beta    = sigmoid(b_proj(x))                                                  # [B, T, H] write strength
    o       = delta_rule(l2norm(q), l2norm(k), v, beta)                          # S_t = (I - b k k^T) S + b k v^T
    o       = RMSNorm(o) (or RMSNorm(o) * silu(g_proj(x)) with use_gate), per head
    out     = o_proj(o)

Arguments, defaults and parameter names are fla 0.6.0's ``fla.layers.DeltaNet`` (``q_proj``, ``k_proj``,
``v_proj``, ``b_proj``, ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d`` (depthwise ``nn.Conv1d``, as fla's
``ShortConvolution``), ``g_proj``, ``o_norm.weight``, ``o_proj``), so an fla layer's state dict loads
unchanged; the one rename is the constructor's ``hidden_size``, here ``d_model`` (fla accepts both).
``mode`` is not an argument: fla's modes compute the same function; here the op decides its kernel.

Shapes: B batch, T time, D model width, H heads, K key head width, V value head width, W conv width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.checks import check_allocation, check_call, check_positive, check_range, is_empty, lengths_mask
from seqblocks.layers.mixer import Mixer
from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule, gated_delta_rule_step
from seqblocks.parallel.conv import conv_halo
from seqblocks.parallel.scan import chunk_lengths, delta_rule_cp, gated_delta_rule_cp, local_cu_seqlens, mixer_context
from seqblocks.registry import MIXERS

__all__ = ["DeltaNet", "DeltaNetCache", "DeltaRuleMixer", "HeadRMSNorm", "GATE_ACTIVATIONS"]

_QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
_QK_NORMS = ("l2", "sum")
#: The output-gate activations of the gated RMSNorm (fla's names; "swish" and "silu" are one function).
GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")


@dataclasses.dataclass(eq=False)
class DeltaNetCache(Cache):
    """Decoding state of ``DeltaNet`` and ``GatedDeltaNet``.

    Attributes:
        conv_q, conv_k, conv_v (Tensor): [B, W - 1, key / key / value width] the last W - 1 inputs of each
            short conv, in the activation dtype ([B, 0, ...] without short convs).
        state (Tensor): [B, H, K, V] the delta-rule state, fp32 (float64 for a float64 module).
    """

    conv_q: torch.Tensor = None
    conv_k: torch.Tensor = None
    conv_v: torch.Tensor = None
    state: torch.Tensor = None


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's V channels, optionally gated: ``rmsnorm(o) * weight * act(gate)``.

    fla's ``RMSNorm`` (no gate) and ``FusedRMSNormGated`` (normalise, then gate). Computed in fp32
    (float64 for float64 inputs), returned in o's dtype.
    """

    def __init__(self, d: int, eps: float = 1e-5, activation: str | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if activation is not None and activation not in GATE_ACTIVATIONS:
            raise ValueError(f"HeadRMSNorm: activation must be one of {GATE_ACTIVATIONS} or None, got {activation!r}")
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(torch.float32, o.dtype)
        h = o.to(acc)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight.to(acc)
        if gate is not None:
            gate = gate.to(acc)
            h = h * (torch.sigmoid(gate) if self.activation == "sigmoid" else F.silu(gate))
        return h.to(o.dtype)


def _zero_padding(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # t [B, T, ...] with 0 wherever valid [B, T] is False
    keep = valid.view(*valid.shape, *([1] * (t.dim() - 2)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


class DeltaRuleMixer(Mixer):
    """What DeltaNet and Gated DeltaNet share: projections, short convs, the op call, the cache.

    Subclasses set ``key_dim``, ``value_dim``, ``num_heads`` (query / key heads), ``num_v_heads``,
    ``head_k_dim``, ``head_v_dim``, ``conv_size``, ``use_short_conv``, ``use_gate``, ``chunk_size`` and the
    modules, and implement ``_gates(x) -> (g or None, beta)`` with g, beta [B, T, num_v_heads] fp32.
    """

    inputs = frozenset({"lengths", "cu_seqlens"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk: one all-gather
    # serves the three short convs' halos, the delta rule passes its state across ranks (parallel/scan.py).
    context_parallel = "native"
    qk_activation = "silu"
    qk_norm = "l2"

    def _make_convs(self, conv_bias: bool, fk: dict[str, Any]) -> None:
        def conv(width: int) -> nn.Conv1d:
            return nn.Conv1d(width, width, self.conv_size, groups=width, padding=self.conv_size - 1,
                             bias=conv_bias, **fk)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> DeltaNetCache:
        """A zeroed ``DeltaNetCache`` for ``batch_size`` sequences (``max_seqlen`` does not change its size)."""
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        weight = self.q_proj.weight
        device, conv_dtype = weight.device, dtype or weight.dtype
        width = self.conv_size - 1 if self.use_short_conv else 0

        def conv(channels: int) -> torch.Tensor:
            return torch.zeros(batch_size, width, channels, device=device, dtype=conv_dtype)

        return DeltaNetCache.empty(
            batch_size, max_seqlen, device=device, conv_q=conv(self.key_dim), conv_k=conv(self.key_dim),
            conv_v=conv(self.value_dim),
            state=torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device,
                              dtype=torch.promote_types(torch.float32, weight.dtype)))

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor, conv_state: torch.Tensor | None, lengths, cu_seqlens,
              activation: str | None, decode: bool, halo: torch.Tensor | None = None) -> torch.Tensor:
        # [B, T, C] -> [B, T, C]; updates conv_state (the cache's) in place. ``halo``: under context
        # parallelism, the initial states of this chunk's rows / pieces (cu_seqlens then the local pieces').
        if not self.use_short_conv:
            return F.silu(x) if activation is not None else x
        weight = conv.weight[:, 0]
        if halo is not None:
            return causal_conv1d(x, weight, conv.bias, activation=activation, initial_state=halo, lengths=lengths,
                                 cu_seqlens=cu_seqlens)[0]
        if cu_seqlens is not None:
            return causal_conv1d(x, weight, conv.bias, activation=activation, cu_seqlens=cu_seqlens)[0]
        if decode:
            return causal_conv1d_update(x[:, 0], conv_state, weight, conv.bias, activation=activation).unsqueeze(1)
        y, final = causal_conv1d(x, weight, conv.bias, activation=activation, initial_state=conv_state,
                                 lengths=lengths)
        if conv_state is not None:
            conv_state.copy_(final)
        return y

    def _qk_features(self, t: torch.Tensor) -> torch.Tensor:
        if self.qk_activation == "relu":
            t = t.relu()
        elif self.qk_activation == "elu":
            t = F.elu(t) + 1.0
        if self.qk_norm == "sum":
            t = t / t.abs().sum(-1, keepdim=True).clamp(min=1e-6)  # fla's sum_norm (an L1 normalisation)
        return t

    def _qkv(self, x, cache, lengths, cu_seqlens, decode, cp=None):
        # x [B, T, D] -> q, k [B, T, HV, K], v [B, T, HV, V]: projections, short convs, feature maps
        qk_act = "silu" if self.qk_activation == "silu" else None
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.use_short_conv else (None,) * 3
        states = (None,) * 3 if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
        inputs = [proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj)]
        halos = (None,) * 3
        if cp is not None and self.use_short_conv:  # one gather for the three convs' halos
            halos = conv_halo(tuple(inputs), self.conv_size, cu_seqlens=cu_seqlens, cp=cp)
            cu_seqlens = local_cu_seqlens(cu_seqlens, x.shape[1], cp)
        q, k, v = (self._conv(conv, inp, state, lengths, cu_seqlens, act, decode, halo)
                   for conv, inp, state, act, halo in zip(convs, inputs, states, (qk_act, qk_act, "silu"), halos))
        q = self._qk_features(q.unflatten(-1, (self.num_heads, self.head_k_dim)))
        k = self._qk_features(k.unflatten(-1, (self.num_heads, self.head_k_dim)))
        if self.num_v_heads != self.num_heads:  # grouped value heads: value head i reads key head i // (HV / H)
            q, k = (t.repeat_interleave(self.num_v_heads // self.num_heads, dim=2) for t in (q, k))
        return q, k, v.unflatten(-1, (self.num_v_heads, self.head_v_dim))

    def _recurrence(self, q, k, v, g, beta, cache, cu_seqlens, decode, cp=None):
        # the op: one decode step on the cache's state, or a (chunked) pass from and into it; under
        # context parallelism its state-passing form (cu_seqlens the full sequence's)
        l2 = self.qk_norm == "l2"
        if decode:
            return gated_delta_rule_step(cache.state, q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                                         beta[:, 0], use_qk_l2norm=l2).unsqueeze(1)
        common = {"initial_state": None if cache is None else cache.state, "output_final_state": cache is not None,
                  "cu_seqlens": cu_seqlens, "use_qk_l2norm": l2, "chunk_size": self.chunk_size}
        if cp is not None:
            common["cp"] = cp
        if g is None:
            o, final = (delta_rule if cp is None else delta_rule_cp)(q, k, v, beta, **common)
        else:
            o, final = (gated_delta_rule if cp is None else gated_delta_rule_cp)(q, k, v, g, beta, **common)
        if cache is not None:
            cache.state.copy_(final)
        return o

    def forward(self, x: torch.Tensor, cache: DeltaNetCache | None = None, *, lengths: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (DeltaNetCache | None): continue from and update this cache (prefill, or a decode step
                when T = 1). Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; outputs past it are 0 and the cache
                advances by it. Default: None.
            cu_seqlens (Tensor | None): [N + 1] offsets of N sequences packed in a batch of 1 (no cache,
                no lengths); each starts from a zero state and zero conv inputs. Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size,
                cu_seqlens with a cache, lengths or a batch above 1.
        """
        owner = type(self).__name__
        cp = mixer_context(owner, cache)  # None: the whole sequence is here
        x, in_dtype = check_call(owner, x, self.d_model, self.q_proj.weight, lengths if cp is None else None, cache,
                                 DeltaNetCache)
        if cu_seqlens is not None and (cache is not None or lengths is not None or x.shape[0] != 1):
            raise ValueError(f"{owner}: cu_seqlens takes a packed batch [1, total, D] without a cache or lengths; "
                             f"got x {tuple(x.shape)}, cache={'given' if cache is not None else None}, "
                             f"lengths={'given' if lengths is not None else None}")
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        T = x.shape[1]
        decode = cache is not None and T == 1 and lengths is None
        local = chunk_lengths(owner, lengths, x.shape[0], T, cp)  # lengths of this chunk (all of it without cp)
        q, k, v = self._qkv(x, cache, local, cu_seqlens, decode, cp)
        g, beta = self._gates(x)
        valid = lengths_mask(local, T, x.device)
        if valid is not None:  # padding leaves the state alone (beta = 0: no write; g = 0: no decay), NaNs too
            q, k, v, beta = (_zero_padding(t, valid) for t in (q, k, v, beta))
            g = None if g is None else _zero_padding(g, valid)
        o = self._recurrence(q, k, v, g, beta, cache, cu_seqlens, decode, cp)
        if cache is not None:
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        gate = self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim)) if self.use_gate else None
        out = self.o_proj(self.o_norm(o, gate).flatten(-2))
        if valid is not None:  # padded outputs are 0
            out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.to(in_dtype)


@MIXERS.register("deltanet")
class DeltaNet(DeltaRuleMixer):
    """DeltaNet mixer: fla 0.6.0's ``DeltaNet`` arguments, defaults and parameter names.

    Args:
        d_model (int): model width D (fla's ``hidden_size``).
        expand_k (float): key width ``expand_k * d_model``, split over the heads. Default: 1.0.
        expand_v (float): value width ``expand_v * d_model``, split over the heads. Default: 1.0.
        num_heads (int): heads H. Default: 4.
        use_beta (bool): a learned write strength ``sigmoid(b_proj(x))``; else beta = 1. Default: True.
        use_gate (bool): gate the normalised output by ``silu(g_proj(x))``. Default: False.
        use_short_conv (bool): short causal convs on q, k and v (else plain activations). Default: True.
        conv_size (int): width W of the short convs. Default: 4.
        conv_bias (bool): biases in the short convs. Default: False.
        allow_neg_eigval (bool): beta in [0, 2] (``2 sigmoid``), so ``I - b k k^T`` may reflect. Default: False.
        qk_activation (str): "silu", "relu", "elu" (elu + 1) or "identity" on q and k. Default: "silu".
        qk_norm (str): "l2" (unit norm, inside the op) or "sum" (L1) normalisation of q and k. Default: "l2".
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        chunk_size (int): chunk length of the op's chunked path. Default: 64.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: non-positive sizes, key / value widths that are not whole or not divisible by the
            heads, an unknown ``qk_activation`` / ``qk_norm``.
    """

    def __init__(
        self,
        d_model: int,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        num_heads: int = 4,
        use_beta: bool = True,
        use_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        qk_activation: str = "silu",
        qk_norm: str = "l2",
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive("DeltaNet", d_model=d_model, num_heads=num_heads, conv_size=conv_size, chunk_size=chunk_size)
        check_range("DeltaNet", "expand_k", expand_k, 0, lo_open=True)
        check_range("DeltaNet", "expand_v", expand_v, 0, lo_open=True)
        check_range("DeltaNet", "norm_eps", norm_eps, 0)
        if qk_activation not in _QK_ACTIVATIONS:
            raise ValueError(f"DeltaNet: qk_activation must be one of {_QK_ACTIVATIONS}, got {qk_activation!r}")
        if qk_norm not in _QK_NORMS:
            raise ValueError(f"DeltaNet: qk_norm must be one of {_QK_NORMS}, got {qk_norm!r}")
        key_dim, value_dim = d_model * expand_k, d_model * expand_v
        for name, width in (("expand_k", key_dim), ("expand_v", value_dim)):
            if not math.isclose(width, round(width)) or round(width) % num_heads:
                raise ValueError(f"DeltaNet: d_model * {name} = {width:g} must be a whole multiple of "
                                 f"num_heads={num_heads}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.expand_k, self.expand_v = d_model, expand_k, expand_v
        self.num_heads = self.num_v_heads = num_heads
        self.key_dim, self.value_dim = round(key_dim), round(value_dim)
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.use_beta, self.use_gate, self.use_short_conv = use_beta, use_gate, use_short_conv
        self.conv_size, self.conv_bias, self.allow_neg_eigval = conv_size, conv_bias, allow_neg_eigval
        self.qk_activation, self.qk_norm, self.norm_eps = qk_activation, qk_norm, norm_eps
        self.chunk_size, self.layer_idx = chunk_size, layer_idx

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False, **fk)
        if use_beta:
            self.b_proj = nn.Linear(d_model, num_heads, bias=False, **fk)
        if use_short_conv:
            self._make_convs(conv_bias, fk)
        if use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False, **fk)
        self.o_norm = HeadRMSNorm(self.head_v_dim, eps=norm_eps, activation="swish" if use_gate else None, **fk)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init of the linears and convs (fla's layer adds none of its own); norm weight 1."""
        for module in self.modules():
            if module is not self and isinstance(module, nn.Linear | nn.Conv1d):
                module.reset_parameters()
        with torch.no_grad():
            self.o_norm.weight.fill_(1.0)

    def _gates(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        acc = torch.promote_types(torch.float32, x.dtype)
        if self.use_beta:
            beta = torch.sigmoid(self.b_proj(x).to(acc))
        else:
            beta = x.new_ones(x.shape[:2] + (self.num_heads,), dtype=acc)
        return None, (2.0 * beta if self.allow_neg_eigval else beta)
