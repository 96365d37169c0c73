"""The decode-step conv: ``causal_conv1d_update`` with the cache's token count advanced in the same launch.

``conv_step`` is the first of the two Triton launches of a Mamba decode step (the second is
``selective_state_update``) and of an RG-LRU one (the second is ``seqblocks.ops.scan.step.rglru_step``);
its PyTorch path is ``causal_conv1d_update`` from ``seqblocks.ops.causal_conv1d`` followed by
``seqlen_offset += 1``, which is its specification.

Shapes: B batch, E channels, W filter width.
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.causal_conv1d import ACTIVATIONS, causal_conv1d_update

__all__ = ["conv_step"]


@outside_autocast
def conv_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of the causal depthwise conv; shifts ``x`` into ``conv_state`` in place.

    Args:
        x (Tensor): [B, E] the new input (any strides: a view into in_proj's output is read in place).
        conv_state (Tensor): [B, W - 1, E] the previous W - 1 inputs, oldest first; updated in place.
        weight (Tensor): [E, W].
        bias (Tensor | None): [E]. Default: None.
        activation (str | None): None or "silu" / "swish". Default: None.
        seqlen_offset (Tensor | None): [B] int64 token count of the cache, advanced by one in place.
            Default: None (nothing advanced).
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y (Tensor): [B, E] in x's dtype, equal to ``causal_conv1d_update``.

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-int64 ``seqlen_offset``.
        ValueError: mismatched shapes, an unknown activation or backend.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(conv_state, torch.Tensor) or not isinstance(
            weight, torch.Tensor):
        raise TypeError("conv_step: x, conv_state and weight must be Tensors")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"conv_step: expected x [B, E] and weight [E, W >= 1], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if conv_state.shape != (x.shape[0], weight.shape[1] - 1, x.shape[1]):
        raise ValueError(f"conv_step: conv_state must have shape [B, W - 1, E] = "
                         f"{[x.shape[0], weight.shape[1] - 1, x.shape[1]]}, got {tuple(conv_state.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"conv_step: bias must have shape [{x.shape[1]}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv_step: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if seqlen_offset is not None:
        if not isinstance(seqlen_offset, torch.Tensor) or seqlen_offset.dtype != torch.int64:
            raise TypeError(f"conv_step: seqlen_offset must be an int64 tensor, got {seqlen_offset!r}")
        if seqlen_offset.shape != (x.shape[0],):
            raise ValueError(f"conv_step: seqlen_offset must have shape [{x.shape[0]}], got "
                             f"{tuple(seqlen_offset.shape)}")
    floats = all(t is None or (t.is_floating_point() and t.dtype.itemsize <= 4) for t in (x, conv_state, weight, bias))
    if resolve_backend(backend, x, conv_state, weight, op="conv_step", has_kernel=floats) == "triton":
        from seqblocks.ops.selective_scan.step_triton import conv_step_triton

        return conv_step_triton(x, conv_state, weight, bias, activation, seqlen_offset)
    y = causal_conv1d_update(x, conv_state, weight, bias, activation, backend="torch")
    if seqlen_offset is not None:
        seqlen_offset.add_(1)
    return y
