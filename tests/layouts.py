"""Strided views for the kernel tests: the same values in another memory layout, which a kernel that
indexes its inputs as contiguous would read in the wrong order."""

from __future__ import annotations

import torch


def time_innermost(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, ...] as a view with T innermost in memory (stride 1), as a short conv's transposed
    output is; equal to ``x``."""
    y = x.movedim(1, -1).contiguous().movedim(-1, 1)
    assert not y.is_contiguous() and y.stride(1) == 1 and torch.equal(y, x)
    return y
