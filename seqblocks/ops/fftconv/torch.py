"""FFT long convolution: causal (and optionally anti-causal) per-channel kernels plus a skip term.

The input and the kernels are zero-padded to a fast FFT size ``n >= T + L - 1`` so that the circular
convolution equals the linear one; the anti-causal kernel sits at the negative lags ``n - j`` of the
same padded kernel, so a bidirectional convolution costs one FFT of the kernel and one of the input.
Real inputs use ``rfft``; complex inputs or kernels use the full ``fft``. All transforms run in fp32 /
complex64 (64-bit for 64-bit inputs): cuFFT has no bf16 path and half precision loses the kernel's tail.

Shapes: B batch, T time, D channels, L kernel length, F frequencies.
"""

from __future__ import annotations

import torch

from seqblocks.ops.scan.reference import state_dtype

__all__ = ["fftconv_torch", "fft_size"]


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes that FFT libraries handle fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fftconv_torch(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    k_rev: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FFT path of ``seqblocks.ops.fftconv.fftconv``; inputs are assumed valid."""
    dtypes = [u.dtype, k.dtype] + [t.dtype for t in (D, k_rev) if t is not None]
    out_dtype = u.dtype
    for d in dtypes[1:]:
        out_dtype = torch.promote_types(out_dtype, d)
    cdt = state_dtype(*dtypes)
    B, T, C = u.shape
    L = min(k.shape[-1], T)
    L_rev = 0 if k_rev is None else min(k_rev.shape[-1], T)
    n = fft_size(T + max(L, L_rev))
    is_complex = cdt.is_complex
    kern = torch.zeros(C, n, dtype=cdt, device=u.device)
    kern[:, :L] = k[:, :L].to(cdt)
    if k_rev is not None:
        kern[:, 0] = kern[:, 0] + k_rev[:, 0].to(cdt)
        if L_rev > 1:
            # Lag -j of the anti-causal kernel lives at index n - j of the circular kernel.
            kern[:, n - L_rev + 1 :] = k_rev[:, 1:L_rev].flip(-1).to(cdt)
    uc = u.to(cdt).transpose(1, 2)  # [B, D, T]
    if is_complex:
        y = torch.fft.ifft(torch.fft.fft(uc, n=n) * torch.fft.fft(kern, n=n), n=n)[..., :T]
    else:
        y = torch.fft.irfft(torch.fft.rfft(uc, n=n) * torch.fft.rfft(kern, n=n), n=n)[..., :T]
    y = y.transpose(1, 2)
    if D is not None:
        y = y + D.to(cdt) * u.to(cdt)
    return y.to(out_dtype)
