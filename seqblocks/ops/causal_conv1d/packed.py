"""Causal depthwise convolution over packed sequences (``cu_seqlens``), with a reset at every sequence
start, so that a packed batch gives each sequence its own outputs: the ``cu_seqlens`` path of
``causal_conv1d`` (Mamba-2's and DeltaNet's short convs on packed documents).

Each of the W taps is one shifted, masked multiply-add over the packed [1, total, D] input: a tap that
would read across the start of its sequence reads that sequence's ``initial_state`` instead (zeros
when None). No unpacking: the sequence of every position comes from ``cu_seqlens`` on the device.
Autograd differentiates it. The spec is ``causal_conv1d`` run on every sequence alone (tested).

Shapes: S sequences, total packed length, D channels, W taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_packed_torch"]


def causal_conv1d_packed_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, total, D], weight [D, W], bias [D] or None, cu_seqlens [S + 1], initial_state [S, W - 1, D]
    or None (inputs checked by ``causal_conv1d``). Returns (y [1, total, D] in x's dtype, final_state
    [S, W - 1, D]: each sequence's last W - 1 inputs, reaching into its initial state when shorter, in
    the initial state's dtype (x's when None))."""
    total, D = x.shape[1], x.shape[2]
    S, W = cu_seqlens.numel() - 1, weight.shape[1]
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
    if activation in ("silu", "swish"):
        y = F.silu(y)
    # Final state: offsets len - (W - 1) ... len - 1 of each sequence.
    lens = cu.diff()
    offs = lens.unsqueeze(1) - (W - 1) + torch.arange(W - 1, device=x.device)  # [S, W - 1]
    owners = torch.arange(S, device=x.device).unsqueeze(1).expand_as(offs)
    final = read(offs, owners, cu[:-1].unsqueeze(1))                 # [S, W - 1, D]
    state_dtype = x.dtype if initial_state is None else initial_state.dtype
    return y.to(x.dtype).unsqueeze(0), final.to(state_dtype)
