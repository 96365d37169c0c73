"""LayerNorm and RMSNorm that compute in fp32 whatever the input dtype.

Shapes: x [..., D]; weight, bias [D].
"""

from __future__ import annotations

import torch
from torch import nn

from seqblocks.layers.checks import check_positive, check_range
from seqblocks.ops.add_norm import add_norm
from seqblocks.registry import NORMS

__all__ = ["NormBase", "LayerNorm", "RMSNorm", "OffsetRMSNorm", "is_fusable_norm", "norm_params"]


class NormBase(nn.Module):
    is_rms: bool = False
    #: the scale is ``weight + weight_offset`` (formed in fp32); 1.0 for the (1 + w) norms, whose
    #: weight then starts at 0.
    weight_offset: float = 0.0

    def __init__(self, dim: int, eps: float = 1e-5, *, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_positive(type(self).__name__, dim=dim)
        check_range(type(self).__name__, "eps", eps, 0.0, lo_open=True)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.weight_offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def scale(self) -> torch.Tensor:
        """The multiplier of the normalised input: ``weight``, or ``weight + weight_offset`` in fp32."""
        if self.weight_offset == 0.0:
            return self.weight
        return self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)) + self.weight_offset

    @classmethod
    def from_config(cls, config) -> NormBase:
        return cls(config.d_model, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension in fp32; the output has ``x``'s dtype."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}({self.dim}) got input with last dimension {x.shape[-1]}")
        return add_norm(x, None, self.scale(), self.bias, self.eps, is_rms=self.is_rms)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


@NORMS.register("layer_norm")
class LayerNorm(NormBase):
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias, computed in fp32.

    Args:
        dim (int): normalised width.
        eps (float): added to the variance. Default: 1e-5.
        bias (bool): learn a shift. Default: True.
    """

    is_rms = False


@NORMS.register("rms_norm")
class RMSNorm(NormBase):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32.

    Args:
        dim (int): normalised width.
        eps (float): added to the mean square. Default: 1e-5.
    """

    is_rms = True

    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__(dim, eps, bias=False, device=device, dtype=dtype)


@NORMS.register("gemma_rms_norm")
class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight): x / sqrt(mean(x^2) + eps) * (1 + weight), in fp32, with the
    weight initialised at 0 (Gemma, RecurrentGemma). The same function as ``RMSNorm`` with weight + 1.

    Args:
        dim (int): normalised width.
        eps (float): added to the mean square. Default: 1e-5.
    """

    weight_offset = 1.0
# The short spellings of the same two norms (``norm_type="layer"`` / ``"rms"`` in encoder / decoder code).
NORMS.register("layer", LayerNorm, description="LayerNorm (short name of 'layer_norm').")
NORMS.register("rms", RMSNorm, description="RMSNorm (short name of 'rms_norm').")


def is_fusable_norm(norm: nn.Module) -> bool:
    """Whether ``ops.add_norm`` can stand in for ``norm`` (ours, or torch's LayerNorm / RMSNorm)."""
    if isinstance(norm, NormBase):
        return True
    if isinstance(norm, nn.LayerNorm):
        return len(norm.normalized_shape) == 1
    rms = getattr(nn, "RMSNorm", None)
    return rms is not None and isinstance(norm, rms) and len(norm.normalized_shape) == 1


def norm_params(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, float, bool]:
    """``(weight, bias, eps, is_rms)`` of a fusable norm, for ``ops.add_norm``."""
    if isinstance(norm, NormBase):
        return norm.scale(), norm.bias, norm.eps, norm.is_rms
    if isinstance(norm, nn.LayerNorm):
        return norm.weight, norm.bias, norm.eps, False
    eps = norm.eps if norm.eps is not None else torch.finfo(dtype).eps
    return norm.weight, None, eps, True
