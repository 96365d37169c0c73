"""GPU checks that explicit kernel tuning (``ScanTuning``, ``SelectiveScanTuning``) changes speed only:
compiled kernels with non-default block shapes, warps and ring options give the default launch's
results, forward and backward.

Marked ``gpu`` (excluded from the default run): ``python -m pytest -m gpu tests/test_scan_tuning_gpu.py``.
The same property runs under Triton's interpreter in the default suite (tests/test_scan_triton.py,
tests/test_selective_scan_triton.py).

Shapes: B batch, T time, D channels, N state.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(fn, ins, seed=0):
    ins = [x.detach().clone().requires_grad_() for x in ins]
    outs = fn(*ins)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cot = [torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float32).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, ins, cot)
    return [o.detach() for o in outs], list(grads)


def _close(xs, ys, tol):
    for x, y in zip(xs, ys):
        rel = ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
        assert rel < tol, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.complex64])
@pytest.mark.parametrize("fields", [dict(block_t=16, block_d=32, num_warps=1),
                                    dict(block_t=64, block_d=128, num_warps=4),
                                    dict(bwd_block_d=64, bwd_num_warps=2),
                                    dict(block_t=8, block_d=16, bwd_block_d=16)])
def test_linear_scan_tuning_gpu(dtype, fields):
    from seqblocks.ops.scan import ScanTuning
    from seqblocks.ops.scan.triton import linear_scan_triton

    B, T, D = 2, 1000, 300
    mag = torch.rand(B, T, D, device="cuda") * 0.1 + 0.9
    if dtype.is_complex:
        a, b = torch.polar(mag, torch.randn(B, T, D, device="cuda")), torch.randn(B, T, D, device="cuda", dtype=dtype)
    else:
        a, b = mag.to(dtype), torch.randn(B, T, D, device="cuda").to(dtype)
    tuning = ScanTuning(**fields)
    out_t, g_t = _run(lambda a, b: linear_scan_triton(a, b, tuning=tuning), [a, b])
    out_d, g_d = _run(lambda a, b: linear_scan_triton(a, b), [a, b])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    _close(out_t, out_d, tol)
    _close(g_t, g_d, tol)


@pytest.mark.parametrize("fields", [dict(fwd_block_d=16, fwd_num_warps=1, fwd_ring=2),
                                    dict(fwd_block_d=64, fwd_num_warps=2),
                                    dict(block_t=32, bwd_block_d=32, bwd_num_warps=1),
                                    dict(block_t=8, bwd_block_d=64, bwd_num_warps=2),
                                    dict(bwd_prefetch=True), dict(bwd_prefetch=None)])
def test_selective_scan_tuning_gpu(fields):
    from seqblocks.ops.selective_scan import SelectiveScanTuning
    from seqblocks.ops.selective_scan.triton import selective_scan_triton

    Bsz, T, D, N = 2, 700, 256, 16
    u = torch.randn(Bsz, T, D, device="cuda").bfloat16()
    delta = (torch.randn(Bsz, T, D, device="cuda") * 0.5 - 1).bfloat16()
    A = -torch.rand(D, N, device="cuda") * 4 - 0.5
    Bm, Cm = torch.randn(Bsz, T, N, device="cuda").bfloat16(), torch.randn(Bsz, T, N, device="cuda").bfloat16()
    Dv, bias = torch.randn(D, device="cuda"), torch.randn(D, device="cuda")
    z = torch.randn(Bsz, T, D, device="cuda").bfloat16()
    tuning = SelectiveScanTuning(**fields)

    def call(tuning):
        return lambda *x: selective_scan_triton(*x[:7], delta_bias=x[7], delta_softplus=True, tuning=tuning)

    ins = [u, delta, A, Bm, Cm, Dv, z, bias]
    out_t, g_t = _run(call(tuning), ins)
    out_d, g_d = _run(call(None), ins)
    _close(out_t, out_d, 1e-2)
    _close(g_t, g_d, 2e-2)
