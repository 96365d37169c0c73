"""``dot`` for the Triton kernels that multiply fp32 or half-precision tiles (SSD, grouped GEMM), and
``dot_mode``, the host-side choice of its mode. Imported only by the ops' ``triton.py`` modules.

Modes: 1 for fp32 operands (exact IEEE products, no tf32); 2 under Triton's interpreter, whose
``tl.dot`` misreads bf16 / fp16 operands, so their (already rounded) values are multiplied in fp32;
0 for half operands on a GPU (tensor cores). Accumulation is fp32 in every mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqblocks.ops._backend import interpreter_enabled

__all__ = ["dot", "dot_mode"]


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


def dot_mode(x: torch.Tensor) -> int:
    """``dot``'s mode for operands of ``x``'s dtype (module docstring)."""
    if x.dtype == torch.float32:
        return 1
    return 2 if interpreter_enabled() else 0
