"""The Triton linear-scan kernels against the reference, forward and backward, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), so CI checks them without a GPU;
``tests/interpreter.py`` says why the cases run in a child process.

Shapes: B batch, T time, S state shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.scan.reference import linear_scan_ref  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _scan(*args, **kwargs):
    from seqblocks.ops.scan import triton as scan_triton

    return scan_triton.linear_scan_triton(*args, **kwargs)


def _inputs(B, T, S, *, complex_=False, dtype=torch.float32, lti=False):
    mag = torch.rand(B, T, *S) * 0.5 + 0.5
    if complex_:
        a = torch.polar(mag, torch.randn(B, T, *S))
        b = torch.randn(B, T, *S, dtype=torch.complex64)
    else:
        a, b = mag.to(dtype), torch.randn(B, T, *S).to(dtype)
    if lti:
        a = a[0, 0].clone()
    return a, b


def _check(a, b, h0=None, *, atol=1e-5, tuning=None, **kw):
    """Forward and backward (random cotangents on h and on the final state) against the reference in
    float64 / complex128; ``tuning`` goes to the kernel only."""
    ins = [x.detach().requires_grad_() for x in (a, b, h0) if x is not None]
    wide = torch.complex128 if any(x.is_complex() for x in ins) else torch.float64
    ref_in = [x.detach().to(wide if x.is_complex() else torch.float64).requires_grad_() for x in ins]
    h, hT = _scan(*ins[:2], ins[2] if h0 is not None else None, tuning=tuning, **kw)
    hr, hTr = linear_scan_ref(*ref_in[:2], ref_in[2] if h0 is not None else None, **kw)
    assert h.dtype == torch.promote_types(a.dtype, b.dtype)
    assert hT.dtype == (torch.complex64 if hTr.is_complex() else torch.float32)
    gh, gT = torch.randn_like(hr), torch.randn_like(hTr)
    grads = torch.autograd.grad([h, hT], ins, [gh.to(h.dtype), gT.to(hT.dtype)])
    grads_r = torch.autograd.grad([hr, hTr], ref_in, [gh, gT])
    scale = max(1.0, hr.abs().max().item())
    torch.testing.assert_close(h.to(hr.dtype), hr, atol=atol * scale, rtol=0)
    torch.testing.assert_close(hT.to(hTr.dtype), hTr, atol=1e-5 * scale, rtol=0)
    for name, g, gr in zip(("a", "b", "h0"), grads, grads_r):
        assert g.dtype == ins[("a", "b", "h0").index(name)].dtype, name
        s = max(1.0, gr.abs().max().item())
        torch.testing.assert_close(g.to(gr.dtype), gr, atol=atol * s, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("T", [1, 7, 63, 65])
@pytest.mark.parametrize("with_h0", [False, True])
def test_lengths_and_initial_state(T, with_h0):
    a, b = _inputs(2, T, (5,))
    _check(a, b, torch.randn(2, 5) if with_h0 else None)


@pytest.mark.parametrize("T", [7, 33])
def test_reverse(T):
    a, b = _inputs(2, T, (2, 3))
    _check(a, b, torch.randn(2, 2, 3), reverse=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_variable_lengths(reverse):
    a, b = _inputs(3, 21, (5,))
    _check(a, b, torch.randn(3, 5), lengths=torch.tensor([21, 0, 9]), reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences(reverse):
    a, b = _inputs(1, 40, (5,))
    cu = torch.tensor([0, 0, 1, 17, 17, 40])  # empty sequences and a length-1 one included
    _check(a, b, torch.randn(5, 5), cu_seqlens=cu, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_complex(reverse):
    a, b = _inputs(2, 19, (5,), complex_=True)
    _check(a, b, torch.randn(2, 5, dtype=torch.complex64), reverse=reverse)
    _check(a, b, None, lengths=torch.tensor([19, 4]))


def test_mixed_real_decay_complex_input():
    a, _ = _inputs(2, 9, (3,))
    _, b = _inputs(2, 9, (3,), complex_=True)
    _check(a, b)


def test_time_invariant_decay():
    a, b = _inputs(2, 19, (5,), lti=True)  # a: [S], broadcast over batch and time
    _check(a, b, torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    a, b = _inputs(2, 37, (6,), dtype=dtype)
    # outputs and gradients are rounded to the input dtype; the state stays fp32
    _check(a, b, torch.randn(2, 6), atol=2e-2)


def test_only_final_state_used():
    a, b = _inputs(2, 20, (4,))
    a.requires_grad_()
    b.requires_grad_()
    _, hT = _scan(a, b)
    ga, gb = torch.autograd.grad(hT.sum(), [a, b])
    _, hTr = linear_scan_ref(a.double(), b.double())
    ga_r, gb_r = torch.autograd.grad(hTr.sum(), [a, b])
    torch.testing.assert_close(ga, ga_r.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(gb, gb_r.float(), atol=1e-5, rtol=0)


def test_dispatch_through_op():
    """``linear_scan(backend="triton")`` reaches the kernel on CPU tensors under the interpreter."""
    from seqblocks.ops.scan import linear_scan

    a, b = _inputs(2, 9, (3,))
    h, hT = linear_scan(a, b, backend="triton")
    hr, hTr = linear_scan_ref(a, b)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)
    torch.testing.assert_close(hT, hTr, atol=1e-5, rtol=0)


TUNINGS = [dict(block_t=4, block_d=2, num_warps=2), dict(block_t=32, block_d=8, num_warps=1),
           dict(block_t=8, bwd_block_d=2, bwd_num_warps=2), dict(block_d=1, bwd_block_d=32)]


@pytest.mark.parametrize(("fields", "case"), [(t, "real") for t in TUNINGS] + [
    (TUNINGS[0], "complex_reverse"), (TUNINGS[2], "complex_reverse"), (TUNINGS[1], "varlen"), (TUNINGS[3], "packed")])
def test_non_default_tuning_gives_the_same_result(fields, case):
    """Block shapes and warps change how the work is split, never the result: forward and backward
    match the reference and the default launch."""
    from seqblocks.ops.scan import ScanTuning

    tuning = ScanTuning(**fields)
    kw = {"real": {}, "complex_reverse": dict(reverse=True), "varlen": dict(lengths=torch.tensor([13, 0, 9])),
          "packed": dict(cu_seqlens=torch.tensor([0, 5, 5, 13]))}[case]
    a, b = _inputs(1 if case == "packed" else 3, 13, (4,), complex_=case == "complex_reverse")
    h0 = torch.randn(3, 4, dtype=b.dtype)
    _check(a, b, h0, tuning=tuning, **kw)
    h_tuned, hT_tuned = _scan(a, b, h0, tuning=tuning, **kw)
    h_default, hT_default = _scan(a, b, h0, **kw)
    torch.testing.assert_close(h_tuned, h_default, atol=1e-5, rtol=0)
    torch.testing.assert_close(hT_tuned, hT_default, atol=1e-5, rtol=0)


def test_tuning_through_the_op_and_its_checks():
    from seqblocks.ops.scan import ScanTuning, linear_scan

    a, b = _inputs(2, 9, (3,))
    h, hT = linear_scan(a, b, backend="triton", tuning=ScanTuning(block_t=2, block_d=4))
    hr, hTr = linear_scan_ref(a, b)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=0)
    torch.testing.assert_close(hT, hTr, atol=1e-5, rtol=0)
    # the PyTorch path takes (and ignores) the same argument
    h_t, _ = linear_scan(a, b, backend="torch", tuning=ScanTuning(block_t=2))
    torch.testing.assert_close(h_t, hr, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="tuning must be a ScanTuning"):
        linear_scan(a, b, backend="triton", tuning=(32, 64, 2))
    with pytest.raises(ValueError, match="block_t=24 must be a power of two"):
        ScanTuning(block_t=24)
    with pytest.raises(ValueError, match="num_warps=3"):
        ScanTuning(num_warps=3)
    with pytest.raises(TypeError, match="block_d must be an int"):
        ScanTuning(block_d=32.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScanTuning().block_t = 8


def test_prefer_backend_triton_runs_kernels_on_cpu_under_interpreter():
    """Under the interpreter, ``prefer_backend("triton")`` sends "auto" calls on CPU tensors to the kernel."""
    from seqblocks.ops import linear_scan, prefer_backend, resolve_backend

    a, b = _inputs(2, 9, (3,))
    assert resolve_backend("auto", a, op="t") == "torch"
    with prefer_backend("triton"):
        assert resolve_backend("auto", a, op="t") == "triton"
        assert resolve_backend("auto", a, op="t", has_kernel=False) == "torch"
        h = linear_scan(a, b)[0]
    torch.testing.assert_close(h, _scan(a, b)[0])


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring).
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_interpreter"]:
        del globals()[_name]

