"""GPU checks of the Triton linear-scan kernels at real shapes against the float64 reference path.

Marked ``gpu`` (excluded from the default run): ``python -m pytest -m gpu tests/test_scan_triton_gpu.py``.

Shapes: B batch, T time, D channels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.to(torch.complex128 if y.is_complex() else torch.float64), y.to(x.dtype if False else y.dtype)
    y = y.to(x.dtype)
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["dense", "lengths", "cu_seqlens"])
def test_linear_scan_triton_gpu(dtype, reverse, mode):
    from seqblocks.ops.scan.reference import linear_scan_ref
    from seqblocks.ops.scan.torch import linear_scan_torch
    from seqblocks.ops.scan.triton import linear_scan_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    B, T, D = (3, 1000, 300) if mode != "cu_seqlens" else (1, 1500, 300)
    mag = torch.rand(B, T, D, device="cuda", generator=g) * 0.2 + 0.8
    if dtype.is_complex:
        a = torch.polar(mag, torch.randn(B, T, D, device="cuda", generator=g))
    else:
        a = mag.to(dtype)
    b = torch.randn(B, T, D, device="cuda", generator=g).to(dtype) if not dtype.is_complex else \
        torch.randn(B, T, D, device="cuda", dtype=dtype, generator=g)
    lengths = torch.tensor([T, 0, 617], device="cuda") if mode == "lengths" else None
    cu = torch.tensor([0, 1, 400, 400, 1033, T], device="cuda") if mode == "cu_seqlens" else None
    n = B if cu is None else cu.numel() - 1
    sdt = torch.complex64 if dtype.is_complex else torch.float32
    h0 = torch.randn(n, D, device="cuda", generator=g).to(sdt)
    ins = [x.detach().requires_grad_() for x in (a, b, h0)]
    h, hT = linear_scan_triton(*ins, reverse=reverse, lengths=lengths, cu_seqlens=cu)
    hi = torch.complex128 if dtype.is_complex else torch.float64
    ref_in = [x.detach().to(hi).requires_grad_() for x in ins]
    if mode == "dense":
        hr, hTr = linear_scan_torch(*ref_in, reverse=reverse)
    else:
        hr, hTr = linear_scan_ref(*ref_in, reverse=reverse, lengths=lengths, cu_seqlens=cu)
    gh = torch.randn_like(hr)
    gT = torch.randn_like(hTr)
    grads = torch.autograd.grad([h, hT], ins, [gh.to(h.dtype), gT.to(hT.dtype)])
    grads_r = torch.autograd.grad([hr, hTr], ref_in, [gh, gT])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(h, hr) < tol
    assert _rel(hT, hTr) < 1e-5 if dtype != torch.bfloat16 else 1e-2
    for name, x, y in zip("a b h0".split(), grads, grads_r):
        assert _rel(x, y) < tol, name


@pytest.mark.parametrize(("method", "mode", "N"), [(m, mode, 16) for m in ("mamba", "zoh", "bilinear", "dirac")
                                                   for mode in ("dense", "lengths", "cu_seqlens")]
                         + [("zoh", "dense", 256), ("mamba", "lengths", 100)])
def test_selective_scan_triton_gpu(method, mode, N):
    from seqblocks.ops.selective_scan.reference import selective_scan_ref
    from seqblocks.ops.selective_scan.torch import selective_scan_torch
    from seqblocks.ops.selective_scan.triton import selective_scan_triton

    g = torch.Generator(device="cuda").manual_seed(2)
    Bsz, T, D, G = (2, 300, 64, 2) if mode != "cu_seqlens" else (1, 300, 64, 2)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale

    u, delta, z = rn(Bsz, T, D), rn(Bsz, T, D, scale=0.5), rn(Bsz, T, D)
    A = -torch.rand(D, N, device="cuda", generator=g) * 3 - 0.1
    Bm, Cm = rn(Bsz, T, G, N), rn(Bsz, T, G, N)
    Dv, bias = rn(D), rn(D, scale=0.3)
    delta_A = torch.rand(Bsz, T, D, device="cuda", generator=g) if method == "zoh" else None
    lengths = torch.tensor([T, 123], device="cuda") if mode == "lengths" else None
    cu = torch.tensor([0, 5, 150, 150, T], device="cuda") if mode == "cu_seqlens" else None
    n = Bsz if cu is None else cu.numel() - 1
    h0 = rn(n, D, N)
    ins = [x.requires_grad_() if x is not None else None for x in (u, delta, A, Bm, Cm, Dv, z, bias, delta_A, h0)]
    ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in ins]

    def kw(L):
        return dict(delta_bias=L[7], delta_softplus=True, discretization=method, delta_A=L[8],
                    initial_state=L[9], lengths=lengths, cu_seqlens=cu)

    y, hT = selective_scan_triton(*ins[:7], **kw(ins))
    if mode == "cu_seqlens":
        yr, hTr = selective_scan_ref(*ref_in[:7], **kw(ref_in))
    else:
        yr, hTr = selective_scan_torch(*ref_in[:7], **{k: v for k, v in kw(ref_in).items() if k != "cu_seqlens"})
    gy, gh = torch.randn_like(yr), torch.randn_like(hTr)
    live = [i for i, x in enumerate(ins) if x is not None]
    grads = torch.autograd.grad([y, hT], [ins[i] for i in live], [gy.float(), gh.float()])
    grads_r = torch.autograd.grad([yr, hTr], [ref_in[i] for i in live], [gy, gh])
    assert _rel(y, yr) < 1e-4
    assert _rel(hT, hTr) < 1e-4
    for i, x, r in zip(live, grads, grads_r):
        assert _rel(x, r) < 1e-3, i
