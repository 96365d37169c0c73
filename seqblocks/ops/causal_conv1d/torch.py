"""Fast pure-PyTorch causal depthwise conv1d: one grouped ``F.conv1d`` over the state-extended input.

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_torch", "causal_conv1d_update_torch"]


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path of ``seqblocks.ops.causal_conv1d.causal_conv1d``; inputs are assumed valid."""
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    B, T, D = x.shape
    W = weight.shape[1]
    state_dtype = x.dtype if initial_state is None else initial_state.dtype
    prev = (x.new_zeros(B, W - 1, D, dtype=acc) if initial_state is None else initial_state.to(acc))
    ext = torch.cat((prev, x.to(acc)), dim=1)  # [B, W - 1 + T, D]
    if T == 0:
        return x.clone(), prev.to(state_dtype)
    # The public op runs outside autocast, so this convolution accumulates in fp32.
    y = F.conv1d(ext.transpose(1, 2), weight.to(acc).unsqueeze(1),
                 None if bias is None else bias.to(acc), groups=D).transpose(1, 2)  # [B, T, D]
    y = _activate(y, activation)
    if lengths is None:
        final = ext[:, T:]
    else:
        # Row b's state is the W - 1 inputs before its length n: ext[b, n : n + W - 1].
        idx = lengths.to(x.device).long().view(B, 1) + torch.arange(W - 1, device=x.device)
        final = torch.gather(ext, 1, idx.unsqueeze(-1).expand(B, W - 1, D))
        valid = torch.arange(T, device=x.device) < lengths.to(x.device).view(B, 1)
        y = torch.where(valid.unsqueeze(-1), y, torch.zeros((), dtype=acc, device=x.device))
    return y.to(x.dtype), final.to(state_dtype)


def causal_conv1d_update_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step: x [B, D], conv_state [B, W - 1, D] (shifted in place) -> y [B, D]."""
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    window = torch.cat((conv_state.to(acc), x.to(acc).unsqueeze(1)), dim=1)  # [B, W, D]
    y = (window * weight.to(acc).t()).sum(1)
    if bias is not None:
        y = y + bias.to(acc)
    conv_state.copy_(window[:, 1:])
    return _activate(y, activation).to(x.dtype)
