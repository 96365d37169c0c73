"""The Triton selective-scan kernels against the reference, forward and backward, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process.

Shapes: B batch, T time, D channels, N state, G groups.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from selective_scan_cases import check as _check  # noqa: E402
from selective_scan_cases import check_strided_gate  # noqa: E402

from seqblocks.ops.selective_scan.reference import selective_scan_ref  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


@pytest.mark.parametrize("method", ["mamba", "zoh", "bilinear", "dirac"])
def test_discretizations(method):
    _check(method=method, h0=True)


@pytest.mark.parametrize("T", [1, 7, 65])
def test_odd_lengths(T):
    _check(T=T, D=4)


@pytest.mark.parametrize(("method", "delta_A"), [("zoh", "full"), ("mamba", "shared"), ("bilinear", "full")])
def test_separate_A_step(method, delta_A):
    _check(method=method, delta_A=delta_A, h0=True)


def test_groups_and_no_options():
    _check(G=2, h0=True)
    _check(skip=False, gate=False, bias=False, softplus=False, T=9)


def test_variable_lengths():
    _check(Bsz=3, T=13, lengths=torch.tensor([13, 0, 6]), h0=True)


def test_packed_sequences():
    _check(Bsz=1, T=15, cu_seqlens=torch.tensor([0, 1, 9, 9, 15]), h0=True)


def test_bf16_inputs():
    # inputs and outputs rounded to bf16; the state and every reduction stay fp32
    _check(dtype=torch.bfloat16, T=9, tol=1e-2)


def test_d_state_not_a_power_of_two():
    _check(N=5, D=4, T=7, h0=True)


def test_d_state_256():
    _check(N=256, D=2, T=5, h0=True, method="zoh")



def test_gate_as_a_strided_view():
    """z read through its strides (Mamba's z is the second half of in_proj's output): no copy, same
    result and gradients as a contiguous z."""
    from seqblocks.ops.selective_scan.triton import selective_scan_triton

    check_strided_gate(selective_scan_triton)


def test_dispatch_through_op():
    """``selective_scan(backend="triton")`` reaches the kernel on CPU tensors under the interpreter."""
    from seqblocks.ops.selective_scan import selective_scan

    u, delta, z = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    A, Bm, Cm = -torch.rand(4, 3) - 0.1, torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    y, hT = selective_scan(u, delta, A, Bm, Cm, None, z, delta_softplus=True, backend="triton")
    yr, hTr = selective_scan_ref(u, delta, A, Bm, Cm, None, z, delta_softplus=True)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hT, hTr, atol=1e-5, rtol=1e-5)


TUNINGS = [dict(fwd_block_d=2, fwd_num_warps=2, fwd_ring=2), dict(block_t=16, bwd_block_d=2, bwd_num_warps=2),
           dict(bwd_prefetch=True), dict(bwd_prefetch=None, block_t=32, fwd_block_d=8, bwd_block_d=8),
           dict(block_t=8, ckpt_t=8), dict(block_t=8, ckpt_t=32), dict(block_t=16, ckpt_t=8)]


@pytest.mark.parametrize(("T", "ckpt_t", "lengths"), [(40, 16, None), (37, 32, [37, 17, 16, 8, 0]), (3, 64, None)])
def test_two_level_checkpoints(T, ckpt_t, lengths):
    """Checkpoints every ckpt_t steps, chunks of 8: sequences ending inside, at and before a segment's
    end (rebuilt sub-checkpoints of a partial segment), against the reference forward and backward."""
    from seqblocks.ops.selective_scan import SelectiveScanTuning

    lens = None if lengths is None else torch.tensor(lengths)
    _check(Bsz=1 if lens is None else lens.numel(), T=T, D=4, h0=True, lengths=lens,
           tuning=SelectiveScanTuning(block_t=8, ckpt_t=ckpt_t))


def test_two_level_checkpoints_bf16_packed():
    from seqblocks.ops.selective_scan import SelectiveScanTuning

    _check(Bsz=1, T=35, D=4, cu_seqlens=torch.tensor([0, 17, 18, 35]), h0=True, dtype=torch.bfloat16, tol=1e-2,
           tuning=SelectiveScanTuning(block_t=8, ckpt_t=16))


@pytest.mark.parametrize("fields", TUNINGS)
def test_non_default_tuning_gives_the_same_result(fields):
    """Launch options change how the work is split, never the result (forward and backward against the
    reference, with groups, lengths, an initial state, a shared A step and an odd length)."""
    from seqblocks.ops.selective_scan import SelectiveScanTuning

    tuning = SelectiveScanTuning(**fields)
    _check(T=11, D=4, G=2, h0=True, lengths=torch.tensor([11, 6]), delta_A="shared", tuning=tuning)


def test_tuning_through_the_op_and_its_checks():
    from seqblocks.ops.selective_scan import SelectiveScanTuning, selective_scan

    u, delta, z = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    A, Bm, Cm = -torch.rand(4, 3) - 0.1, torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    tuned = SelectiveScanTuning(fwd_block_d=1, fwd_ring=2, block_t=8, bwd_block_d=1)
    y, hT = selective_scan(u, delta, A, Bm, Cm, None, z, delta_softplus=True, backend="triton", tuning=tuned)
    yr, hTr = selective_scan_ref(u, delta, A, Bm, Cm, None, z, delta_softplus=True)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hT, hTr, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="tuning must be a SelectiveScanTuning"):
        selective_scan(u, delta, A, Bm, Cm, backend="triton", tuning={"block_t": 8})
    with pytest.raises(ValueError, match="block_t=4 must be a power of two >= 8"):
        SelectiveScanTuning(block_t=4)
    with pytest.raises(ValueError, match="fwd_ring=3"):
        SelectiveScanTuning(fwd_ring=3)
    with pytest.raises(TypeError, match="bwd_prefetch"):
        SelectiveScanTuning(bwd_prefetch=1)


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring).
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_interpreter"]:
        del globals()[_name]
