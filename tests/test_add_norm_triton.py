"""The Triton fused residual add + LayerNorm / RMSNorm against the reference, forward and backward.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU; ``tests/interpreter.py``
says why the cases run in a child process. The ``gpu`` cases run the real shapes on CUDA.

Shapes: M rows (any leading shape), D features.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.add_norm import add_norm, add_norm_ref  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _inputs(shape, dtype, *, residual=True, weight=True, bias=True, res_dtype=None, device="cpu"):
    D = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    res = torch.randn(shape, device=device).to(res_dtype or dtype) if residual else None
    w = (1 + 0.3 * torch.randn(D, device=device)) if weight else None
    b = 0.2 * torch.randn(D, device=device) if bias else None
    return x, res, w, b


def _check(x, res, w, b, *, is_rms, residual_in_fp32, prenorm, atol, rtol=0.0, eps=1e-5):
    """Outputs and every gradient (random cotangents on y and on r) against the float64 reference."""
    ins = [t for t in (x, res, w, b) if t is not None]
    leaves = [t.detach().requires_grad_() for t in ins]
    wide = [t.detach().double().requires_grad_() for t in ins]

    def place(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, res, w, b)]

    out = add_norm(*place(leaves), eps, is_rms, residual_in_fp32, prenorm, backend="triton")
    y, r = out if prenorm else (out, None)
    yr, rr = add_norm_ref(*place(wide), eps, is_rms, False)
    # the dtypes the op promises
    assert y.dtype == x.dtype and y.shape == x.shape
    r_dtype = x.dtype if res is None else res.dtype
    if residual_in_fp32:
        r_dtype = torch.promote_types(r_dtype, torch.float32)
    if prenorm:
        assert r.dtype == r_dtype and r.shape == x.shape
    # The float64 reference reads the unrounded sum; compare against the reference run at the op's
    # own dtypes for the forward (exact rounding semantics), and float64 for the gradients.
    y_same, r_same = add_norm_ref(x, res, w, b, eps, is_rms, residual_in_fp32)
    torch.testing.assert_close(y.double(), y_same.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), yr, atol=atol * 4, rtol=rtol)
    if prenorm:
        # Exact on the GPU; Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest.
        truncates = INTERPRETER and r.dtype == torch.bfloat16
        torch.testing.assert_close(r, r_same, atol=0, rtol=2**-7 if truncates else 0)
    gy = torch.randn_like(yr)
    outs, outs_r, cots = [y], [yr], [gy]
    if prenorm:
        gr = torch.randn_like(yr)
        outs, outs_r, cots = [y, r], [yr, rr], [gy, gr]
    grads = torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cots, outs)])
    grads_r = torch.autograd.grad(outs_r, wide, cots)
    for t, g, gr_ in zip(ins, grads, grads_r):
        assert g.dtype == t.dtype and g.shape == t.shape
        s = max(1.0, gr_.abs().max().item())
        torch.testing.assert_close(g.double(), gr_, atol=atol * s * 4, rtol=0)


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 33), (4, 130), (1, 1)])
@pytest.mark.parametrize("is_rms", [False, True])
def test_fp32_all_options(shape, is_rms):
    for residual, weight, prenorm, in_fp32 in [(True, True, True, False), (False, True, False, False),
                                               (True, False, False, True), (False, False, True, True)]:
        x, res, w, b = _inputs(shape, torch.float32, residual=residual, weight=weight, bias=weight and not is_rms)
        _check(x, res, w, b, is_rms=is_rms, residual_in_fp32=in_fp32, prenorm=prenorm, atol=2e-5)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("in_fp32", [False, True])
def test_bf16(is_rms, in_fp32):
    x, res, w, b = _inputs((3, 11, 130), torch.bfloat16, bias=not is_rms)
    _check(x, res, w, b, is_rms=is_rms, residual_in_fp32=in_fp32, prenorm=True, atol=3e-2, rtol=1.6e-2)


def test_mixed_dtypes():
    """bf16 x with an fp32 residual stream and fp32 parameters (the usual mixed-precision Block)."""
    x, res, w, b = _inputs((5, 33), torch.bfloat16, res_dtype=torch.float32)
    _check(x, res, w, b, is_rms=False, residual_in_fp32=False, prenorm=True, atol=3e-2, rtol=1.6e-2)
    x, res, w, _ = _inputs((5, 33), torch.float16)
    _check(x, res, w.half(), None, is_rms=True, residual_in_fp32=True, prenorm=True, atol=3e-3)


def test_no_residual_prenorm_returns_a_copy():
    """residual None means r = x; the returned r is a copy with its own gradient path."""
    x = torch.randn(4, 33)
    y, r = add_norm(x, None, None, None, 1e-5, True, False, True, backend="triton")
    assert r.data_ptr() != x.data_ptr()
    torch.testing.assert_close(r, x, atol=0, rtol=0)


def test_many_row_tiles_reduce_deterministically():
    """More row tiles than backward programs: the dweight / dbias partials are summed in a fixed order."""
    x, res, w, b = _inputs((67, 9), torch.float32)
    _check(x, res, w, b, is_rms=False, residual_in_fp32=False, prenorm=True, atol=2e-5)
    leaves = [t.clone().requires_grad_() for t in (x, res, w, b)]
    g = torch.randn(67, 9)
    runs = [torch.autograd.grad(add_norm(*leaves, backend="triton"), leaves[2:], g) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_only_r_used():
    """The cotangent of y may be absent (only r used downstream)."""
    x, res = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    _, r = add_norm(x, res, None, None, 1e-5, False, True, True, backend="triton")
    gx, gres = torch.autograd.grad(r.sum(), [x, res])
    torch.testing.assert_close(gx, torch.ones(3, 7))
    torch.testing.assert_close(gres, torch.ones(3, 7))


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual shape"):
        add_norm(x, torch.randn(2, 7), backend="triton")
    with pytest.raises(ValueError, match="weight shape"):
        add_norm(x, None, torch.randn(7), backend="triton")
    with pytest.raises(ValueError, match="0-d tensor"):
        add_norm(torch.tensor(1.0), backend="triton")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        add_norm(torch.ones(2, 8, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="no Triton kernel"):  # float64 stays on the PyTorch path
        add_norm(x.double(), backend="triton")
    add_norm(x.double(), backend="auto")


def test_kernel_matches_the_torch_path():
    """The two backends of the op agree (the Triton path is what "auto" runs for Block on CUDA)."""
    x, res, w, b = _inputs((2, 5, 16), torch.float32)
    y_k, r_k = add_norm(x, res, w, b, 1e-5, False, True, True, backend="triton")
    y_t, r_t = add_norm(x, res, w, b, 1e-5, False, True, True, backend="torch")
    torch.testing.assert_close(y_k, y_t, atol=2e-5, rtol=0)
    torch.testing.assert_close(r_k, r_t, atol=0, rtol=0)


GPU_SHAPES = [(32768, 2048), (8 * 2048, 768), (4, 4097), (1024, 8192), (64, 16384)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("is_rms", [False, True])
def test_gpu_real_shapes(shape, is_rms):
    x, res, w, b = _inputs(shape, torch.bfloat16, bias=not is_rms, device="cuda")
    _check(x, res, w, b, is_rms=is_rms, residual_in_fp32=True, prenorm=True, atol=3e-2, rtol=1.6e-2)
    # "auto" runs the kernel on CUDA: bit-identical to an explicit backend="triton" call
    assert torch.equal(add_norm(x, res, w, b, is_rms=is_rms), add_norm(x, res, w, b, is_rms=is_rms, backend="triton"))


def _compile_for_sm90(fn, signature: dict, constexprs: dict, num_warps: int) -> None:
    from sm90 import compile_for_sm90  # imports Triton

    compile_for_sm90(fn, signature, constexprs, num_warps)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="compiles for the GPU")
@pytest.mark.parametrize("D", [768, 2048, 8192])
def test_sm90_every_variant_compiles(D):
    """Every flag combination the launcher can produce compiles for sm_90 (Triton's own compiler)."""
    import itertools

    from seqblocks.ops.add_norm import triton as k

    for res, w, b, rms, st in itertools.product((False, True), repeat=5):
        if rms and b:
            continue
        bd, rows, nw = k.launch_config(D)
        _compile_for_sm90(k._add_norm_fwd_kernel, {
            "X": "*bf16", "RES": "*bf16" if res else None, "WEIGHT": "*fp32" if w else None,
            "BIAS": "*fp32" if b else None, "Y": "*bf16", "R": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
            "M": "i32", "D": "i32", "eps": "fp32"},
            dict(HAS_RES=res, HAS_W=w, HAS_B=b, STORE_R=st, IS_RMS=rms, ROWS=rows, BLOCK_D=bd), nw)
        bd, rows, nw = k.launch_config(D, backward=True)
        _compile_for_sm90(k._add_norm_bwd_kernel, {
            "DY": "*bf16", "DR_OUT": "*fp32" if st else None, "R": "*fp32", "WEIGHT": "*fp32" if w else None,
            "MEAN": "*fp32", "RSTD": "*fp32", "DX": "*bf16", "DRES": "*bf16" if res else None,
            "DW_PART": "*fp32" if w else None, "DB_PART": "*fp32" if b else None, "M": "i32", "D": "i32",
            "tiles_per_prog": "i32"},
            dict(HAS_DR_OUT=st, HAS_W=w, HAS_B=b, STORE_DRES=res, IS_RMS=rms, ROWS=rows, BLOCK_D=bd), nw)


if not INTERPRETER:
    # Outside the interpreter the CPU cases run in the child process only (see the module docstring);
    # the gpu cases stay, to run on CUDA, and so do the sm_90 compile checks.
    for _name in [n for n in list(globals()) if n.startswith("test_") and not n.startswith(("test_gpu", "test_sm90"))
                  and n != "test_kernels_under_interpreter"]:
        del globals()[_name]
