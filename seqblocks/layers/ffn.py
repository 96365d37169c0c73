"""Position-wise feed-forward networks.

Registry FFNs are built from a ``BlockConfig`` (the registry contract: ``cls(config)``, called as
``ffn(x)``). ``GatedMLP`` keeps mamba_ssm's constructor for ``Block(mlp_cls=...)``.

Shapes: x [B, T, D]; hidden [B, T, F].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.registry import FFNS, MLPS

__all__ = ["FFNBase", "FeedForward", "ReLUFeedForward", "ReLU2FeedForward", "GatedFeedForward",
           "GEGLUFeedForward", "GatedReLU2FeedForward", "TanhGELUFeedForward", "TanhGEGLUFeedForward", "NoFFN",
           "GatedMLP", "ReLU2MLP", "gelu_tanh"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (Primer)."""
    return F.relu(x).square()


class FFNBase(nn.Module):
    """Base class of registry FFNs: constructed from a ``BlockConfig``, called as ``ffn(x) -> y``.

    Sets ``self.config``, ``self.d_model`` and ``self.d_ff`` for subclasses.
    """

    is_identity = False

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.d_ff = config.d_ff


class FeedForward(FFNBase):
    """Linear -> GELU -> Linear (the "standard" transformer FFN)."""

    activation: Callable[[torch.Tensor], torch.Tensor] = staticmethod(F.gelu)

    def __init__(self, config, *, device=None, dtype=None) -> None:
        super().__init__(config)
        factory = {"device": device, "dtype": dtype}
        self.up = nn.Linear(self.d_model, self.d_ff, bias=config.bias, **factory)
        self.down = nn.Linear(self.d_ff, self.d_model, bias=config.bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


class ReLUFeedForward(FeedForward):
    """Linear -> ReLU -> Linear (the original transformer FFN)."""

    activation = staticmethod(F.relu)


class ReLU2FeedForward(FeedForward):
    """Linear -> squared ReLU -> Linear (Primer)."""

    activation = staticmethod(relu2)


class GatedFeedForward(FFNBase):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up in one projection."""

    activation: Callable[[torch.Tensor], torch.Tensor] = staticmethod(F.silu)

    def __init__(self, config, *, device=None, dtype=None) -> None:
        super().__init__(config)
        factory = {"device": device, "dtype": dtype}
        self.gate_up = nn.Linear(self.d_model, 2 * self.d_ff, bias=config.bias, **factory)
        self.down = nn.Linear(self.d_ff, self.d_model, bias=config.bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.activation(gate) * up)


class GEGLUFeedForward(GatedFeedForward):
    """GEGLU: down(gelu(gate(x)) * up(x))."""

    activation = staticmethod(F.gelu)


class GatedReLU2FeedForward(GatedFeedForward):
    """Gated squared ReLU: down(relu(gate(x))^2 * up(x)) ("gated_relu2"; the SwiGLU layout with
    Primer's activation on the gate)."""

    activation = staticmethod(relu2)


class TanhGELUFeedForward(FeedForward):
    """Linear -> GELU (tanh approximation) -> Linear (GPT-2's FFN, "gelu_tanh")."""

    activation = staticmethod(gelu_tanh)


class TanhGEGLUFeedForward(GatedFeedForward):
    """GEGLU with the tanh-approximated GELU: down(gelu_tanh(gate(x)) * up(x)) (Gemma, RecurrentGemma;
    "geglu_tanh")."""

    activation = staticmethod(gelu_tanh)


class NoFFN(FFNBase):
    """No feed-forward sublayer: the block skips it entirely (no norm, no residual add)."""

    is_identity = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


FFNS.register("standard", FeedForward)
FFNS.register("relu", ReLUFeedForward)
FFNS.register("relu2", ReLU2FeedForward)
FFNS.register("gated", GatedFeedForward)
FFNS.register("swiglu", GatedFeedForward, description="alias of 'gated': SwiGLU")
FFNS.register("geglu", GEGLUFeedForward)
FFNS.register("gated_relu2", GatedReLU2FeedForward)
FFNS.register("gelu_tanh", TanhGELUFeedForward)
FFNS.register("geglu_tanh", TanhGEGLUFeedForward)
FFNS.register("none", NoFFN)


@MLPS.register("gated_mlp")
class GatedMLP(nn.Module):
    """Gated MLP with mamba_ssm's signature: ``fc2(y * activation(gate))``, ``y, gate = fc1(x)``.

    Args:
        in_features (int): input width.
        hidden_features (int | None): hidden width before rounding. Default: None (= 8/3 in_features,
            which keeps the parameter count of a 4x two-matrix MLP).
        out_features (int | None): output width. Default: None (= in_features).
        activation (Callable): gate activation. Default: F.silu.
        bias (bool): biases in both linears. Default: False.
        multiple_of (int): hidden width is rounded up to a multiple of this. Default: 128.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
        bias: bool = False,
        multiple_of: int = 128,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"GatedMLP: in_features={in_features} must be positive")
        if multiple_of <= 0:
            raise ValueError(f"GatedMLP: multiple_of={multiple_of} must be positive")
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        if hidden <= 0:
            raise ValueError(f"GatedMLP: hidden_features={hidden_features} must be positive")
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.in_features, self.hidden_features, self.out_features = in_features, hidden, out_features
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


@MLPS.register("relu2_mlp")
class ReLU2MLP(nn.Module):
    """Squared-ReLU MLP (Primer; Nemotron-H's dense MLP) with ``GatedMLP``'s signature: ``fc2(relu(fc1(x))^2)``.

    Args:
        in_features (int): input width.
        hidden_features (int | None): hidden width before rounding. Default: None (= 4 in_features).
        out_features (int | None): output width. Default: None (= in_features).
        bias (bool): biases in both linears. Default: False.
        multiple_of (int): hidden width is rounded up to a multiple of this. Default: 128.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, device=None, dtype=None) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"ReLU2MLP: in_features={in_features} must be positive")
        if multiple_of <= 0:
            raise ValueError(f"ReLU2MLP: multiple_of={multiple_of} must be positive")
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else 4 * in_features
        if hidden <= 0:
            raise ValueError(f"ReLU2MLP: hidden_features={hidden_features} must be positive")
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.in_features, self.hidden_features, self.out_features = in_features, hidden, out_features
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(relu2(self.fc1(x)))
