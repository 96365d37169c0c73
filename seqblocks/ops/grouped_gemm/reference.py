"""The readable spec of the grouped matrix product: one ``x[rows of g] @ w[g]`` per group.

Shapes: M rows (sorted by group), K in-features, N out-features, E groups.
"""

from __future__ import annotations

import torch

__all__ = ["grouped_mm_ref", "grouped_wgrad_ref", "group_starts"]


def group_starts(offsets: torch.Tensor) -> torch.Tensor:
    """[E] first row of each group, from the cumulative end offsets."""
    return torch.cat([offsets.new_zeros(1), offsets[:-1]])


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[s_g:e_g] = x[s_g:e_g] @ w[g]`` for each group g, a Python loop over the groups.

    Args:
        x (Tensor): [M, K] rows sorted by group.
        w (Tensor): [E, K, N] one matrix per group.
        offsets (Tensor): [E] integer cumulative end rows (group g is rows offsets[g-1]..offsets[g]);
            offsets[-1] == M.

    Returns:
        Tensor: [M, N] in x's dtype (differentiable through autograd).
    """
    ends = [int(e) for e in offsets.tolist()]
    if ends and ends[-1] != x.shape[0]:
        raise ValueError(f"grouped_mm_ref: offsets[-1]={ends[-1]} must equal the row count {x.shape[0]}")
    out = []
    start = 0
    for g, end in enumerate(ends):
        out.append(x[start:end] @ w[g])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


def grouped_wgrad_ref(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``dw[g] = x[s_g:e_g]^T @ dy[s_g:e_g]``: [E, K, N] (zeros for an empty group)."""
    ends = [int(e) for e in offsets.tolist()]
    out = []
    start = 0
    for end in ends:
        out.append(x[start:end].transpose(0, 1) @ dy[start:end])
        start = end
    return torch.stack(out)
