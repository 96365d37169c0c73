"""The Triton causal depthwise conv1d against the reference: forward, backward, decode step.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU; ``tests/interpreter.py``
says why the cases run in a child process. The ``gpu`` cases run Mamba's shapes on CUDA.

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _inputs(B, T, D, W, dtype=torch.float32, *, bias=True, state=False, device="cpu"):
    x = torch.randn(B, T, D, device=device).to(dtype)
    w = (torch.randn(D, W, device=device) / W).to(dtype)
    b = torch.randn(D, device=device).to(dtype) if bias else None
    h0 = torch.randn(B, W - 1, D, device=device).to(dtype) if state else None
    return x, w, b, h0


def _check(x, w, b, h0, *, activation=None, lengths=None, atol=1e-5, tiles=None):
    """y, the final state and every gradient (random cotangents on y and the final state) against the
    float64 reference."""
    ins = [t for t in (x, w, b, h0) if t is not None]
    leaves = [t.detach().requires_grad_() for t in ins]
    wide = [t.detach().double().requires_grad_() for t in ins]

    def call(fn, ts, **kw):
        it = iter(ts)
        xx, ww, bb, hh = (next(it) if t is not None else None for t in (x, w, b, h0))
        return fn(xx, ww, bb, activation=activation, initial_state=hh, lengths=lengths, **kw)

    if tiles is None:
        y, final = call(causal_conv1d, leaves, backend="triton")
    else:
        from seqblocks.ops.causal_conv1d.triton import causal_conv1d_triton

        y, final = call(lambda *a, **kw: causal_conv1d_triton(*a, tiles=tiles, **kw), leaves)
    yr, finalr = call(causal_conv1d_ref, wide)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert final.dtype == (x.dtype if h0 is None else h0.dtype) and final.shape == finalr.shape
    s = max(1.0, yr.abs().max().item())
    torch.testing.assert_close(y.double(), yr, atol=atol * s, rtol=0)
    torch.testing.assert_close(final.double(), finalr, atol=atol, rtol=0)  # copied inputs
    gy, gf = torch.randn_like(yr), torch.randn_like(finalr)
    grads = torch.autograd.grad([y, final], leaves, [gy.to(y.dtype), gf.to(final.dtype)], allow_unused=True)
    grads_r = torch.autograd.grad([yr, finalr], wide, [gy, gf], allow_unused=True)
    for name, t, g, g_r in zip("xwbh", ins, grads, grads_r):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        s = max(1.0, g_r.abs().max().item())
        torch.testing.assert_close(g.double(), g_r, atol=atol * s * 4, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("T", [1, 5, 67])
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_fp32(T, W, activation):
    x, w, b, h0 = _inputs(2, T, 33, W, state=True)
    _check(x, w, b, h0, activation=activation)


@pytest.mark.parametrize("W", [1, 3, 8])
def test_other_widths_without_bias_or_state(W):
    x, w, _, _ = _inputs(2, 19, 7, W, bias=False)
    _check(x, w, None, None, activation="swish")


@pytest.mark.parametrize("activation", [None, "silu"])
def test_lengths(activation):
    """Outputs past a row's length are 0; the final state is taken at the row's own end (the initial
    state's entries where the row is shorter than W - 1)."""
    x, w, b, h0 = _inputs(4, 23, 33, 4, state=True)
    _check(x, w, b, h0, activation=activation, lengths=torch.tensor([23, 0, 2, 11]))
    _check(x, w, b, None, activation=activation, lengths=torch.tensor([5, 23, 1, 0], dtype=torch.int32))


def test_bf16_fp16_and_mixed_state_dtype():
    x, w, b, h0 = _inputs(2, 21, 33, 4, torch.bfloat16, state=True)
    _check(x, w, b, h0, activation="silu", atol=2e-2)
    _check(x.half(), w.half(), None, h0.half(), atol=4e-3)
    _check(x, w.float(), b.float(), h0.float(), activation="silu", lengths=torch.tensor([21, 3]), atol=2e-2)


def test_strided_input_is_read_in_place():
    """x may be a slice over the channels of a wider projection (unit channel stride)."""
    wide = torch.randn(2, 9, 20)
    x = wide[:, :, 3:16]
    w, b = torch.randn(13, 4), torch.randn(13)
    y, final = causal_conv1d(x, w, b, activation="silu", backend="triton")
    yr, fr = causal_conv1d_ref(x, w, b, activation="silu")
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=0)
    torch.testing.assert_close(final, fr, atol=0, rtol=0)


def test_only_final_state_used():
    x, w, b, h0 = _inputs(2, 3, 7, 4, state=True)
    leaves = [t.requires_grad_() for t in (x, h0)]
    _, final = causal_conv1d(x, w, b, initial_state=h0, backend="triton")
    gx, gh = torch.autograd.grad(final.sum(), leaves)
    _, fr = causal_conv1d_ref(x, w, b, initial_state=h0)
    gx_r, gh_r = torch.autograd.grad(fr.sum(), leaves)
    torch.testing.assert_close(gx, gx_r)
    torch.testing.assert_close(gh, gh_r)


