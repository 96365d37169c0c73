"""The fused Mamba decode step (``mamba_step``: conv + x_proj + dt_proj + state update in two launches;
``mamba_layer_step``: the same with in_proj, and optionally the block's add + norm, folded in) against
their composed PyTorch paths, and ``Mamba`` / ``Block`` decoding through them, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process. Decoding has no backward, so only forward values and the in-place
state updates are compared.

Tolerances: in fp32 the fused step equals the composed one to rounding (1e-5). In bf16 the fused step
keeps x_dbl (dt, B, C) in fp32 where the composed one rounds it to bf16 before dt_proj and the update,
so the two differ by ~1e-2 relative (checked normwise); against a composed reference that keeps x_dbl
in fp32 too, the bf16 fused step agrees to rounding (one bf16 ulp in y). The interpreter may round a
bf16 value one ulp away from PyTorch (Triton 3.9's rounds fp32 -> bf16 toward zero, the GPU to nearest
even), so that reference takes the conv output from the conv-step kernel, and the layer step's reference
rounds as this interpreter does (``_kernel_round``).

Shapes: B batch, E channels, N state, R dt rank, W conv width.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F
from interpreter import INTERPRETER, run_file_under_interpreter
from torch import nn

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from seqblocks.ops import _backend  # noqa: E402
from seqblocks.ops.selective_scan import selective_state_update  # noqa: E402
from seqblocks.ops.selective_scan.step import conv_step, mamba_layer_step, mamba_step  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _inputs(Bsz, E, N, R, W, dtype, *, conv_bias=True, D=True, z=True, device="cpu"):
    g = torch.Generator().manual_seed(Bsz * 1000 + E + N + R + W)
    xz = torch.randn(Bsz, 2 * E, generator=g).to(dtype)  # x and z as views of one buffer, as the mixer has them
    t = {
        "x": xz[:, :E], "conv_state": torch.randn(Bsz, W - 1, E, generator=g).to(dtype),
        "conv_weight": (torch.randn(E, W, generator=g) / W ** 0.5).to(dtype),
        "x_proj_weight": (torch.randn(R + 2 * N, E, generator=g) / E ** 0.5).to(dtype),
        "dt_proj_weight": (torch.randn(E, R, generator=g) / R ** 0.5).to(dtype),
        "ssm_state": torch.randn(Bsz, E, N, generator=g),
        "A": torch.log(torch.rand(E, N, generator=g) * 2 + 0.1),  # A_log
        "conv_bias": torch.randn(E, generator=g).to(dtype) if conv_bias else None,
        "D": torch.randn(E, generator=g) if D else None,
        "z": xz[:, E:] if z else None,
    }
    t = {k: None if v is None else v.to(device) for k, v in t.items()}
    return t, (torch.randn(E, generator=g) * 0.5 - 1).to(device)


def _run(t, bias, backend, offset0, **kw):
    """One step on fresh copies of the caches: (y, conv_state, ssm_state, seqlen_offset)."""
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    off = offset0.clone()
    ptrs = (t["conv_state"].data_ptr(), t["ssm_state"].data_ptr())
    fn = kw.pop("fn", mamba_step)
    y = fn(**t, delta_bias=bias, a_is_log=True, seqlen_offset=off, **kw, **({} if backend is None else
                                                                             {"backend": backend}))
    assert (t["conv_state"].data_ptr(), t["ssm_state"].data_ptr()) == ptrs  # updated in place
    return y, t["conv_state"], t["ssm_state"], off


def _fp32_xdbl_reference(t, bias, offset0, **kw):
    """The composed step with x_dbl and delta kept in fp32 (the fused kernel's arithmetic); the conv
    output comes from the conv-step kernel, rounded as the fused kernel A rounds it."""
    conv_state, ssm_state, off = t["conv_state"].clone(), t["ssm_state"].clone(), offset0.clone()
    xs = conv_step(t["x"], conv_state, t["conv_weight"], t["conv_bias"], kw.get("activation", "silu"),
                   seqlen_offset=off, backend="triton")
    R, N = t["dt_proj_weight"].shape[1], t["A"].shape[1]
    x_dbl = F.linear(xs.float(), t["x_proj_weight"].float())
    delta = F.linear(x_dbl[:, :R], t["dt_proj_weight"].float())
    y = selective_state_update(ssm_state, xs, delta, t["A"], x_dbl[:, R:R + N], x_dbl[:, R + N:], t["D"], t["z"],
                               delta_bias=bias, delta_softplus=kw.get("delta_softplus", True),
                               discretization=kw.get("discretization", "mamba"), a_is_log=True, backend="torch")
    return y, conv_state, ssm_state, off


def _check(t, bias, dtype, tol=1e-5, **kw):
    offset0 = torch.arange(t["x"].shape[0], device=t["x"].device) * 3
    y_ref, cs_ref, ss_ref, off_ref = _run(t, bias, "torch", offset0, **kw)
    y, cs, ss, off = _run(t, bias, "triton", offset0, **kw)
    assert y.dtype == dtype and y.shape == t["x"].shape
    assert torch.equal(cs, cs_ref)  # the window shift is a copy
    assert torch.equal(off, off_ref) and torch.equal(off, offset0 + 1)
    if dtype == torch.float32:
        torch.testing.assert_close(ss, ss_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        return
    # bf16: the composed spec rounds x_dbl and delta to bf16 (~1e-2 relative apart) ...
    assert ((ss - ss_ref).norm() / ss_ref.norm()).item() < 3e-2
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 3e-2
    # ... the same step with x_dbl in fp32 agrees to rounding.
    y32, cs32, ss32, off32 = _fp32_xdbl_reference(t, bias, offset0, **kw)
    assert torch.equal(cs, cs32) and torch.equal(off, off32)
    torch.testing.assert_close(ss, ss32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y32.float(), atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Bsz", [1, 3])
@pytest.mark.parametrize("W", [2, 4])
def test_fused_step_matches_composed(dtype, Bsz, W):
    """E = 149 is not a multiple of any block (three blocks of kernel A, the last masked)."""
    t, bias = _inputs(Bsz, 149, 5, 7, W, dtype)
    _check(t, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_options_off(dtype):
    """No conv bias, no D, no z, no dt bias, no softplus, no conv activation."""
    t, _ = _inputs(2, 37, 4, 3, 3, dtype, conv_bias=False, D=False, z=False)
    # Without the softplus the step is unbounded (dt < 0 makes exp(dt A) > 1), which amplifies rounding:
    # 3e-5 relative seen in fp32 under Triton 3.9's interpreter.
    _check(t, None, dtype, tol=1e-4, delta_softplus=False, activation=None)
    t, bias = _inputs(2, 37, 4, 3, 3, dtype, conv_bias=False, D=True, z=False)
    _check(t, bias, dtype)


@pytest.mark.parametrize("discretization", ["bilinear", "dirac"])
def test_fused_step_discretizations(discretization):
    t, bias = _inputs(2, 45, 6, 5, 4, torch.float32)
    _check(t, bias, torch.float32, discretization=discretization)


def test_fused_step_chunked_loops():
    """Small blocks reach every loop of the kernels: 10 channel blocks of kernel A summed two at a
    time, a dt rank of 70 taken in chunks of 64, x_proj's 80 rows in chunks."""
    from seqblocks.ops.selective_scan.step_triton import mamba_step_config, mamba_step_triton

    cfg = mamba_step_config(3, 149, 5, 70, block_e_conv=16, block_k=2)
    assert (cfg["NBLK"], cfg["BLOCK_K"], cfg["BLOCK_R"]) == (10, 2, 64)
    t, bias = _inputs(3, 149, 5, 70, 4, torch.float32)
    offset0 = torch.zeros(3, dtype=torch.long)
    y_ref, cs_ref, ss_ref, off_ref = _run(t, bias, "torch", offset0)
    y, cs, ss, off = _run(t, bias, None, offset0, fn=mamba_step_triton, block_e_conv=16, block_k=2)
    assert torch.equal(cs, cs_ref) and torch.equal(off, off_ref)
    torch.testing.assert_close(ss, ss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_fused_step_deterministic():
    t, bias = _inputs(2, 149, 5, 7, 4, torch.bfloat16)
    a = _run(t, bias, "triton", torch.zeros(2, dtype=torch.long))
    b = _run(t, bias, "triton", torch.zeros(2, dtype=torch.long))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_fused_step_refuses_and_falls_back():
    t, bias = _inputs(2, 8, 4, 2, 4, torch.float32)
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    with pytest.raises(ValueError, match="no Triton kernel"):
        mamba_step(**t, delta_bias=bias, discretization="zoh", backend="triton")
    with _backend.prefer_backend("triton"):  # "auto": zoh runs the composed path, the conv on its kernel
        y = mamba_step(**t, delta_bias=bias, discretization="zoh")
    assert y.shape == (2, 8)
    w = t["x_proj_weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match="no Triton kernel"):  # autograd would record it: no kernel
        mamba_step(**dict(t, x_proj_weight=w), delta_bias=bias, backend="triton")
    y = mamba_step(**dict(t, x_proj_weight=w), delta_bias=bias, backend="torch")
    assert y.requires_grad
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        mamba_step(**dict(t, x_proj_weight=t["x_proj_weight"][:-1]), backend="torch")
    with pytest.raises(TypeError, match="x's dtype"):
        mamba_step(**dict(t, dt_proj_weight=t["dt_proj_weight"].double()), backend="torch")
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        mamba_step(**dict(t, ssm_state=t["ssm_state"][:, :, :3]), backend="torch")
    with pytest.raises(ValueError, match="activation"):
        mamba_step(**t, activation="relu")
    with pytest.raises(ValueError, match="discretization"):
        mamba_step(**t, discretization="euler")
    with pytest.raises(TypeError, match="seqlen_offset"):
        mamba_step(**t, seqlen_offset=torch.zeros(2))


# ---- in_proj and the add + norm folded in (mamba_layer_step) ----------------------------------------------


def _layer_inputs(Bsz, Dm, E, N, R, W, dtype, *, norm=None, residual=False, in_bias=False, rin_dtype=None,
                  device="cpu"):
    """Inputs of ``mamba_layer_step``: the step's tensors of ``_inputs`` with x the layer input [B, D]
    and in_proj's weight; the options (bias, residual, norm) as keyword arguments."""
    t, bias = _inputs(Bsz, E, N, R, W, dtype, z=False)
    del t["z"]
    g = torch.Generator().manual_seed(Bsz + Dm + E)
    t["x"] = torch.randn(Bsz, Dm, generator=g).to(dtype)
    kw = {"in_proj_weight": (torch.randn(2 * E, Dm, generator=g) / Dm ** 0.5).to(dtype)}
    if in_bias:
        kw["in_proj_bias"] = (torch.randn(2 * E, generator=g) * 0.1).to(dtype)
    if norm is not None:
        kw["norm"] = norm
        kw["norm_weight"] = 1 + 0.2 * torch.randn(Dm, generator=g)  # fp32, as NormBase.scale() may be
        if norm == "layernorm":
            kw["norm_bias"] = (0.1 * torch.randn(Dm, generator=g)).to(dtype)
        if residual:
            kw["residual"] = torch.randn(Bsz, Dm, generator=g).to(rin_dtype or dtype) * 3
    move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)  # noqa: E731
    return {k: move(v) for k, v in t.items()}, move(bias), {k: move(v) for k, v in kw.items()}


def _run_layer(t, bias, backend, offset0, kw, fn=mamba_layer_step, **extra):
    """One layer step on fresh caches: ((y, new residual or None), conv_state, ssm_state, seqlen_offset)."""
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    off = offset0.clone()
    out = fn(**t, **kw, delta_bias=bias, a_is_log=True, seqlen_offset=off, **extra,
             **({} if backend is None else {"backend": backend}))
    out = out if isinstance(out, tuple) else (out, None)
    return out, t["conv_state"], t["ssm_state"], off


@triton.jit
def _cast_kernel(x_ptr, y_ptr):
    tl.store(y_ptr, tl.load(x_ptr).to(y_ptr.dtype.element_ty))


@functools.cache
def _interpreter_truncates_bf16() -> bool:
    """Whether this Triton's interpreter rounds fp32 -> bf16 toward zero (3.9's does; the GPU rounds to
    nearest even): 1 + 2^-8 + 2^-10 rounds up to 1 + 2^-7, truncates to 1."""
    if not INTERPRETER:
        return False
    x = torch.tensor([1 + 2 ** -8 + 2 ** -10])
    y = torch.empty(1, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y)
    return y.item() == 1.0


def _kernel_round(v, dtype):
    """``v`` (fp32) rounded to ``dtype`` as a kernel's store rounds it here."""
    if dtype == torch.bfloat16 and v.dtype == torch.float32 and _interpreter_truncates_bf16():
        return (v.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)  # exact: the low bits cleared
    return v.to(dtype)


def _layer_reference(t, bias, offset0, kw, residual_in_fp32=False, eps=1e-5):
    """The layer step composed in fp32 where the kernels keep fp32 (the norm, in_proj's accumulation,
    x_dbl) and rounded where they round (the residual, h, in_proj's output, the conv output), with the
    kernels' rounding: the bf16 spec of the Triton path."""
    x, dt = t["x"], t["x"].dtype
    h, r = x, None
    if kw.get("norm") is not None:
        res = kw.get("residual")
        rdt = res.dtype if res is not None else dt
        rdt = torch.promote_types(rdt, torch.float32) if residual_in_fp32 else rdt
        r = _kernel_round(x.float() + (0 if res is None else res.float()), rdt)
        rf = r.float()
        rf = rf - rf.mean(-1, keepdim=True) if kw["norm"] == "layernorm" else rf
        hf = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * kw["norm_weight"].float()
        h = _kernel_round(hf + (0 if kw.get("norm_bias") is None else kw["norm_bias"].float()), dt)
    b = kw.get("in_proj_bias")
    xz = _kernel_round(F.linear(h.float(), kw["in_proj_weight"].float(), None if b is None else b.float()), dt)
    E = t["conv_weight"].shape[0]
    y, cs, ss, off = _fp32_xdbl_reference(dict(t, x=xz[:, :E], z=xz[:, E:]), bias, offset0)
    return (y, r), cs, ss, off


LAYER_CASES = [  # (norm, residual, in_proj bias, residual_in_fp32)
    (None, False, False, False), (None, False, True, False), ("rmsnorm", True, False, False),
    ("layernorm", True, True, True), ("layernorm", False, False, False), ("rmsnorm", False, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("norm", "residual", "in_bias", "rin32"), LAYER_CASES)
def test_layer_step_matches_composed(dtype, norm, residual, in_bias, rin32):
    """D = 37, E = 75 (not multiples of any block); Bsz 3 with the row's norm formed by every program."""
    t, bias, kw = _layer_inputs(3, 37, 75, 5, 4, 4, dtype, norm=norm, residual=residual, in_bias=in_bias)
    if norm is not None:
        kw["residual_in_fp32"] = rin32
    offset0 = torch.arange(3) * 2
    (y_ref, r_ref), cs_ref, ss_ref, off_ref = _run_layer(t, bias, "torch", offset0, kw)
    (y, r), cs, ss, off = _run_layer(t, bias, "triton", offset0, kw)
    assert y.dtype == dtype and y.shape == (3, 75)
    assert torch.equal(off, off_ref) and torch.equal(off, offset0 + 1)
    if norm is None:
        assert r is None and r_ref is None
    else:
        assert r.dtype == r_ref.dtype == (torch.float32 if rin32 else dtype)
        torch.testing.assert_close(r, r_ref, atol=0, rtol=0 if dtype == torch.float32 else 2 ** -7)
    if dtype == torch.float32:
        for a, b_ in ((y, y_ref), (cs, cs_ref), (ss, ss_ref)):
            torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)
        return
    # bf16: the composed spec rounds x_dbl and delta to bf16 (as mamba_step's) ...
    assert ((ss - ss_ref).norm() / ss_ref.norm()).item() < 3e-2
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 3e-2
    # ... the step composed with the kernels' fp32 accumulations and roundings agrees to rounding (in_proj's
    # sum in another order may round a value of xz the other way: the conv window by an ulp).
    (y32, _), cs32, ss32, off32 = _layer_reference(t, bias, offset0, kw, residual_in_fp32=rin32)
    assert torch.equal(off, off32)
    torch.testing.assert_close(cs.float(), cs32.float(), atol=1e-5, rtol=2 ** -7)
    torch.testing.assert_close(ss, ss32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y32.float(), atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize(("Dm", "unrolled"), [(70, True), (300, False)])
def test_layer_step_chunked_loops(Dm, unrolled):
    """Small blocks reach every loop: D in chunks of 16 in both kernels (5 chunks, unrolled; 19, a loop),
    with the norm, the residual and in_proj's bias, 10 channel blocks of kernel A; fp32, to rounding."""
    from seqblocks.ops.selective_scan.step_triton import mamba_layer_step_triton, mamba_step_config

    cfg = mamba_step_config(2, 149, 5, 6, d_model=Dm, block_e_conv=16, block_k=2, block_d=16)
    assert (cfg["NBLK"], cfg["BLOCK_D_A"], cfg["BLOCK_D_B"]) == (10, 16, 16)
    assert cfg["UNROLL_A"] == cfg["UNROLL_B"] == unrolled
    t, bias, kw = _layer_inputs(2, Dm, 149, 5, 6, 4, torch.float32, norm="layernorm", residual=True, in_bias=True)
    offset0 = torch.zeros(2, dtype=torch.long)
    (y_ref, r_ref), cs_ref, ss_ref, _ = _run_layer(t, bias, "torch", offset0, kw)
    (y, r), cs, ss, _ = _run_layer(t, bias, None, offset0, kw, fn=mamba_layer_step_triton, block_e_conv=16,
                                   block_k=2, block_d=16)
    assert torch.equal(r, r_ref)
    for a, b_ in ((y, y_ref), (cs, cs_ref), (ss, ss_ref)):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_layer_step_fp32_residual_stream_in_bf16():
    """A bf16 block whose residual stream is fp32 (``residual_in_fp32`` after the first block)."""
    t, bias, kw = _layer_inputs(2, 24, 40, 4, 3, 4, torch.bfloat16, norm="rmsnorm", residual=True,
                                rin_dtype=torch.float32)
    kw["residual_in_fp32"] = True
    offset0 = torch.zeros(2, dtype=torch.long)
    (y, r), _, ss, _ = _run_layer(t, bias, "triton", offset0, kw)
    (y32, r32), _, ss32, _ = _layer_reference(t, bias, offset0, kw, residual_in_fp32=True)
    assert r.dtype == torch.float32 and torch.equal(r, r32)
    torch.testing.assert_close(ss, ss32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y32.float(), atol=1e-5, rtol=2 ** -7)


def test_layer_step_rejects_bad_inputs():
    t, bias, kw = _layer_inputs(2, 12, 8, 4, 2, 4, torch.float32)
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    w = kw["in_proj_weight"]

    def call(**changes):
        args = dict(t, in_proj_weight=w, delta_bias=bias)
        args.update(changes)
        return mamba_layer_step(**args, backend="torch")

    with pytest.raises(ValueError, match=r"in_proj_weight must have shape \[2E, D\] = \[16, 12\]"):
        call(in_proj_weight=w[:, :-1])
    with pytest.raises(TypeError, match="in_proj_weight must have x's dtype"):
        call(in_proj_weight=w.double())
    with pytest.raises(ValueError, match="in_proj_bias must have shape"):
        call(in_proj_bias=torch.zeros(15))
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        call(norm="batchnorm")
    with pytest.raises(ValueError, match="given without a norm"):
        call(residual=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        call(norm="rmsnorm", norm_bias=torch.zeros(12))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        call(norm="rmsnorm", norm_weight=torch.ones(11))
    with pytest.raises(ValueError, match="residual shape"):
        call(norm="layernorm", residual=torch.zeros(2, 11))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        call(x=[[0.0] * 12])
    with pytest.raises(ValueError, match=r"x must have shape \[B, D\]"):
        call(x=t["x"][None])
    with pytest.raises(ValueError, match="ssm_state must have shape"):  # mamba_step's own checks still run
        call(ssm_state=t["ssm_state"][:, :, :3])
    with pytest.raises(ValueError, match="no Triton kernel"):
        mamba_layer_step(**dict(t, in_proj_weight=w, delta_bias=bias), discretization="zoh", backend="triton")


# ---- the mixer ----------------------------------------------------------------------------------------------

STEP_OPS = {"mamba_layer_step", "mamba_step", "conv_step", "selective_state_update"}


@pytest.fixture
def triton_steps(monkeypatch):
    """Send the decode-step ops' "auto" to their kernels (on the CPU, through the interpreter); the set
    returned collects the ops that ran one."""
    real = _backend.resolve_backend
    served: set[str] = set()
    from seqblocks.layers.mixers.mamba import Mamba

    monkeypatch.setattr(Mamba, "fuse_decode_step", True)  # the default, pinned here (seqblocks/layers/mixers/mamba.py)

    def forced(backend, *tensors, op, has_kernel=True):
        if backend == "auto" and op in STEP_OPS and has_kernel:
            backend = "triton"
        chosen = real(backend, *tensors, op=op, has_kernel=has_kernel)
        if chosen == "triton" and op in STEP_OPS:
            served.add(op)
        return chosen

    for module in ("seqblocks.ops.selective_scan", "seqblocks.ops.selective_scan.step"):
        monkeypatch.setattr(importlib.import_module(module), "resolve_backend", forced)
    return served


def _decode(mixer, x, n_prefill=3, **kw):
    Bsz, T, _ = x.shape
    with torch.no_grad():
        cache = mixer.allocate_inference_cache(Bsz, T)
        ys = [mixer(x[:, :n_prefill], cache, **kw)]
        for t in range(n_prefill, T):
            ys.append(mixer(x[:, t:t + 1], cache, **kw))
    assert torch.equal(cache.seqlen_offset, torch.full((Bsz,), T))
    return torch.cat(ys, 1), cache


@pytest.fixture
def folded(monkeypatch):
    """``Mamba.fold_in_proj`` on (off by default, seqblocks/layers/mixers/mamba.py says why)."""
    from seqblocks.layers.mixers.mamba import Mamba

    monkeypatch.setattr(Mamba, "fold_in_proj", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_conv", [2, 4])
@pytest.mark.parametrize("fold", [False, True])
def test_mamba_decodes_through_the_fused_step(triton_steps, dtype, d_conv, fold):
    """The default step is ``mamba_step`` after in_proj's GEMM; with ``fold_in_proj``, ``mamba_layer_step``."""
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(1)
    mixer = Mamba(20, d_state=5, d_conv=d_conv, dt_rank=3).to(dtype)
    mixer.fold_in_proj = fold
    x = torch.randn(2, 6, 20).to(dtype)
    with torch.no_grad():
        full = mixer(x)
    steps, _ = _decode(mixer, x)
    assert triton_steps == {"mamba_layer_step" if fold else "mamba_step"}
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(steps.float(), full.float(), **tol)


def test_model_decodes_through_the_fused_step(triton_steps):
    """An LM of Mamba layers (bf16): logits of prefill + ``model.step`` equal the full forward's."""
    from seqblocks import LRNNLMHeadModel

    torch.manual_seed(4)
    model = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=2, vocab_size=29, mixer_types=["mamba", "mamba"],
                            dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 29, (2, 5))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.allocate_inference_cache(2, 5)
        outs = [model(ids[:, :2], inference_params=caches).logits]
        outs += [model.step(ids[:, t:t + 1], caches).logits for t in range(2, 5)]
    assert triton_steps == {"mamba_step"}
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), atol=2e-2, rtol=2e-2)


def test_mamba_event_form_keeps_the_unfused_step(triton_steps):
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(2)
    mixer = Mamba(12, d_state=4)
    x, ts = torch.randn(2, 5, 12), torch.rand(2, 5) + 0.5
    with torch.no_grad():
        full = mixer(x, integration_timesteps=ts)
        cache = mixer.allocate_inference_cache(2, 5)
        ys = [mixer(x[:, :2], cache, integration_timesteps=ts[:, :2])]
        ys += [mixer(x[:, t:t + 1], cache, integration_timesteps=ts[:, t]) for t in range(2, 5)]
    assert triton_steps == {"conv_step", "selective_state_update"}
    torch.testing.assert_close(torch.cat(ys, 1), full, atol=1e-5, rtol=1e-5)


def _hook(m, args, out):
    m.calls = getattr(m, "calls", 0) + 1


@pytest.mark.parametrize("change", ["forward_hook", "forward_pre_hook", "global_hook", "x_proj_bias", "subclass",
                                    "autocast"])
def test_mamba_keeps_the_module_path_when_fusing_would_differ(triton_steps, change):
    """A hooked, biased or subclassed x_proj, a global module hook or an autocast region: the step calls
    the modules (four GEMMs) and gives what the fused step gives where the function is the same."""
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(3)
    mixer = Mamba(12, d_state=4, dt_rank=2)
    x = torch.randn(2, 5, 12)
    fused, _ = _decode(mixer, x)
    assert triton_steps == {"mamba_step"}
    triton_steps.clear()
    handle, context = None, torch.autocast("cpu", enabled=False)
    if change == "forward_hook":
        handle = mixer.x_proj.register_forward_hook(_hook)
    elif change == "forward_pre_hook":
        handle = mixer.x_proj.register_forward_pre_hook(lambda m, args: _hook(m, args, None))
    elif change == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(_hook)
    elif change == "x_proj_bias":
        old = mixer.x_proj
        mixer.x_proj = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            mixer.x_proj.weight.copy_(old.weight)
            mixer.x_proj.bias.zero_()
    elif change == "subclass":
        old = mixer.x_proj
        mixer.x_proj = type("MyLinear", (nn.Linear,), {})(old.in_features, old.out_features, bias=False)
        mixer.x_proj.load_state_dict(old.state_dict())
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        with context:
            cache_x = mixer.allocate_inference_cache(2, 5)
            with torch.no_grad():
                mixer(x[:, :3], cache_x)
                assert mixer._fuses_step(mixer.in_proj(x[:, 3])) is False
                triton_steps.clear()
                mixer.x_proj.calls = 0  # the prefill called it too
                ys = [mixer(x[:, t:t + 1], cache_x) for t in range(3, 5)]
    finally:
        if handle is not None:
            handle.remove()
    assert not triton_steps & {"mamba_step", "mamba_layer_step"}
    if change == "autocast":
        return  # bf16 GEMMs: a different function by design
    assert triton_steps == {"conv_step", "selective_state_update"}
    if change in ("forward_hook", "forward_pre_hook"):
        assert mixer.x_proj.calls == 2
    torch.testing.assert_close(torch.cat(ys, 1), fused[:, 3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["forward_hook", "subclass"])
def test_mamba_calls_a_changed_in_proj(triton_steps, folded, change):
    """A hooked or subclassed in_proj runs as the module; the rest of the step stays fused (mamba_step)."""
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(5)
    mixer = Mamba(12, d_state=4, dt_rank=2)
    x = torch.randn(2, 5, 12)
    fused, _ = _decode(mixer, x)
    triton_steps.clear()
    if change == "forward_hook":
        mixer.in_proj.register_forward_hook(_hook)
    else:
        old = mixer.in_proj
        mixer.in_proj = type("MyLinear", (nn.Linear,), {})(old.in_features, old.out_features, bias=False)
        mixer.in_proj.load_state_dict(old.state_dict())
    mixer.in_proj.calls = 0
    steps, _ = _decode(mixer, x)
    assert triton_steps == {"mamba_step"}
    if change == "forward_hook":
        assert mixer.in_proj.calls == 3  # the prefill and two steps
    torch.testing.assert_close(steps, fused, atol=1e-5, rtol=1e-5)


@pytest.fixture
def layer_step_norms(monkeypatch):
    """The ``norm`` of every ``mamba_layer_step`` call the mixer makes."""
    from seqblocks.layers.mixers import mamba as mamba_module

    seen: list[str | None] = []
    real = mamba_module.mamba_layer_step

    def spy(*args, **kw):
        seen.append(kw.get("norm"))
        return real(*args, **kw)

    monkeypatch.setattr(mamba_module, "mamba_layer_step", spy)
    return seen


def _lm_decode(model, ids, n_prefill=2):
    with torch.no_grad():
        caches = model.allocate_inference_cache(ids.shape[0], ids.shape[1])
        outs = [model(ids[:, :n_prefill], inference_params=caches).logits]
        outs += [model.step(ids[:, t:t + 1], caches).logits for t in range(n_prefill, ids.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize(("rms_norm", "residual_in_fp32", "dtype"), [
    (True, False, torch.float32), (False, True, torch.float32), (True, True, torch.bfloat16),
    (False, False, torch.bfloat16)])
def test_block_hands_add_norm_to_the_mamba_step(triton_steps, folded, layer_step_norms, rms_norm, residual_in_fp32,
                                                dtype):
    """``Block`` with ``fused_add_norm``: a decode step's add + norm run inside the Mamba step's first
    kernel; the logits equal the full forward's, and (fp32) the unfused step's to rounding."""
    from seqblocks import LRNNLMHeadModel
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(6)
    model = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=3, vocab_size=29, mixer_types=["mamba"] * 3,
                            rms_norm=rms_norm, residual_in_fp32=residual_in_fp32, dtype=dtype).eval()
    ids = torch.randint(0, 29, (2, 5))
    with torch.no_grad():
        full = model(ids).logits
    steps = _lm_decode(model, ids)
    assert triton_steps == {"mamba_layer_step"}
    assert layer_step_norms == ["rmsnorm" if rms_norm else "layernorm"] * 9  # 3 blocks x 3 steps
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(steps.float(), full.float(), **tol)
    if dtype == torch.float32:
        for m in model.modules():
            if isinstance(m, Mamba):
                m.fuse_decode_step = False
        torch.testing.assert_close(_lm_decode(model, ids), steps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["fold_off", "mixer_hook", "global_hook", "fast_path_off", "unfused_block",
                                    "dtype"])
def test_block_keeps_its_add_norm_when_the_step_would_differ(triton_steps, folded, layer_step_norms, change):
    """``fold_in_proj`` off (the default), a hook on the mixer (or a global one), ``use_fast_path=False``,
    ``fused_add_norm=False`` or a mixer whose weights are not in the block's dtype: the block adds and
    norms itself, then calls the mixer."""
    from seqblocks.blocks.block import Block
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(7)
    block = Block(12, lambda d: Mamba(d, d_state=4, dt_rank=2), nn.Identity, nn.LayerNorm,
                  fused_add_norm=change != "unfused_block")
    h, res = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    handle = None
    if change == "fold_off":
        block.mixer.fold_in_proj = False
    elif change == "mixer_hook":
        handle = block.mixer.register_forward_hook(_hook)
        block.mixer.calls = 0
    elif change == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    elif change == "fast_path_off":
        block.mixer.use_fast_path = False
    elif change == "dtype":
        block.mixer.to(torch.float64)
    try:
        with torch.no_grad():
            cache = block.allocate_inference_cache(2, 5)
            outs = [block(h[:, :3], res[:, :3], cache)]
            outs += [block(h[:, t:t + 1], res[:, t:t + 1], cache) for t in range(3, 5)]
            full = block(h, res)
    finally:
        if handle is not None:
            handle.remove()
    assert layer_step_norms in ([], [None, None])  # no add + norm handed over
    if change == "mixer_hook":
        assert block.mixer.calls == 4  # the prefill, two steps and the full forward
    for i in range(2):
        torch.testing.assert_close(torch.cat([o[i] for o in outs], 1), full[i], atol=1e-5, rtol=1e-5)


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring);
    # the sm_90 compile check and the GPU cases stay.
    for _name in [n for n in list(globals()) if n.startswith("test_") and not n.startswith(("test_gpu", "test_sm90"))
                  and n != "test_kernels_under_interpreter"]:
        del globals()[_name]


# ---- sm_90 resources and GPU shapes -------------------------------------------------------------------------

# (E, N, R): mamba-130m's layer and a 2.8b-sized one.
REAL_SHAPES = [(1536, 16, 48), (5120, 16, 160)]


if not INTERPRETER:  # compiled on the host (the child under the interpreter would only skip it)

    @pytest.mark.parametrize(("E", "N", "R"), REAL_SHAPES)
    @pytest.mark.parametrize("Bsz", [1, 8])
    @pytest.mark.parametrize("mode", ["step", "layer"])
    def test_sm90_fused_step_fits(E, N, R, Bsz, mode, tmp_path):
        """Both kernels compile for sm_90 at the block sizes the launcher picks, with no local memory
        (spills): ``mamba_step``'s (in_proj's output loaded) and ``mamba_layer_step``'s with the add +
        RMSNorm and in_proj folded in (D = E / 2). The register counts are printed (``-s``)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        from sm90 import compile_for_sm90, resource_usage

        from seqblocks.ops.selective_scan import step_triton as k

        layer = mode == "layer"
        cfg = k.mamba_step_config(Bsz, E, N, R, d_model=E // 2 if layer else None)
        bf, f32, i32 = "*bf16", "*fp32", "i32"
        a = compile_for_sm90(k._mamba_conv_xproj_kernel, {
            "x_ptr": bf, "res_ptr": bf if layer else None, "nw_ptr": f32 if layer else None, "nb_ptr": None,
            "rout_ptr": bf if layer else None, "hout_ptr": bf if layer else None, "win_ptr": bf if layer else None,
            "bin_ptr": None, "cs_ptr": bf, "cw_ptr": bf, "cb_ptr": bf, "wx_ptr": bf, "xs_ptr": bf, "part_ptr": f32,
            "off_ptr": "*i64", **{n: i32 for n in ("E", "J", "NBLK")}, "eps": "fp32",
            **{n: i32 for n in ("sxb", "sxe", "srb", "swio", "swid", "ssb", "ssw", "sse", "swe", "sww", "swxj",
                                "swxe", "sxsb")}},
            {"Dm": E // 2 if layer else 0, "IN_MODE": 2 if layer else 0, "IS_RMS": True, "HAS_RES": layer,
             "HAS_NW": layer, "HAS_NB": False,
             "HAS_IN_BIAS": False, "W": 4, "WP": 4, "HAS_BIAS": True, "SILU": True, "ADVANCE": True,
             "UNROLL": cfg["UNROLL_A"], "BLOCK_E": cfg["BLOCK_E_A"], "BLOCK_D": cfg["BLOCK_D_A"],
             "BLOCK_ROW": cfg["BLOCK_ROW"], "BLOCK_J": cfg["BLOCK_J"]}, cfg["WARPS_A"])
        b = compile_for_sm90(k._mamba_dt_ssu_kernel, {
            "part_ptr": f32, "wdt_ptr": bf, "xs_ptr": bf, "z_ptr": None if layer else bf,
            "h_ptr": bf if layer else None,
            "win_ptr": bf if layer else None, "bin_ptr": None, "state_ptr": f32, "a_ptr": f32, "d_ptr": f32,
            "bias_ptr": f32, "y_ptr": bf,
            **{n: i32 for n in ("E", "N", "R", "J", "NBLK", "swde", "swdr", "sxsb", "szb", "sze", "shb", "shd",
                                "swio", "swid", "ssb", "sse", "ssn", "sae", "san", "syb")}},
            {"Dm": E // 2 if layer else 0, "METHOD": 0, "A_IS_LOG": True, "SOFTPLUS": True, "HAS_D": True,
             "Z_MODE": 2 if layer else 1, "UNROLL": cfg["UNROLL_B"],
             "HAS_IN_BIAS": False, "HAS_BIAS": True, "BLOCK_E": cfg["BLOCK_E"], "BLOCK_N": cfg["BLOCK_N"],
             "BLOCK_R": cfg["BLOCK_R"], "BLOCK_K": cfg["BLOCK_K"], "BLOCK_D": cfg["BLOCK_D_B"]}, cfg["WARPS_B"])
        usage = [resource_usage(a, str(tmp_path)), resource_usage(b, str(tmp_path))]
        assert a.asm["cubin"] and b.asm["cubin"]
        print(f"\n{mode} E={E} N={N} R={R} B={Bsz} {cfg}: kernel A {usage[0]}, kernel B {usage[1]}")
        if usage[0] is not None:
            assert all(u["LOCAL"] == 0 for u in usage), usage


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("E", "N", "R"), REAL_SHAPES)
@pytest.mark.parametrize("Bsz", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_step_at_real_shapes(E, N, R, Bsz, dtype):
    """On CUDA ("auto" takes the kernels): the fused step against the composed one, and replayed from a
    captured CUDA graph equal to eager."""
    t, bias = _inputs(Bsz, E, N, R, 4, dtype, device="cuda")
    _check(t, bias, dtype)
    offset0 = torch.zeros(Bsz, dtype=torch.long, device="cuda")
    y_eager, cs_eager, ss_eager, off_eager = _run(t, bias, "auto", offset0)
    conv_state, ssm_state, off = t["conv_state"].clone(), t["ssm_state"].clone(), offset0.clone()
    args = dict(t, conv_state=conv_state, ssm_state=ssm_state)
    with torch.no_grad():
        mamba_step(**dict(args, conv_state=conv_state.clone(), ssm_state=ssm_state.clone()), delta_bias=bias,
                   a_is_log=True, seqlen_offset=off.clone())  # warm-up: compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = mamba_step(**args, delta_bias=bias, a_is_log=True, seqlen_offset=off)
        conv_state.copy_(t["conv_state"])
        ssm_state.copy_(t["ssm_state"])
        off.copy_(offset0)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_eager) and torch.equal(ssm_state, ss_eager)
    assert torch.equal(conv_state, cs_eager) and torch.equal(off, off_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("E", "N", "R"), REAL_SHAPES)
@pytest.mark.parametrize("Bsz", [1, 8])
@pytest.mark.parametrize("norm", [None, "rmsnorm", "layernorm"])
def test_gpu_layer_step_at_real_shapes(E, N, R, Bsz, norm):
    """bf16 on CUDA, D = E / 2: ``mamba_layer_step``'s kernels against the step composed with their fp32
    accumulations and roundings, and replayed from a captured CUDA graph equal to eager."""
    t, bias, kw = _layer_inputs(Bsz, E // 2, E, N, R, 4, torch.bfloat16, norm=norm, residual=norm is not None,
                                in_bias=norm == "layernorm", device="cuda")
    offset0 = torch.zeros(Bsz, dtype=torch.long, device="cuda")
    (y, r), cs, ss, off = _run_layer(t, bias, "auto", offset0, kw)
    (y32, r32), cs32, ss32, off32 = _layer_reference(t, bias, offset0, kw)
    assert torch.equal(off, off32)
    if norm is not None:
        torch.testing.assert_close(r.float(), r32.float(), atol=0, rtol=2 ** -7)
    # A bf16 ulp of h or xz (sums in another order) moves the conv window's newest value and the state's
    # terms: normwise bounds (LayerNorm at E 5120, batch 8: 5 of 122,880 window values 2 % apart).
    assert ((cs.float() - cs32.float()).norm() / cs32.float().norm()).item() < 1e-3
    assert ((ss - ss32).norm() / ss32.norm()).item() < 1e-3
    assert ((y.float() - y32.float()).norm() / y32.float().norm()).item() < 1e-2
    conv_state, ssm_state, off = t["conv_state"].clone(), t["ssm_state"].clone(), offset0.clone()
    args = dict(t, conv_state=conv_state, ssm_state=ssm_state)
    with torch.no_grad():
        mamba_layer_step(**dict(args, conv_state=conv_state.clone(), ssm_state=ssm_state.clone()), **kw,
                         delta_bias=bias, a_is_log=True, seqlen_offset=off.clone())  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mamba_layer_step(**args, **kw, delta_bias=bias, a_is_log=True, seqlen_offset=off)
        conv_state.copy_(t["conv_state"])
        ssm_state.copy_(t["ssm_state"])
        off.copy_(offset0)
        graph.replay()
    torch.cuda.synchronize()
    out = out if isinstance(out, tuple) else (out, None)
    assert torch.equal(out[0], y) and torch.equal(ssm_state, ss) and torch.equal(conv_state, cs)
    if norm is not None:
        assert torch.equal(out[1], r)
