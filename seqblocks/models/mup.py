"""muP, the maximal update parameterisation (Yang et al., "Tensor Programs V", 2022), for the LMs.

A model is built at width ``d_model`` against a base width ``mup_base_width``; ``width_mult = d_model /
mup_base_width``. Under muP a learning rate (and init scale) tuned at the base width stays near-optimal
at any width, because every layer's activations and their per-step updates keep the same size as the
width grows. The rules (for Adam; ``docs/mup.md`` lists them with their reasons):

- hidden (matrix-like) weights: every ``nn.Linear`` weight inside the blocks. Init std
  ``initializer_range / sqrt(width_mult)`` (variance proportional to 1 / fan_in; applied to the softmax
  attention mixers' and the FFNs' linears, other mixers keep their own fan-in init), and Adam learning
  rate ``lr / width_mult`` (a ``_lr_scale`` tag on the parameter that ``seqblocks.train.param_groups``
  reads);
- embeddings, norm gains, biases and every other parameter: init and learning rate unchanged;
- output logits: multiplied by ``1 / width_mult`` (``CausalLM.output_multiplier``), tied or untied head;
- softmax attention: scores scaled by 1 / head_dim (``BlockConfig.mup``; done by the mixers).

Shapes: D width.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from seqblocks.models.init import InitConfig

__all__ = ["MupSpec", "apply_mup", "lr_scale", "LR_SCALE_ATTR"]

#: The parameter attribute holding its learning-rate multiplier (absent: 1).
LR_SCALE_ATTR = "_lr_scale"


@dataclasses.dataclass(frozen=True)
class MupSpec:
    """Which modules muP acts on, in one model.

    Args:
        width_mult (float): d_model / mup_base_width.
        init_modules (tuple[nn.Module, ...]): modules whose ``nn.Linear`` weights get the muP init.
        hidden_modules (tuple[nn.Module, ...]): modules whose ``nn.Linear`` weights are matrix-like
            (their learning rate is divided by ``width_mult``).
    """

    width_mult: float
    init_modules: tuple[nn.Module, ...]
    hidden_modules: tuple[nn.Module, ...]

    def __post_init__(self) -> None:
        if not (isinstance(self.width_mult, float | int) and math.isfinite(self.width_mult) and self.width_mult > 0):
            raise ValueError(f"MupSpec.width_mult={self.width_mult!r} must be a positive finite number")


def _linears(modules: tuple[nn.Module, ...]) -> list[nn.Linear]:
    seen: dict[int, nn.Linear] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                seen.setdefault(id(m), m)
    return list(seen.values())


def apply_mup(spec: MupSpec, config: InitConfig) -> float:
    """Initialise and tag the hidden weights of ``spec``; returns the output multiplier 1 / width_mult.

    Init: each linear of ``spec.init_modules`` ~ N(0, (initializer_range / sqrt(width_mult))^2), its bias
    zero. Tags: each linear weight of ``spec.hidden_modules`` gets ``_lr_scale = 1 / width_mult``.
    """
    std = config.initializer_range / math.sqrt(spec.width_mult)
    with torch.no_grad():
        for linear in _linears(spec.init_modules):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
    for linear in _linears(spec.hidden_modules):
        setattr(linear.weight, LR_SCALE_ATTR, 1.0 / spec.width_mult)
    return 1.0 / spec.width_mult


def lr_scale(param: torch.Tensor) -> float:
    """The learning-rate multiplier of ``param`` (1.0 unless muP tagged it)."""
    return float(getattr(param, LR_SCALE_ATTR, 1.0))
