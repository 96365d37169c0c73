"""The chunked Triton selective-scan kernels (``SelectiveScanTuning(kernel="chunked")``,
``seqblocks/ops/selective_scan/triton_chunked.py``) against the reference, forward and backward with
random cotangents on y and the final state, on the CPU under Triton's interpreter (``tests/interpreter.py``
says why the cases run in a child process); the same function as the ring kernels; and, marked slow,
every variant the launcher produces compiled for sm_90 by Triton's own compiler (no GPU needed).

Interpreted, the chunks are 4 steps of 4 channels and the checkpoints 8 steps apart, so T = 33 and 65
cross chunks and checkpoint segments. Shapes: B batch, T time, D channels, N state, G groups.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from selective_scan_cases import check, check_strided_gate  # noqa: E402

from seqblocks.ops.selective_scan import SelectiveScanTuning  # noqa: E402

CHUNKED = SelectiveScanTuning(kernel="chunked")

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


@pytest.mark.parametrize(("T", "h0"), [(1, True), (7, False), (33, True), (65, False)])
def test_odd_lengths_and_initial_state(T, h0):
    check(T=T, D=4, h0=h0, tuning=CHUNKED)


@pytest.mark.parametrize("method", ["zoh", "bilinear", "dirac"])
def test_discretizations(method):
    check(method=method, T=9, h0=True, tuning=CHUNKED)


@pytest.mark.parametrize(("method", "delta_A"), [("mamba", "full"), ("zoh", "full"), ("mamba", "shared"),
                                                 ("bilinear", "shared")])
def test_separate_A_step(method, delta_A):
    check(method=method, delta_A=delta_A, T=9, h0=True, tuning=CHUNKED)


@pytest.mark.parametrize(("skip", "gate", "bias", "softplus"),
                         [(False, False, False, False), (True, False, True, False), (False, True, False, True)])
def test_options_on_and_off(skip, gate, bias, softplus):
    check(skip=skip, gate=gate, bias=bias, softplus=softplus, T=10, tuning=CHUNKED)


def test_groups():
    check(G=2, T=11, h0=True, tuning=CHUNKED)


def test_variable_lengths():
    check(Bsz=3, T=21, D=4, lengths=torch.tensor([21, 0, 6]), h0=True, tuning=CHUNKED)


def test_packed_sequences():
    check(Bsz=1, T=33, D=4, cu_seqlens=torch.tensor([0, 1, 9, 9, 33]), h0=True, tuning=CHUNKED)


def test_bf16_inputs():
    # inputs and outputs rounded to bf16; the state and every reduction stay fp32
    check(dtype=torch.bfloat16, T=11, G=2, h0=True, tol=1e-2, tuning=CHUNKED)


def test_fp16_packed_with_groups():
    check(Bsz=1, T=19, D=4, G=2, cu_seqlens=torch.tensor([0, 7, 19]), dtype=torch.float16, tol=1e-2,
          tuning=CHUNKED)


@pytest.mark.parametrize("N", [5, 16])
def test_d_state(N):
    # 5: padded to 8 on chip (masked states); 16: the unmasked EVEN_N path
    check(N=N, D=4, T=7, h0=True, tuning=CHUNKED)


TUNINGS = [dict(chunk_t=2, fwd_chunk_t=16, ckpt_t=16), dict(ckpt_t=8, chunk_t=8, fwd_chunk_t=2),
           dict(fwd_block_d=2, bwd_block_d=8, fwd_num_warps=2, bwd_num_warps=2),
           dict(chunk_t=1, fwd_chunk_t=1, bwd_maxnreg=168, fwd_maxnreg=128)]


@pytest.mark.parametrize("fields", TUNINGS)
def test_non_default_tuning_gives_the_same_result(fields):
    """Chunk lengths (down to one step), checkpoint intervals at and above the chunk, block widths and
    warps change how the work is split, never the result (groups, lengths, an initial state, a shared
    A step and an odd length)."""
    tuning = SelectiveScanTuning(kernel="chunked", **fields)
    check(T=13, D=8, G=2, h0=True, lengths=torch.tensor([13, 6]), delta_A="shared", tuning=tuning)


def test_same_function_as_the_ring_kernels():
    """The two kernel designs agree to fp32 rounding on the same inputs and cotangents."""
    outs = {}
    for kernel in ("ring", "chunked"):
        torch.manual_seed(3)
        outs[kernel] = check(T=11, D=8, G=2, h0=True, lengths=torch.tensor([11, 6]),
                             tuning=SelectiveScanTuning(kernel=kernel))
    (y, hT, g), (y2, hT2, g2) = outs["ring"], outs["chunked"]
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hT2, hT, atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(g2[name], g[name], atol=1e-4, rtol=1e-4, msg=name)


def test_through_the_op_with_a_strided_gate():
    """``selective_scan(backend="triton", tuning=...)`` reaches the chunked kernels; z is read through
    its strides (the second half of in_proj's output in Mamba)."""
    from seqblocks.ops.selective_scan import selective_scan

    check_strided_gate(lambda *a, **kw: selective_scan(*a, backend="triton", tuning=CHUNKED, **kw))


def test_empty_sequence_input():
    """T = 0: zero outputs and the initial state as the final state (no launch)."""
    from seqblocks.ops.selective_scan.triton import selective_scan_triton

    h0 = torch.randn(2, 4, 3)
    y, hT = selective_scan_triton(torch.randn(2, 0, 4), torch.randn(2, 0, 4), -torch.rand(4, 3), torch.randn(2, 0, 3),
                                  torch.randn(2, 0, 3), initial_state=h0, tuning=CHUNKED)
    assert y.shape == (2, 0, 4)
    torch.testing.assert_close(hT, h0)


def test_tuning_checks():
    with pytest.raises(ValueError, match="kernel='scan' must be one of"):
        SelectiveScanTuning(kernel="scan")
    with pytest.raises(ValueError, match="chunk_t=3 must be a power of two"):
        SelectiveScanTuning(chunk_t=3)
    with pytest.raises(TypeError, match="fwd_chunk_t must be an int"):
        SelectiveScanTuning(fwd_chunk_t=2.0)
    with pytest.raises(ValueError, match="bwd_maxnreg=300 must be None or an int in 32 .. 255"):
        SelectiveScanTuning(bwd_maxnreg=300)


def test_default_launch_shapes():
    """The defaults on a GPU (docs/kernels.md): at d_state 16, 8-step forward chunks and 4-step backward
    chunks of 8 channels, one warp, the backward capped at 168 registers, checkpoints every 128 steps;
    larger states take more warps and shorter chunks; explicit fields win and widths stay within a group."""
    from seqblocks.ops.selective_scan import triton_chunked as tc

    saved = tc.INTERPRETED
    tc.INTERPRETED = False
    try:
        assert tc.chunked_blocks(16, 1536, 2048, CHUNKED) == ((8, 8, 1, None), (4, 8, 1, 168), 16, 128)
        assert tc.chunked_blocks(256, 1536, 2048, CHUNKED) == ((2, 8, 4, None), (2, 8, 8, None), 256, 128)
        assert tc.chunked_blocks(16, 1536, 5, CHUNKED)[:2] == ((8, 8, 1, None), (4, 8, 1, 168))
        assert tc.chunked_blocks(16, 1536, 3, CHUNKED)[:2] == ((4, 8, 1, None), (4, 8, 1, 168))
        t = SelectiveScanTuning(kernel="chunked", chunk_t=16, fwd_block_d=32, bwd_maxnreg=200, ckpt_t=8)
        assert tc.chunked_blocks(16, 12, 2048, t) == ((8, 4, 1, None), (16, 4, 1, 200), 16, 16)
    finally:
        tc.INTERPRETED = saved


def _signatures(dt: str, *, z: bool, d: bool, bias: bool, da: bool):
    """The kernels' argument types as the launcher passes them (absent tensors: an int64 dummy)."""
    opt = {True: None, False: "*i64"}
    ints = dict.fromkeys(["T", "Dm", "N", "NC", "CH_PER_G"], "i32")
    fwd = {"u_ptr": f"*{dt}", "delta_ptr": f"*{dt}", "A_ptr": "*fp32", "B_ptr": "*fp32", "C_ptr": "*fp32",
           "D_ptr": opt[d] or "*fp32", "z_ptr": opt[z] or f"*{dt}", "bias_ptr": opt[bias] or "*fp32",
           "dA_ptr": opt[da] or "*fp32", "h0_ptr": "*fp32", "y_ptr": f"*{dt}", "hT_ptr": "*fp32", "ck_ptr": "*fp32",
           "lens_ptr": "*i64", "cu_ptr": "*i64", **ints,
           **dict.fromkeys(["s_b", "s_t", "s_Bb", "s_Bt", "s_Bg", "s_dAb", "s_dAt", "s_dAd", "s_zb", "s_zt"], "i32")}
    bwd = {k: fwd[k] for k in list(fwd)[:9]}
    bwd.update({"ck_ptr": "*fp32", "gy_ptr": f"*{dt}", "ghT_ptr": "*fp32", "sub_ptr": "*fp32", "du_ptr": f"*{dt}",
                "ddelta_ptr": f"*{dt}", "dAm_ptr": "*fp32", "dB_ptr": "*fp32", "dC_ptr": "*fp32",
                "dD_ptr": opt[d] or "*fp32", "dz_ptr": opt[z] or f"*{dt}", "dbias_ptr": opt[bias] or "*fp32",
                "ddA_ptr": opt[da] or "*fp32", "dh0_ptr": "*fp32", "lens_ptr": "*i64", "cu_ptr": "*i64", **ints,
                "n_rows": "i32", **dict.fromkeys(["s_b", "s_t", "s_Bb", "s_Bt", "s_Bg", "s_dAb", "s_dAt", "s_dAd",
                                                  "s_zb", "s_zt", "s_ddAb", "s_ddAt", "s_ddAd"], "i32")})
    return fwd, bwd


# (dtype, method, z, D, bias + softplus, delta_A (None / "full" / "shared"), initial state, sequence mode, d_state)
VARIANTS = [("bf16", 0, True, True, True, None, False, 0, 16), ("fp32", 0, False, False, False, None, True, 1, 16),
            ("fp16", 1, True, False, True, "full", True, 2, 16),
            ("bf16", 2, False, True, False, "shared", False, 0, 16),
            ("fp32", 3, True, True, True, None, True, 2, 5), ("bf16", 0, True, True, True, "full", False, 1, 64)]


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="compiles for the GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_sm90_every_variant_compiles(variant, tmp_path):
    """Every discretisation, option, dtype and sequence mode at the launcher's default tiles, and the
    backward with one- and two-level checkpoints, compiles for sm_90 (Triton's own compiler); at
    d_state 16 the default tiles need no local memory (spills)."""
    from sm90 import compile_for_sm90, resource_usage

    from seqblocks.ops.selective_scan import triton_chunked as tc

    dt, method, z, d, bias, da, h0, seq, N = variant
    fwd_sig, bwd_sig = _signatures(dt, z=z, d=d, bias=bias, da=da is not None)
    saved = tc.INTERPRETED
    tc.INTERPRETED = False
    try:
        (fbt, fbd, fw, freg), (bbt, bbd, bw, breg), bn, ck = tc.chunked_blocks(N, 1536, 2048, CHUNKED)
    finally:
        tc.INTERPRETED = saved
    flags = dict(METHOD=method, HAS_BIAS=bias, SOFTPLUS=bias, HAS_DA=da is not None, HAS_D=d, HAS_Z=z, SEQ_MODE=seq,
                 FAST=True, EVEN_N=N == bn, BLOCK_N=bn)
    k = compile_for_sm90(tc._ss_fwd_chunked_kernel, fwd_sig, dict(flags, CKPT_T=ck, BLOCK_T=fbt, BLOCK_D=fbd,
                                                                  HAS_H0=h0, SAVE=True), fw, freg)
    usage = [resource_usage(k, tmp_path)]
    for sub in (1, ck // bbt):
        k = compile_for_sm90(tc._ss_bwd_chunked_kernel, bwd_sig, dict(flags, BLOCK_T=bbt, BLOCK_D=bbd,
                                                                      DA_SHARED=da == "shared", HAS_GT=True, SUB=sub),
                             bw, breg)
        usage.append(resource_usage(k, tmp_path))
    if N == 16 and usage[0] is not None:
        assert all(u["LOCAL"] == 0 for u in usage), usage


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring);
    # the sm_90 compile checks stay.
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_interpreter"
                  and not n.startswith("test_sm90")]:
        del globals()[_name]
