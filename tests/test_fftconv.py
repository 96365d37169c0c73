"""fftconv against the direct convolution, and the SSM kernel generators against their definitions.

Shapes: B batch, T time, D channels, L kernel length, H channels, N state size.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks.layers.ssm_init import nplr
from seqblocks.ops.fftconv import fft_size, fftconv, fftconv_ref
from seqblocks.ops.ssm_conv_kernels import dplr_kernel, dplr_kernel_direct, ssm_powers, vandermonde_kernel


def _grads(fn, tensors, cot, **kw):
    y = fn(*tensors, **kw)
    loss = (y * cot.conj()).real.sum()
    leaves = [t for t in list(tensors) + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    return y, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("T", [1, 7, 63, 65, 200])
@pytest.mark.parametrize("complex_u", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fftconv_matches_reference(T, complex_u, bidirectional):
    dt = torch.complex128 if complex_u else torch.float64
    u = torch.randn(2, T, 3, dtype=dt, requires_grad=True)
    k = torch.randn(3, max(1, T - 2), dtype=torch.float64, requires_grad=True)  # shorter than T
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    kw = {"k_rev": torch.randn(3, T + 3, dtype=torch.float64, requires_grad=True)} if bidirectional else {}
    y_ref = fftconv_ref(u, k, D, **kw)
    cot = torch.randn_like(y_ref)
    y, g = _grads(fftconv, (u, k, D), cot, **kw)
    _, g_ref = _grads(fftconv_ref, (u, k, D), cot, **kw)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_fftconv_complex_kernel_and_half_input():
    u = torch.randn(2, 40, 3, dtype=torch.float64)
    k = torch.randn(3, 40, dtype=torch.complex128)
    torch.testing.assert_close(fftconv(u, k), fftconv_ref(u, k), atol=1e-10, rtol=1e-10)
    y = fftconv(u.bfloat16(), k.real.float(), torch.ones(3))
    assert y.dtype == torch.float32  # promoted with the fp32 kernel
    y = fftconv(u.bfloat16(), k.real.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), fftconv_ref(u.bfloat16().double(), k.real.bfloat16().double()),
                               atol=0.1, rtol=0.02)


def test_fft_size_is_smooth_and_large_enough():
    for n in [1, 2, 7, 100, 129, 1000, 4097]:
        m = fft_size(n)
        assert m >= n and m < 2 * n + 1
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1


def test_fftconv_errors():
    u = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="k must be"):
        fftconv(u, torch.randn(4, 5))
    with pytest.raises(ValueError, match="D must"):
        fftconv(u, torch.randn(3, 5), torch.randn(2))
    with pytest.raises(ValueError, match="u must"):
        fftconv(u[0], torch.randn(3, 5))
    with pytest.raises(TypeError):
        fftconv(u.long(), torch.randn(3, 5))


def test_vandermonde_kernel_is_the_power_sum():
    w = torch.randn(4, 6, dtype=torch.complex128)
    log_lam = torch.complex(-torch.rand(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64))
    K = vandermonde_kernel(w, log_lam, 9)
    lam = torch.exp(log_lam)
    direct = torch.stack([(w * lam**l).sum(-1) for l in range(9)], -1)
    torch.testing.assert_close(K, direct, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ssm_powers(log_lam, 3)[..., 2], lam * lam, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("measure", ["legs", "legt", "fourier"])
@pytest.mark.parametrize("L", [1, 6, 7, 40])
def test_dplr_cauchy_woodbury_kernel_matches_dense_powers(measure, L):
    H, N = 3, 8
    lam, P, B, _ = nplr(measure, N)
    lam = torch.complex(lam.real.clamp(max=-1e-2), lam.imag)  # Re < 0 (legt / fourier sit at 0)
    C = torch.randn(H, N // 2, dtype=torch.complex128)
    dt = torch.tensor([0.01, 0.1, 0.7], dtype=torch.float64)
    args = (lam.expand(H, -1), P.expand(H, -1, -1), B.expand(H, -1), C, dt, L)
    torch.testing.assert_close(dplr_kernel(*args), dplr_kernel_direct(*args), atol=1e-11, rtol=1e-9)


def test_dplr_kernel_gradient_matches_dense_powers():
    H, N = 2, 6
    lam, P, B, _ = nplr("legs", N)
    params = [t.expand(H, *t.shape).clone().requires_grad_() for t in (lam, P, B)]
    C = torch.randn(H, N // 2, dtype=torch.complex128, requires_grad=True)
    dt = torch.tensor([0.05, 0.3], dtype=torch.float64, requires_grad=True)
    cot = torch.randn(H, 12, dtype=torch.float64)
    leaves = params + [C, dt]
    g1 = torch.autograd.grad((dplr_kernel(*params, C, dt, 12) * cot).sum(), leaves)
    g2 = torch.autograd.grad((dplr_kernel_direct(*params, C, dt, 12) * cot).sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
