"""Reference (the spec) of the causal depthwise 1-D convolution used by Mamba and Griffin.

Each channel d has its own filter ``weight[d]`` of width W; output t reads inputs t - W + 1 .. t of
the same channel, where positions before the start come from ``initial_state`` (the W - 1 inputs that
preceded this segment) or are zero::

    y[t, d] = act(bias[d] + sum_{k=0}^{W-1} weight[d, k] * x[t - (W - 1) + k, d])

Computed tap by tap in fp32 (float64 for 64-bit inputs). With ``lengths`` only each row's prefix is
valid: its outputs past the length are 0 and its final state holds the last W - 1 inputs before it.

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_ref", "ACTIVATIONS"]

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tap-by-tap causal depthwise convolution; see ``seqblocks.ops.causal_conv1d.causal_conv1d``."""
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    B, T, D = x.shape
    W = weight.shape[1]
    prev = (torch.zeros(B, W - 1, D, dtype=acc, device=x.device) if initial_state is None
            else initial_state.to(acc))
    ext = torch.cat((prev, x.to(acc)), dim=1)  # [B, W - 1 + T, D]: ext[W - 1 + t] is x[t]
    y = torch.zeros(B, T, D, dtype=acc, device=x.device)
    for k in range(W):
        y = y + weight[:, k].to(acc) * ext[:, k : k + T]
    if bias is not None:
        y = y + bias.to(acc)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    finals = []
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        y[b, n:] = 0
        finals.append(ext[b, n : n + W - 1])  # the W - 1 inputs before position n
    return y.to(x.dtype), torch.stack(finals).to(x.dtype if initial_state is None else initial_state.dtype)
