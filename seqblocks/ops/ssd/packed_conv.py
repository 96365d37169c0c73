"""Causal depthwise convolution over packed sequences (``cu_seqlens``): Mamba-2's conv with a reset at
every document boundary, so that a packed batch gives each document's own outputs.

Each of the W taps is one shifted, masked multiply-add over the packed [1, total, D] input: a tap that
would read across the start of its sequence reads that sequence's ``initial_state`` instead (zeros
when None). No host synchronisation and no unpacking: the sequence of every position comes from
``cu_seqlens`` on the device. Autograd differentiates it. The spec is ``causal_conv1d`` run on every
sequence alone (tested).

Shapes: S sequences, total packed length, D channels, W taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_packed"]


def causal_conv1d_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y[t, d] = act(bias[d] + sum_k weight[d, k] x[t - W + 1 + k, d])`` within each packed sequence.

    Args:
        x (Tensor): [1, total, D] sequences packed along time.
        weight (Tensor): [D, W]; ``weight[:, -1]`` multiplies the current input.
        bias (Tensor | None): [D].
        cu_seqlens (Tensor): [S + 1] int32 / int64 offsets, rising from 0 to total.
        activation (str | None): None or "silu". Default: None.
        initial_state (Tensor | None): [S, W - 1, D], the W - 1 inputs preceding each sequence (oldest
            first). Default: None (zeros).

    Returns:
        (y [1, total, D] in x's dtype, final_state [S, W - 1, D]: each sequence's last W - 1 inputs,
        reaching into its initial state when shorter, in x's dtype).

    Raises:
        ValueError: shapes that disagree, a malformed cu_seqlens, an unknown activation.
    """
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"causal_conv1d_packed: x must be [1, total, D], got {tuple(x.shape)}")
    total, D = x.shape[1], x.shape[2]
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"causal_conv1d_packed: weight must be [D={D}, W], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"causal_conv1d_packed: bias must be [{D}], got {tuple(bias.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"causal_conv1d_packed: cu_seqlens must be a 1-D int32 / int64 tensor, got {cu_seqlens!r}")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d_packed: activation must be None or 'silu', got {activation!r}")
    S, W = cu_seqlens.numel() - 1, weight.shape[1]
    if initial_state is not None and initial_state.shape != (S, W - 1, D):
        raise ValueError(f"causal_conv1d_packed: initial_state must be [{S}, {W - 1}, {D}], "
                         f"got {tuple(initial_state.shape)}")
    acc = torch.promote_types(torch.float32, x.dtype)
    cu = cu_seqlens.to(x.device, torch.int64)
    pos = torch.arange(total, device=x.device)
    seq = torch.bucketize(pos, cu[1:], right=True)                   # [total] sequence of each position
    local = pos - cu[seq]                                            # offset inside its sequence
    xs = x[0].to(acc)
    init = None if initial_state is None or W == 1 else initial_state.to(acc)
    zero = torch.zeros((), dtype=acc, device=x.device)

    def read(offset: torch.Tensor, owner: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Input at local ``offset`` of sequence ``owner`` (negative offsets: its initial state)."""
        inside = offset >= 0
        val = xs[(start + offset).clamp(0, max(total - 1, 0))] if total else xs.new_zeros(offset.shape + (D,))
        if init is not None:
            past = init[owner, (W - 1 + offset).clamp(0, W - 2)]
            return torch.where(inside.unsqueeze(-1), val, past)
        return torch.where(inside.unsqueeze(-1), val, zero)

    y = xs.new_zeros(total, D) if bias is None else bias.to(acc).expand(total, D)
    start = cu[seq]
    for k in range(W):
        y = y + weight[:, k].to(acc) * read(local - (W - 1 - k), seq, start)
    if activation == "silu":
        y = F.silu(y)
    # Final state: offsets len - (W - 1) ... len - 1 of each sequence.
    lens = cu.diff()
    offs = lens.unsqueeze(1) - (W - 1) + torch.arange(W - 1, device=x.device)  # [S, W - 1]
    owners = torch.arange(S, device=x.device).unsqueeze(1).expand_as(offs)
    final = read(offs, owners, cu[:-1].unsqueeze(1))                 # [S, W - 1, D]
    return y.to(x.dtype).unsqueeze(0), final.to(x.dtype)
