"""Packed sequences (``cu_seqlens``), checked once for every op that takes them.

``cu_seqlens`` [S + 1] holds the offsets of S sequences packed along the time axis of a batch of one:
sequence i is ``x[0, cu_seqlens[i]:cu_seqlens[i + 1]]``. Reading its values costs one host sync, paid
here, at the op's entry, by every op alike.
"""

from __future__ import annotations

import torch

from seqblocks.cache import host_sync_unsafe

__all__ = ["check_cu_seqlens"]


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
