"""The PyTorch paths of the grouped matrix product.

``torch._grouped_mm`` (one CUTLASS grouped GEMM) where the installed torch has it and the call fits
it: bf16 tensors on a CUDA device of compute capability 9.0 or newer, K and N multiples of 8 (16-byte
aligned rows). Otherwise a padded batched product: the rows of each group are scattered into an
[E, C, K] buffer (C the largest group), multiplied by one ``torch.bmm`` and gathered back; finding C
reads the group sizes on the host.

Shapes: M rows (sorted by group), K in-features, N out-features, E groups, C rows of the largest group.
"""

from __future__ import annotations

import torch

from seqblocks.ops.grouped_gemm.reference import group_starts

__all__ = ["native_grouped_mm_serves", "grouped_mm_torch", "grouped_wgrad_torch", "row_groups"]


def native_grouped_mm_serves(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``grouped_mm(x, other)`` (other [E, K, N]) or
    ``grouped_wgrad(x, other)`` (other [M, N]): see the module docstring."""
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if x.dtype != torch.bfloat16 or other.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return x.shape[-1] % 8 == 0 and other.shape[-1] % 8 == 0


def row_groups(offsets: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([M] group of each row, [M] index of each row inside its group), without a host sync."""
    rows = torch.arange(M, device=offsets.device)
    group = torch.searchsorted(offsets.long(), rows, right=True)
    return group, rows - group_starts(offsets.long())[group]


def _padded(t: torch.Tensor, offsets: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    group, slot = row_groups(offsets, t.shape[0])
    sizes = offsets.long() - group_starts(offsets.long())
    C = int(sizes.max()) if E else 0
    buf = t.new_zeros(E, max(C, 1), t.shape[1])
    buf[group, slot] = t
    return buf, group, slot


def _native(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offsets.to(torch.int32))


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *,
                     native: bool | None = None) -> torch.Tensor:
    """[M, N] ``x[rows of g] @ w[g]`` (no autograd of its own). ``native`` forces (True) or forbids
    (False) ``torch._grouped_mm``; None decides by ``native_grouped_mm_serves``."""
    use_native = native_grouped_mm_serves(x, w) if native is None else native
    if use_native:
        return _native(x.contiguous(), w, offsets)
    E, M = w.shape[0], x.shape[0]
    if M == 0:
        return x.new_zeros(0, w.shape[-1])
    buf, group, slot = _padded(x, offsets, E)
    return torch.bmm(buf, w)[group, slot]


def grouped_wgrad_torch(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, *,
                        native: bool | None = None) -> torch.Tensor:
    """[E, K, N] ``x[rows of g]^T @ dy[rows of g]`` (the weight gradient)."""
    E = offsets.shape[0]
    use_native = native_grouped_mm_serves(x, dy) if native is None else native
    if use_native:
        return _native(x.t(), dy.contiguous(), offsets)
    if x.shape[0] == 0:
        return x.new_zeros(E, x.shape[1], dy.shape[1])
    bx, _, _ = _padded(x, offsets, E)
    bdy, _, _ = _padded(dy, offsets, E)
    return torch.bmm(bx.transpose(1, 2), bdy)
