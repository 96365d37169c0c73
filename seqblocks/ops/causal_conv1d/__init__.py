"""Causal depthwise 1-D convolution (the short convolution of Mamba and Griffin's recurrent block).

``causal_conv1d`` runs a whole segment, continuing from ``initial_state`` and returning the state for
the next segment; ``causal_conv1d_update`` is the decode step. ``reference.py`` is the tap-by-tap spec,
``torch.py`` the fast path (one grouped ``F.conv1d``); a Triton kernel will plug in behind the same
functions.

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.causal_conv1d._checks import check_conv_inputs
from seqblocks.ops.causal_conv1d.reference import ACTIVATIONS, causal_conv1d_ref
from seqblocks.ops.causal_conv1d.torch import causal_conv1d_torch, causal_conv1d_update_torch

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_ref", "ACTIVATIONS"]


@outside_autocast
def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    lengths: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution ``y[t, d] = act(bias[d] + sum_k weight[d, k] x[t - W + 1 + k, d])``.

    Inputs before the segment's start come from ``initial_state`` (zeros when None). Accumulates in
    fp32 (float64 for 64-bit inputs).

    Args:
        x (Tensor): [B, T, D] input.
        weight (Tensor): [D, W] one filter per channel; ``weight[:, -1]`` multiplies the current input.
        bias (Tensor | None): [D]. Default: None.
        activation (str | None): None, or "silu" (alias "swish") applied to the output. Default: None.
        initial_state (Tensor | None): [B, W - 1, D], the W - 1 inputs preceding ``x`` (oldest first).
            Default: None (zeros).
        lengths (Tensor | None): [B] integer valid prefix of each row: outputs past it are 0 and the
            final state is taken at the row's own end. Default: None (all T valid).
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        (y, final_state): y [B, T, D] in x's dtype; final_state [B, W - 1, D], the last W - 1 inputs
        of each row (initial-state entries where the row is shorter), in the initial state's dtype
        (x's when None).

    Raises:
        TypeError: non-floating inputs.
        ValueError: mismatched shapes, an unknown activation or backend, lengths out of [0, T].
    """
    check_conv_inputs("causal_conv1d", x, weight, bias, activation, initial_state, lengths)
    resolve_backend(backend, x, weight, op="causal_conv1d", has_kernel=False)
    return causal_conv1d_torch(x, weight, bias, activation=activation, initial_state=initial_state,
                               lengths=lengths)


@outside_autocast
def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One decode step of ``causal_conv1d``; shifts ``x`` into ``conv_state`` in place.

    Args:
        x (Tensor): [B, D] the new input.
        conv_state (Tensor): [B, W - 1, D] the previous W - 1 inputs, oldest first; updated in place.
        weight (Tensor): [D, W].
        bias (Tensor | None): [D]. Default: None.
        activation (str | None): None or "silu" / "swish". Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y (Tensor): [B, D] in x's dtype, equal to ``causal_conv1d`` on the one-step segment.

    Raises:
        TypeError / ValueError: as ``causal_conv1d``.
    """
    check_conv_inputs("causal_conv1d_update", x, weight, bias, activation, conv_state, None, step=True)
    resolve_backend(backend, x, conv_state, op="causal_conv1d_update", has_kernel=False)
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
