"""The check the Triton selective-scan kernel tests share: a launch against the float64 reference,
forward and backward with random cotangents on y and the final state (``tests/test_selective_scan_triton.py``,
``tests/test_selective_scan_chunked.py``; run under Triton's interpreter on the CPU), and the strided-gate
check they both run.

Shapes: B batch, T time, D channels, N state, G groups.
"""

from __future__ import annotations

import torch

from seqblocks.ops.selective_scan.reference import selective_scan_ref

__all__ = ["check", "check_strided_gate", "NAMES"]

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_A", "initial_state")


def check(*, Bsz=2, T=11, D=8, N=4, G=None, method="mamba", skip=True, gate=True, bias=True,
          softplus=True, delta_A=None, h0=False, lengths=None, cu_seqlens=None, dtype=torch.float32,
          tol=1e-4, tuning=None):
    """One launch of ``selective_scan_triton`` (with ``tuning``) against ``selective_scan_ref`` in
    float64: y, the final state and the gradient of every input, as relative norms under ``tol``
    (gradients: 3 * tol for 2-byte inputs). Returns the launch's (y, final state, grads by name)."""
    from seqblocks.ops.selective_scan.triton import selective_scan_triton

    u = torch.randn(Bsz, T, D).to(dtype)
    delta = (torch.randn(Bsz, T, D) * 0.5).to(dtype)
    A = -torch.rand(D, N) * 2 - 0.1
    Bm = torch.randn(Bsz, T, *((G,) if G else ()), N).to(dtype)
    Cm = torch.randn(Bsz, T, *((G,) if G else ()), N).to(dtype)
    dA = {None: None, "full": torch.rand(Bsz, T, D), "shared": torch.rand(Bsz, T)}[delta_A]
    n_seq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    ins = [u, delta, A, Bm, Cm, torch.randn(D) if skip else None, torch.randn(Bsz, T, D).to(dtype) if gate else None,
           torch.randn(D) * 0.3 if bias else None, dA, torch.randn(n_seq, D, N) if h0 else None]
    ins = [x.requires_grad_() if x is not None else None for x in ins]
    ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in ins]

    def kw(L):
        return dict(delta_bias=L[7], delta_softplus=softplus, discretization=method, delta_A=L[8],
                    initial_state=L[9], lengths=lengths, cu_seqlens=cu_seqlens)

    y, hT = selective_scan_triton(*ins[:7], **kw(ins), tuning=tuning)
    yr, hTr = selective_scan_ref(*ref_in[:7], **kw(ref_in))
    assert y.dtype == dtype and y.shape == yr.shape
    assert hT.dtype == torch.float32 and hT.shape == hTr.shape
    gy, gh = torch.randn_like(yr), torch.randn_like(hTr)
    live = [i for i, x in enumerate(ins) if x is not None]
    grads = torch.autograd.grad([y, hT], [ins[i] for i in live], [gy.to(dtype), gh.float()])
    grads_r = torch.autograd.grad([yr, hTr], [ref_in[i] for i in live], [gy, gh])

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert rel(y, yr) < tol, ("y", rel(y, yr))
    assert rel(hT, hTr) < tol, ("final state", rel(hT, hTr))
    for i, g, gr in zip(live, grads, grads_r):
        assert g.dtype == ins[i].dtype, NAMES[i]
        assert rel(g, gr) < (tol if dtype == torch.float32 else 3 * tol), (NAMES[i], rel(g, gr))
    return y, hT, {NAMES[i]: g for i, g in zip(live, grads)}


def check_strided_gate(scan) -> None:
    """``scan(u, delta, A, B, C, D, z, delta_softplus=True)`` with z a strided view (the second half of
    an in_proj output, as in Mamba): y and dz equal the float64 reference's, and nothing flows into
    the other half."""
    u, delta = torch.randn(2, 9, 4), torch.randn(2, 9, 4) * 0.5
    xz = torch.randn(2, 9, 8, requires_grad=True)
    z = xz[..., 4:]
    A, Bm, Cm, D = -torch.rand(4, 3) - 0.1, torch.randn(2, 9, 3), torch.randn(2, 9, 3), torch.randn(4)
    gy = torch.randn(2, 9, 4)
    y, _ = scan(u, delta, A, Bm, Cm, D, z, delta_softplus=True)
    (g,) = torch.autograd.grad(y, xz, gy)
    zr = z.detach().double().requires_grad_()
    yr, _ = selective_scan_ref(u.double(), delta.double(), A.double(), Bm.double(), Cm.double(), D.double(), zr,
                               delta_softplus=True)
    (gr,) = torch.autograd.grad(yr, zr, gy.double())
    torch.testing.assert_close(y, yr.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g[..., 4:], gr.float(), atol=1e-5, rtol=1e-5)
    assert g[..., :4].abs().sum() == 0
