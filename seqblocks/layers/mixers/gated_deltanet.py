"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): the delta rule with Mamba-2's scalar decay per head.

    q, k, v = silu(conv(q_proj(x))), silu(conv(k_proj(x))), silu(conv(v_proj(x)))   # short causal convs
    beta    = sigmoid(b_proj(x))                                                  # [B, T, HV]
    g       = -exp(A_log) * softplus(a_proj(x) + dt_bias)                         # [B, T, HV] log decay
    o       = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)   # S_t = e^g (I - b k k^T) S + b k v^T
    out     = o_proj(RMSNorm(o) * silu(g_proj(x)))                 # per head; RMSNorm(o) without use_gate

The recurrent layer of the Qwen3-Next / Qwen3.5 hybrids (three of these per attention layer).
Arguments, defaults, initialisation and parameter names are fla 0.6.0's ``fla.layers.GatedDeltaNet``
(``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, ``A_log``, ``dt_bias``, ``q_conv1d`` /
``k_conv1d`` / ``v_conv1d``, ``g_proj``, ``o_norm.weight``, ``o_proj``), so an fla layer's state dict
loads unchanged; the constructor's ``hidden_size`` is ``d_model`` here. With ``num_v_heads > num_heads``
(grouped value heads) value head i reads query / key head ``i // (num_v_heads / num_heads)``.

Shapes: B batch, T time, D model width, H query / key heads, HV value heads, K / V head widths.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.config import BlockConfig
from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixers.deltanet import GATE_ACTIVATIONS, DeltaRuleMixer, HeadRMSNorm
from seqblocks.registry import MIXERS

__all__ = ["GatedDeltaNet"]


@MIXERS.register("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet mixer: fla 0.6.0's ``GatedDeltaNet`` arguments, defaults and parameter names.

    Args:
        d_model (int): model width D (fla's ``hidden_size``).
        expand_v (float): value head width ``expand_v * head_dim``. Default: 2.0.
        head_dim (int): query / key head width K. Default: 256.
        num_heads (int): query / key heads H. Default: 6.
        num_v_heads (int | None): value heads HV, a multiple of H; None: H. Default: None.
        use_gate (bool): gate the normalised output by ``act(g_proj(x))``. Default: True.
        use_short_conv (bool): short causal convs on q, k and v (else plain SiLU). Default: True.
        allow_neg_eigval (bool): beta in [0, 2] (``2 sigmoid``). Default: False.
        conv_size (int): width W of the short convs. Default: 4.
        conv_bias (bool): biases in the short convs. Default: False.
        norm_eps (float): epsilon of the output RMSNorm. Default: 1e-5.
        output_gate_activation (str): "swish" / "silu" or "sigmoid". Default: "swish".
        chunk_size (int): chunk length of the op's chunked path. Default: 64.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: non-positive sizes, a value head width that is not whole, num_v_heads not a multiple
            of num_heads, an unknown output gate activation.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (Mixer.keep_in_fp32): the decay's parameters.
    keep_in_fp32 = ("A_log", "dt_bias")

    def __init__(
        self,
        d_model: int,
        expand_v: float = 2.0,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: int | None = None,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        norm_eps: float = 1e-5,
        output_gate_activation: str = "swish",
        chunk_size: int = 64,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive("GatedDeltaNet", d_model=d_model, head_dim=head_dim, num_heads=num_heads,
                       conv_size=conv_size, chunk_size=chunk_size)
        check_range("GatedDeltaNet", "expand_v", expand_v, 0, lo_open=True)
        check_range("GatedDeltaNet", "norm_eps", norm_eps, 0)
        nv = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads is not None:
            check_positive("GatedDeltaNet", num_v_heads=num_v_heads)
        if nv % num_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads={nv} must be a multiple of num_heads={num_heads}")
        head_v = head_dim * expand_v
        if not math.isclose(head_v, round(head_v)):
            raise ValueError(f"GatedDeltaNet: head_dim * expand_v = {head_v:g} must be a whole number")
        if output_gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"GatedDeltaNet: output_gate_activation must be one of {GATE_ACTIVATIONS}, got "
                             f"{output_gate_activation!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.expand_v, self.head_dim = d_model, expand_v, head_dim
        self.num_heads, self.num_v_heads = num_heads, nv
        self.head_k_dim, self.head_v_dim = head_dim, round(head_v)
        self.key_dim, self.value_dim = num_heads * head_dim, nv * self.head_v_dim
        self.use_gate, self.use_short_conv, self.allow_neg_eigval = use_gate, use_short_conv, allow_neg_eigval
        self.conv_size, self.conv_bias, self.norm_eps = conv_size, conv_bias, norm_eps
        self.output_gate_activation, self.chunk_size, self.layer_idx = output_gate_activation, chunk_size, layer_idx

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False, **fk)
        self.a_proj = nn.Linear(d_model, nv, bias=False, **fk)
        self.b_proj = nn.Linear(d_model, nv, bias=False, **fk)
        # The decay's parameters stay fp32 whatever the module dtype (keep_in_fp32).
        self.A_log = nn.Parameter(torch.empty(nv, device=device, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(nv, device=device, dtype=torch.float32))
        if use_short_conv:
            self._make_convs(conv_bias, fk)
        if use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False, **fk)
        self.o_norm = HeadRMSNorm(self.head_v_dim, eps=norm_eps,
                                  activation=output_gate_activation if use_gate else None, **fk)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False, **fk)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: BlockConfig, **kwargs: Any) -> GatedDeltaNet:
        """``Mixer.from_config``, except that a block without a head width (``head_dim=None``) keeps this
        mixer's own (``mixer_kwargs["head_dim"]``, else the default 256)."""
        if config.head_dim is None and "head_dim" not in kwargs:
            default = cls.config_class().__dataclass_fields__["head_dim"].default
            kwargs = {**kwargs, "head_dim": config.mixer_kwargs.get("head_dim", default)}
        return super().from_config(config, **kwargs)

    def reset_parameters(self) -> None:
        """fla's initialisation: A uniform in (0, 16) (A_log = log A), dt_bias = softplus^-1 of a log-uniform
        step in [0.001, 0.1] (floor 1e-4); PyTorch's default init of the linears and convs; norm weight 1."""
        for module in self.modules():
            if module is not self and isinstance(module, nn.Linear | nn.Conv1d):
                module.reset_parameters()
        with torch.no_grad():
            device = self.A_log.device
            self.A_log.copy_(torch.empty(self.num_v_heads, device=device).uniform_(0, 16).log())
            lo, hi = math.log(0.001), math.log(0.1)
            dt = torch.exp(torch.rand(self.num_v_heads, device=device) * (hi - lo) + lo).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.o_norm.weight.fill_(1.0)

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = torch.promote_types(torch.float32, x.dtype)
        beta = torch.sigmoid(self.b_proj(x).to(acc))
        g = -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
        return g, (2.0 * beta if self.allow_neg_eigval else beta)
