"""Initialisation rules shared by the language models.

GPT-2's scheme on top of each module's own init: the embedding (and an untied head) ~ N(0, std), and
each residual branch's output projection divided once by sqrt(n_residuals_per_layer * n_layer), so
the residual stream's variance does not grow with depth.

Shapes: D width.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from seqblocks.config import ConfigBase

__all__ = ["InitConfig", "residual_output_projection", "init_embeddings", "rescale_residual_projections"]

_RESIDUAL_PROJ_NAMES = ("out_proj", "o_proj", "fc2", "down", "proj_out", "output_proj", "out")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig(ConfigBase):
    """How a language model initialises its weights.

    Args:
        initializer_range (float): std of the embedding (and untied head) init. Default: 0.02.
        rescale_prenorm_residual (bool): divide each residual output projection by
            sqrt(n_residuals_per_layer * n_layer), once. Default: True.
        n_residuals_per_layer (int | None): residual branches per layer in that factor.
            Default: None (the number of branches the layer has: 1, or 2 with an MLP).
    """

    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    n_residuals_per_layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.initializer_range > 0:
            raise ValueError(f"InitConfig.initializer_range={self.initializer_range!r} must be positive")
        if self.n_residuals_per_layer is not None and self.n_residuals_per_layer <= 0:
            raise ValueError(f"InitConfig.n_residuals_per_layer={self.n_residuals_per_layer!r} must be positive")


def residual_output_projection(module: nn.Module | None, d_model: int) -> nn.Linear | None:
    """The linear layer that writes ``module``'s output into the residual stream: a child named
    ``out_proj`` / ``o_proj`` / ``fc2`` / ``down`` / ... if there is one, else the last ``nn.Linear``
    (in registration order) whose output width is ``d_model``; None when there is none."""
    if module is None:
        return None
    for name in _RESIDUAL_PROJ_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear) and child.out_features == d_model:
            return child
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == d_model]
    return linears[-1] if linears else None


def init_embeddings(embedding: nn.Embedding, lm_head: nn.Linear, tied: bool, config: InitConfig) -> None:
    """Embedding (and an untied head) ~ N(0, initializer_range)."""
    with torch.no_grad():
        nn.init.normal_(embedding.weight, std=config.initializer_range)
        if not tied:
            nn.init.normal_(lm_head.weight, std=config.initializer_range)


def rescale_residual_projections(residual_modules: list[list[nn.Module | None]], d_model: int,
                                 config: InitConfig) -> None:
    """Per layer, the modules of its residual branches (None for a skipped branch): each one's output
    projection divided by sqrt(n_res * n_layer), once."""
    n_layer = len(residual_modules)
    if not config.rescale_prenorm_residual or not n_layer:
        return
    with torch.no_grad():
        for modules in residual_modules:
            n_res = config.n_residuals_per_layer or max(1, sum(m is not None for m in modules))
            for module in modules:
                rescale = getattr(module, "rescale_output_", None)
                if callable(rescale):  # e.g. an MoE FFN, whose expert weights are [E, ...] tensors
                    rescale(math.sqrt(n_res * n_layer))
                    continue
                proj = residual_output_projection(module, d_model)
                if proj is not None:
                    proj.weight.div_(math.sqrt(n_res * n_layer))
