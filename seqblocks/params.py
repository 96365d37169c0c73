"""Parameter counts: total, and active per token (a mixture-of-experts layer uses top_k of its E
routed experts for each token, plus every shared expert)."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from seqblocks.layers.moe import moe_modules

__all__ = ["ParameterCount", "count_parameters"]


class ParameterCount(NamedTuple):
    """``total``: every parameter once (tied weights counted once); ``active``: those one token's
    forward pass uses, i.e. ``total`` less the (E - top_k) / E share of each MoE layer's routed experts."""

    total: int
    active: int


def count_parameters(module: nn.Module) -> ParameterCount:
    """Total and active parameters of ``module`` (any device, meta included).

    Raises:
        TypeError: ``module`` is not an nn.Module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_parameters expects an nn.Module, got {type(module).__name__}")
    total = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    idle = 0
    for moe in moe_modules(module):
        per_expert = moe.routed_parameter_count() // moe.n_experts
        idle += per_expert * (moe.n_experts - moe.top_k)
    return ParameterCount(total=total, active=total - idle)
