"""linear_scan: the fast torch path against the sequential reference, forward and backward.

Shapes: B batch, T time, D state width.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks.ops.scan import linear_scan, linear_scan_ref
from seqblocks.ops.scan.torch import LinearScanFn, scan_inner

LENGTHS_T = (1, 7, 63, 65, 200)


def _inputs(B: int, T: int, D: int, dtype: torch.dtype, requires_grad: bool = True):
    mag = torch.rand(B, T, D, dtype=torch.float64) * 0.98
    if dtype.is_complex:
        a = torch.polar(mag, torch.rand(B, T, D, dtype=torch.float64) * 6.28).to(dtype)
    else:
        a = (mag * torch.sign(torch.randn(B, T, D, dtype=torch.float64))).to(dtype)
    b = torch.randn(B, T, D, dtype=dtype)
    h0 = torch.randn(B, D, dtype=dtype)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad), h0.requires_grad_(requires_grad)


def _grads(fn, a, b, h0, gh, gf, **kw):
    h, final = fn(a, b, h0, **kw)
    inputs = [t for t in (a, b, h0) if t is not None and t.requires_grad]
    loss = (h * gh.conj()).real.sum() + (final * gf.conj()).real.sum()
    return h, final, torch.autograd.grad(loss, inputs)


def _compare(a, b, h0, **kw):
    h_ref, f_ref = linear_scan_ref(a, b, h0, **kw)
    gh, gf = torch.randn_like(h_ref), torch.randn_like(f_ref)
    h, f, g = _grads(linear_scan, a, b, h0, gh, gf, **kw)
    _, _, g_ref = _grads(linear_scan_ref, a, b, h0, gh, gf, **kw)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(f, f_ref, atol=1e-10, rtol=1e-10)
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("T", LENGTHS_T)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_reference(T, dtype, reverse, with_h0):
    a, b, h0 = _inputs(2, T, 3, dtype)
    _compare(a, b, h0 if with_h0 else None, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_scan_lengths_match_reference_and_separate_runs(reverse, dtype):
    T = 65
    a, b, h0 = _inputs(4, T, 3, dtype)
    lengths = torch.tensor([65, 30, 0, 1])
    _compare(a, b, h0, reverse=reverse, lengths=lengths)
    h, final = linear_scan(a, b, h0, reverse=reverse, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, f_alone = linear_scan(a[i : i + 1, :n], b[i : i + 1, :n], h0[i : i + 1], reverse=reverse)
        torch.testing.assert_close(h[i : i + 1, :n], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[i], f_alone[0], atol=1e-12, rtol=0)
        assert torch.all(h[i, n:] == 0), "padding outputs must be 0"
    assert torch.equal(final[2], h0[2].detach()), "an empty row's final state is its initial state"


def test_scan_padding_is_never_read():
    a, b, h0 = _inputs(2, 20, 3, torch.complex128, requires_grad=False)
    lengths = torch.tensor([20, 9])
    h, final = linear_scan(a, b, h0, lengths=lengths)
    a2, b2 = a.clone(), b.clone()
    a2[1, 9:] = float("nan")
    b2[1, 9:] = float("nan")
    h2, final2 = linear_scan(a2, b2, h0, lengths=lengths)
    assert torch.equal(h, h2) and torch.equal(final, final2)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_scan_cu_seqlens_matches_reference_and_separate_runs(reverse, dtype):
    cu = torch.tensor([0, 7, 7, 70, 71, 100])
    a, b, _ = _inputs(1, 100, 3, dtype)
    h0 = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    _compare(a, b, h0, reverse=reverse, cu_seqlens=cu)
    _compare(a, b, None, reverse=reverse, cu_seqlens=cu)
    h, final = linear_scan(a, b, h0, reverse=reverse, cu_seqlens=cu)
    for i in range(5):
        s, e = int(cu[i]), int(cu[i + 1])
        alone, f_alone = linear_scan(a[:, s:e], b[:, s:e], h0[i : i + 1], reverse=reverse)
        torch.testing.assert_close(h[:, s:e], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[i], f_alone[0], atol=1e-12, rtol=0)


def test_scan_empty_time_axis():
    b = torch.randn(2, 0, 3)
    h, final = linear_scan(torch.rand(3), b)
    assert h.shape == (2, 0, 3) and torch.equal(final, torch.zeros(2, 3))
    h0 = torch.randn(2, 3)
    assert torch.equal(linear_scan(torch.rand(3), b, h0, lengths=torch.tensor([0, 0]))[1], h0)
    h, final = linear_scan(torch.rand(3), b[:1], cu_seqlens=torch.tensor([0, 0, 0]))
    assert final.shape == (2, 3) and torch.equal(final, torch.zeros(2, 3))


def test_scan_broadcast_lti_decay_and_mixed_real_complex():
    b = torch.randn(2, 33, 4, 5, dtype=torch.complex128, requires_grad=True)
    a = (torch.rand(4, 5, dtype=torch.float64) * 0.9).requires_grad_()  # real LTI decay [*S]
    _compare(a, b, None)
    h, final = linear_scan(a, b)
    assert h.shape == b.shape and h.dtype == torch.complex128 and final.shape == (2, 4, 5)


def test_scan_every_short_length_matches_reference():
    # Every odd / even pattern of the odd-even recursion up to four levels deep.
    a, b, _ = _inputs(2, 40, 3, torch.complex128, requires_grad=False)
    for T in range(1, 41):
        for reverse in (False, True):
            h_ref, _ = linear_scan_ref(a[:, :T], b[:, :T], reverse=reverse)
            h = scan_inner(a[:, :T].contiguous(), b[:, :T].contiguous(), reverse)
            torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    a[:, 5] = 0  # a zero decay cuts the chain
    for reverse in (False, True):
        torch.testing.assert_close(scan_inner(a, b, reverse), linear_scan_ref(a, b, reverse=reverse)[0],
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_inputs_keep_fp32_state(dtype):
    a = (torch.rand(2, 300, 8) * 0.99).to(dtype)
    b = torch.randn(2, 300, 8).to(dtype)
    h, final = linear_scan(a, b)
    assert h.dtype == dtype and final.dtype == torch.float32
    h_ref, f_ref = linear_scan_ref(a.double(), b.double())
    torch.testing.assert_close(final.double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck_custom_function(dtype, reverse):
    a, b, _ = _inputs(2, 9, 2, dtype)
    assert torch.autograd.gradcheck(lambda a, b: LinearScanFn.apply(a, b, reverse), (a, b))


def test_scan_errors():
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="broadcast"):
        linear_scan(torch.rand(4), b)
    with pytest.raises(ValueError, match="initial_state"):
        linear_scan(a, b, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lengths"):
        linear_scan(a, b, lengths=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="lengths"):
        linear_scan(a, b, lengths=torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="not both"):
        linear_scan(a[:1], b[:1], lengths=torch.tensor([5]), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_scan(a[:1], b[:1], cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="packed in a batch of 1, got batch 2"):
        linear_scan(a, b, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError):
        linear_scan(a, torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        linear_scan(a, b, backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):  # kernel exists (issue 8); CPU needs the interpreter
        linear_scan(a, b, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_scan_gpu_matches_reference(dtype):
    a, b, h0 = _inputs(3, 1000, 64, torch.complex128 if dtype.is_complex else torch.float64)
    lengths = torch.tensor([1000, 517, 0])
    h_ref, f_ref = linear_scan_ref(a, b, h0, lengths=lengths)
    gh, gf = torch.randn_like(h_ref), torch.randn_like(f_ref)
    _, _, g_ref = _grads(linear_scan, a, b, h0, gh, gf, lengths=lengths)  # fast path, float64 (tested above)
    cuda = [t.detach().to("cuda", dtype).requires_grad_() for t in (a, b, h0)]
    h, f, g = _grads(linear_scan, *cuda, gh.to("cuda", dtype), gf.to("cuda", dtype), lengths=lengths.cuda())
    torch.testing.assert_close(h.cpu().to(h_ref.dtype), h_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f.cpu().to(f_ref.dtype), f_ref, atol=1e-4, rtol=1e-4)
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x.cpu().to(y.dtype), y, atol=1e-3, rtol=1e-3)


def test_prefer_backend_region():
    """``prefer_backend`` steers "auto" only: torch inside "torch", the device rule outside, nesting restores."""
    from seqblocks.ops import prefer_backend, resolve_backend

    x = torch.zeros(1)
    with prefer_backend("torch"):
        assert resolve_backend("auto", x, op="t") == "torch"
        with prefer_backend("auto"):
            assert resolve_backend("auto", x, op="t") == "torch"  # CPU without the interpreter
        with prefer_backend("triton"):  # no CUDA and no interpreter: still the PyTorch path
            assert resolve_backend("auto", x, op="t", has_kernel=False) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with prefer_backend("cuda"):
            pass
    y = linear_scan(torch.full((1, 3, 2), 0.5), torch.ones(1, 3, 2))[0]
    with prefer_backend("torch"):
        assert torch.equal(linear_scan(torch.full((1, 3, 2), 0.5), torch.ones(1, 3, 2))[0], y)
