"""Packed sequences (``cu_seqlens``), checked once for every op that takes them.

``cu_seqlens`` [S + 1] holds the offsets of S sequences packed along the time axis of a batch of one:
sequence i is ``x[0, cu_seqlens[i]:cu_seqlens[i + 1]]``. ``unpack`` / ``pack`` turn that into a zero-padded
batch and back, the way the PyTorch paths serve packed input. Reading its values costs one host sync, paid
here, at the op's entry, by every op alike.
"""

from __future__ import annotations

import torch

from seqblocks.cache import host_sync_unsafe

__all__ = ["check_cu_seqlens", "unpack", "pack"]


def check_cu_seqlens(op: str, cu_seqlens: object, batch: int, T: int) -> int:
    """Raise ``TypeError`` / ``ValueError`` naming the fault; return the number of sequences S.

    ``cu_seqlens`` must be a 1-D int32 / int64 tensor of at least two entries rising from 0 to ``T``
    without decreasing (empty sequences allowed), and the batch must be 1. The values are not read
    where a host sync is unsafe (CUDA-graph capture, ``torch.compile``: ``cache.host_sync_unsafe``).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{op}: cu_seqlens must be an int32 / int64 tensor [num_seqs + 1], got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [num_seqs + 1] with num_seqs >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"{op}: with cu_seqlens the sequences are packed in a batch of 1, got batch {batch}")
    if host_sync_unsafe():
        return cu_seqlens.numel() - 1
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens.diff() < 0).any()):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to T={T} without decreasing, got {cu_seqlens.tolist()}")
    return cu_seqlens.numel() - 1


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [1, total, ...] -> (padded [num_seqs, max_len, ...], lengths [num_seqs]); padding is 0."""
    lengths = cu_seqlens.diff().long()
    S, L = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    t = torch.arange(L, device=x.device)
    valid = t < lengths.unsqueeze(1)
    idx = (cu_seqlens[:-1].long().unsqueeze(1) + t).clamp(max=max(x.shape[1] - 1, 0))
    out = x[0][idx]  # [S, L, ...]
    mask = valid.view(S, L, *([1] * (x.dim() - 2)))
    return torch.where(mask, out, torch.zeros((), dtype=x.dtype, device=x.device)), lengths


def pack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack``: padded [num_seqs, max_len, ...] -> packed [1, total, ...]."""
    lengths = cu_seqlens.diff().long()
    valid = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)
    return x[valid].unsqueeze(0)
