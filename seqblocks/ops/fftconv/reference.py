"""Reference (the spec) of the long convolution with a skip term.

``y_t = sum_{s <= t} k[t - s] u_s  (+ sum_{s >= t} k_rev[s - t] u_s)  + D * u_t`` computed directly,
one output position at a time, in fp32 / complex64 (64-bit when an input is).

Shapes: B batch, T time, D channels, L kernel length.
"""

from __future__ import annotations

import torch

from seqblocks.ops.scan.reference import state_dtype

__all__ = ["fftconv_ref"]


def fftconv_ref(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    k_rev: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct O(T^2) evaluation of ``seqblocks.ops.fftconv.fftconv`` (see there for the contract)."""
    dtypes = [u.dtype, k.dtype] + [t.dtype for t in (D, k_rev) if t is not None]
    out_dtype = u.dtype
    for d in dtypes[1:]:
        out_dtype = torch.promote_types(out_dtype, d)
    cdt = state_dtype(*dtypes)
    B, T, C = u.shape
    u = u.to(cdt)
    y = torch.zeros(B, T, C, dtype=cdt, device=u.device)
    k = k.to(cdt)
    k_rev = None if k_rev is None else k_rev.to(cdt)
    for t in range(T):
        # Past inputs s in [t - L + 1, t] meet the kernel at lag t - s.
        s = torch.arange(max(0, t - k.shape[-1] + 1), t + 1, device=u.device)
        y[:, t] = (k[:, t - s].T * u[:, s]).sum(1)
        if k_rev is not None:
            s = torch.arange(t, min(T, t + k_rev.shape[-1]), device=u.device)
            y[:, t] = y[:, t] + (k_rev[:, s - t].T * u[:, s]).sum(1)
    if D is not None:
        y = y + D.to(cdt) * u
    return y.to(out_dtype)
