"""Long convolution by FFT with a skip term: the convolutional mode of the LTI state-space mixers.

``fftconv(u, k, D)`` computes ``y_t = sum_{s <= t} k[:, t - s] * u_s + D * u_t`` per channel; with
``k_rev`` it adds the anti-causal ``sum_{s >= t} k_rev[:, s - t] * u_s`` (the reversed pass of a
bidirectional SSM). ``reference.py`` is the direct O(T^2) spec, ``torch.py`` the FFT path.

Shapes: B batch, T time, D channels, L kernel length.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.fftconv.reference import fftconv_ref
from seqblocks.ops.fftconv.torch import fft_size, fftconv_torch

__all__ = ["fftconv", "fftconv_ref", "fft_size"]


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@outside_autocast
def fftconv(
    u: Tensor,
    k: Tensor,
    D: Tensor | None = None,
    *,
    k_rev: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-channel causal long convolution of ``u`` with ``k`` plus ``D * u``.

    Transforms run in fp32 / complex64 whatever the input dtype (64-bit for 64-bit inputs).

    Args:
        u (Tensor): [B, T, D] input, real or complex.
        k (Tensor): [D, L] causal kernel (lag 0 first), real or complex; lags >= T are ignored and
            a kernel shorter than T is zero beyond L.
        D (Tensor | None): [D] skip weights. Default: None (no skip).
        k_rev (Tensor | None): [D, L'] anti-causal kernel: ``y_t += sum_{s >= t} k_rev[:, s - t] u_s``.
            Default: None (causal only).
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        Tensor: [B, T, D] in the promoted dtype of the inputs (real only when all inputs are real).

    Raises:
        TypeError: non-floating inputs.
        ValueError: shapes that do not match.
    """
    named = (("u", u), ("k", k), ("D", D), ("k_rev", k_rev))
    for name, t in named:
        if t is not None and not _is_float(t):
            raise TypeError(f"fftconv: {name} must be floating point or complex, got {t.dtype}")
    if u.dim() != 3:
        raise ValueError(f"fftconv: u must be [B, T, D], got shape {tuple(u.shape)}")
    C = u.shape[-1]
    for name, t in (("k", k), ("k_rev", k_rev)):
        if t is not None and (t.dim() != 2 or t.shape[0] != C or t.shape[1] < 1):
            raise ValueError(f"fftconv: {name} must be [{C}, L] with L >= 1, got shape {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (C,):
        raise ValueError(f"fftconv: D must have shape ({C},), got {tuple(D.shape)}")
    resolve_backend(backend, u, k, op="fftconv", has_kernel=False)
    return fftconv_torch(u, k, D, k_rev=k_rev)