def test_empty_segment():
    x, w, b, h0 = _inputs(2, 0, 5, 4, state=True)
    y, final = causal_conv1d(x, w, b, initial_state=h0, backend="triton")
    assert y.shape == (2, 0, 5)
    torch.testing.assert_close(final, h0, atol=0, rtol=0)


@pytest.mark.parametrize("W", [2, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_matches_segment_and_shifts_state_in_place(W, activation):
    """k decode steps == the segment op over those k inputs; the state is updated in place, also when
    it is a non-contiguous view of a larger cache."""
    x, w, b, h0 = _inputs(3, 6, 33, W, state=True)
    cache = torch.zeros(3, 33, W - 1 + 2).transpose(1, 2)  # [B, W - 1 + 2, D], channel stride != 1
    state = cache[:, 1 : W]
    state.copy_(h0)
    ptr = state.data_ptr()
    ys = [causal_conv1d_update(x[:, t], state, w, b, activation, backend="triton") for t in range(6)]
    yr, fr = causal_conv1d_ref(x, w, b, activation=activation, initial_state=h0)
    assert state.data_ptr() == ptr
    torch.testing.assert_close(torch.stack(ys, 1), yr, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, fr, atol=0, rtol=0)
    assert (cache[:, 0] == 0).all() and (cache[:, W] == 0).all()  # neighbours untouched


def test_update_bf16_with_fp32_state():
    x, w, b, h0 = _inputs(2, 1, 130, 4, torch.bfloat16, state=True)
    state = h0.float().clone()
    y = causal_conv1d_update(x[:, 0], state, w, b, "silu", backend="triton")
    yr, fr = causal_conv1d_ref(x, w, b, activation="silu", initial_state=h0.float())
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(y.float(), yr[:, 0].float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(state, fr, atol=0, rtol=0)


def test_dispatch_and_errors():
    x, w, b, h0 = _inputs(2, 5, 7, 4, state=True)
    with pytest.raises(ValueError, match="no Triton kernel"):  # 64-bit stays on the PyTorch path
        causal_conv1d(x.double(), w.double(), backend="triton")
    with pytest.raises(ValueError, match="no Triton kernel"):  # wider than the kernels unroll
        causal_conv1d(x, torch.randn(7, 9), backend="triton")
    with pytest.raises(ValueError, match="state must have shape"):
        causal_conv1d(x, w, initial_state=h0[:, :2], backend="triton")
    with pytest.raises(ValueError, match="no Triton kernel"):  # the decode kernel is not differentiable
        causal_conv1d_update(x[:, 0], h0.clone(), w.requires_grad_(), backend="triton")
    with torch.no_grad():
        causal_conv1d_update(x[:, 0], h0.clone(), w, backend="triton")


def test_tile_shapes_do_not_change_results():
    """Other launch shapes (several chunks and channel blocks) give the same outputs and gradients."""
    from seqblocks.ops.causal_conv1d.triton import ConvTiles, causal_conv1d_triton

    x, w, b, h0 = _inputs(2, 29, 40, 4, state=True)
    ins = [t.requires_grad_() for t in (x, w, b, h0)]
    lengths = torch.tensor([29, 10])
    runs = []
    for tiles in (None, ConvTiles(fwd_block_t=8, fwd_block_d=16, fwd_warps=2, bwd_block_t=8, bwd_block_d=16,
                                  bwd_warps=2, bwd_tiles=3)):
        y, f = causal_conv1d_triton(x, w, b, activation="silu", initial_state=h0, lengths=lengths, tiles=tiles)
        runs.append([y, f, *torch.autograd.grad([y, f], ins, [torch.ones_like(y), torch.ones_like(f)])])
    for a, c in zip(*runs):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bwd_block_t must be >= 8"):
        ConvTiles(bwd_block_t=4)
    with pytest.raises(ValueError, match="fwd_block_d must be a power-of-two"):
        ConvTiles(fwd_block_d=96)


@pytest.mark.parametrize("W", [1, 2, 4, 8])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_shift_backward(W, activation):
    """The "shift" backward (dz recomputed at each shift, one tile per program) against the reference,
    with and without state, lengths and bias; tiles that cross the time and channel edges."""
    from seqblocks.ops.causal_conv1d.triton import ConvTiles

    tiles = ConvTiles(fwd_block_t=8, fwd_block_d=16, fwd_warps=1, bwd_block_d=16, bwd_warps=1, bwd_kernel="shift",
                      shift_block_t=8)
    torch.manual_seed(W)
    _check(*_inputs(2, 21, 20, W, state=W > 1), activation=activation, tiles=tiles,
           lengths=torch.tensor([21, 2]) if W > 1 else None)
    _check(*_inputs(1, 3, 20, W, bias=False), activation=activation, tiles=tiles)
    with pytest.raises(ValueError, match="bwd_kernel"):
        ConvTiles(bwd_kernel="fast")


GPU_SHAPES = [(8, 2048, 1536, 4), (2, 4097, 2560, 4), (3, 129, 1000, 2), (1, 64, 64, 8)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("B", "T", "D", "W"), GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_shapes(B, T, D, W, dtype):
    x, w, b, h0 = _inputs(B, T, D, W, dtype, state=True, device="cuda")
    lengths = torch.randint(0, T + 1, (B,), device="cuda")
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    _check(x, w, b, h0, activation="silu", atol=atol)
    _check(x, w, b, None, activation=None, lengths=lengths, atol=atol)
    from seqblocks.ops.causal_conv1d.triton import ConvTiles

    _check(x, w, b, h0, activation="silu", lengths=lengths, atol=atol, tiles=ConvTiles(bwd_kernel="shift"))
    # "auto" runs the kernel on CUDA: bit-identical to an explicit backend="triton" call
    y = causal_conv1d(x, w, b, activation="silu")[0]
    assert torch.equal(y, causal_conv1d(x, w, b, activation="silu", backend="triton")[0])
    state = h0.clone()
    with torch.no_grad():
        yt = causal_conv1d_update(x[:, 0], state, w, b, "silu")
        ys = causal_conv1d_update(x[:, 0], h0.clone(), w, b, "silu", backend="torch")
    torch.testing.assert_close(yt, ys, atol=atol, rtol=0)
    assert y.dtype == dtype


def _compile_for_sm90(fn, signature: dict, constexprs: dict, num_warps: int) -> None:
    from sm90 import compile_for_sm90  # imports Triton

    compile_for_sm90(fn, signature, constexprs, num_warps)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="compiles for the GPU")
@pytest.mark.parametrize("W", [1, 3, 4, 8])
def test_sm90_every_variant_compiles(W):
    """Every flag combination the launchers can produce at the default tiles compiles for sm_90."""
    import itertools

    from seqblocks.ops.causal_conv1d import triton as k

    t = k.ConvTiles()
    bs, bw = triton.next_power_of_2(max(W - 1, 1)), triton.next_power_of_2(W)
    common = {"T": "i32", "D": "i32", "stride_xb": "i64", "stride_xt": "i32", "stride_ib": "i32", "stride_it": "i32"}
    for bias, init, lens, silu in itertools.product((False, True), repeat=4):
        ptr = {"X": "*bf16", "WT": "*fp32", "BIAS": "*fp32" if bias else None, "INIT": "*fp32" if init else None,
               "LENS": "*i32" if lens else None}
        flags = dict(W=W, HAS_BIAS=bias, HAS_INIT=init, HAS_LENS=lens, SILU=silu)
        _compile_for_sm90(k._conv_fwd_kernel, {**ptr, "Y": "*bf16", "FINAL": "*fp32", **common},
                          dict(flags, BLOCK_T=t.fwd_block_t, BLOCK_D=t.fwd_block_d, BLOCK_S=bs), t.fwd_warps)
        for dfinal, dinit in ((False, False), (True, False), (True, True), (False, True)):
            if dinit and not init:
                continue
            _compile_for_sm90(k._conv_bwd_kernel, {
                **ptr, "DY": "*bf16", "DFINAL": "*fp32" if dfinal else None, "DX": "*bf16",
                "DINIT": "*fp32" if dinit else None, "DW_PART": "*fp32", "DB_PART": "*fp32" if bias else None,
                "SCRATCH": "*fp32", **common},
                dict(flags, HAS_DFINAL=dfinal, STORE_DINIT=dinit, BLOCK_T=t.bwd_block_t, BLOCK_D=t.bwd_block_d,
                     BLOCK_S=bs, BLOCK_W=bw, TILES=t.bwd_tiles), t.bwd_warps)
    for bias, silu in itertools.product((False, True), repeat=2):
        _compile_for_sm90(k._conv_update_kernel, {
            "X": "*bf16", "STATE": "*fp32", "WT": "*fp32", "BIAS": "*fp32" if bias else None, "Y": "*bf16",
            "D": "i32", "stride_xb": "i32", "stride_sb": "i32", "stride_sj": "i32", "stride_sd": "i32"},
            dict(W=W, HAS_BIAS=bias, SILU=silu, BLOCK_D=1024), 4)


if not INTERPRETER:
    # Outside the interpreter the CPU cases run in the child process only (see the module docstring);
    # the gpu cases stay, to run on CUDA, and so do the sm_90 compile checks.
    for _name in [n for n in list(globals()) if n.startswith("test_") and not n.startswith(("test_gpu", "test_sm90"))
                  and n != "test_kernels_under_interpreter"]:
        del globals()[_name]
