"""The decode-step Triton kernels against their PyTorch paths, and mixers decoding through them, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process. Decoding has no backward, so only forward values and the in-place
state updates are compared.

Shapes: B batch, E channels, N state, G groups, W conv width.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops import _backend  # noqa: E402
from seqblocks.ops.scan.step import linear_scan_step, rglru_step, s7_step  # noqa: E402
from seqblocks.ops.selective_scan import selective_state_update  # noqa: E402
from seqblocks.ops.selective_scan.step import conv_step  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _ssu_inputs(Bsz, E, N, G, dtype, *, strided):
    g = torch.Generator().manual_seed(Bsz * 100 + E + N + G)
    # u and z as views into one [B, 2E] buffer, as the Mamba step passes them.
    xz = torch.randn(Bsz, 2 * E, generator=g).to(dtype)
    u, z = (xz[:, :E], xz[:, E:]) if strided else (xz[:, :E].contiguous(), xz[:, E:].contiguous())
    delta = torch.randn(Bsz, E, generator=g).to(dtype)
    A_log = torch.log(torch.rand(E, N, generator=g) * 2 + 0.1)
    shape = (Bsz, N) if G == 0 else (Bsz, G, N)
    x_dbl = torch.randn(Bsz, 2, *shape[1:], generator=g).to(dtype)
    B, C = x_dbl[:, 0], x_dbl[:, 1]
    D = torch.randn(E, generator=g)
    bias = torch.randn(E, generator=g) * 0.5
    state = torch.randn(Bsz, E, N, generator=g)
    return state, u, delta, A_log, B, C, D, z, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("Bsz", "E", "N", "G"), [(3, 37, 5, 0), (2, 24, 16, 3), (1, 70, 16, 0)])
@pytest.mark.parametrize("discretization", ["mamba", "bilinear", "dirac"])
def test_selective_state_update_kernel(dtype, Bsz, E, N, G, discretization):
    state, u, delta, A_log, B, C, D, z, bias = _ssu_inputs(Bsz, E, N, G, dtype, strided=True)
    ref_state = state.clone()
    kw = {"D": D, "z": z, "delta_bias": bias, "delta_softplus": True, "discretization": discretization}
    y_ref = selective_state_update(ref_state, u, delta, -torch.exp(A_log), B, C, backend="torch", **kw)
    ptr = state.data_ptr()
    y = selective_state_update(state, u, delta, A_log, B, C, a_is_log=True, backend="triton", **kw)
    assert y.dtype == dtype and y.shape == (Bsz, E)
    assert state.data_ptr() == ptr  # updated in place
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_state_update_kernel_options_off_and_event_form(dtype):
    """No D, no z, no bias or softplus; then a separate step for Ā ([B, E] and [B])."""
    state, u, delta, A_log, B, C, _, _, _ = _ssu_inputs(2, 19, 7, 0, dtype, strided=False)
    delta = delta.float().abs().to(dtype)
    A = -torch.exp(A_log)
    for delta_A in (None, torch.rand(2, 19).to(dtype), torch.rand(2)):
        s_ref, s = state.clone(), state.clone()
        y_ref = selective_state_update(s_ref, u, delta, A, B, C, delta_A=delta_A, backend="torch")
        y = selective_state_update(s, u, delta, A, B, C, delta_A=delta_A, backend="triton")
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.float(), y_ref.float(), **_tol(dtype))


def test_selective_state_update_refuses_what_no_kernel_serves():
    state, u, delta, A_log, B, C, *_ = _ssu_inputs(2, 8, 4, 0, torch.float32, strided=False)
    with pytest.raises(ValueError, match="no Triton kernel"):
        selective_state_update(state, u, delta, A_log, B, C, discretization="zoh", backend="triton")
    with pytest.raises(TypeError, match="a_is_log"):
        selective_state_update(state.to(torch.complex64), u, delta, A_log.to(torch.complex64), B, C,
                               a_is_log=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("W", "with_bias", "activation"), [(4, True, "silu"), (3, False, None), (1, True, "silu")])
def test_conv_step_kernel(dtype, W, with_bias, activation):
    g = torch.Generator().manual_seed(W)
    Bsz, E = 3, 45
    xz = torch.randn(Bsz, 2 * E, generator=g).to(dtype)
    x = xz[:, :E]  # a strided view, as in the Mamba step
    weight = torch.randn(E, W, generator=g).to(dtype)
    bias = torch.randn(E, generator=g).to(dtype) if with_bias else None
    state = torch.randn(Bsz, W - 1, E, generator=g).to(dtype)
    ref_state = state.clone()
    offset, ref_offset = torch.arange(Bsz), torch.arange(Bsz)
    y_ref = conv_step(x, ref_state, weight, bias, activation, seqlen_offset=ref_offset, backend="torch")
    y = conv_step(x, state, weight, bias, activation, seqlen_offset=offset, backend="triton")
    assert y.dtype == dtype
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)  # the shift is a copy
    torch.testing.assert_close(offset, ref_offset)
    torch.testing.assert_close(offset, torch.arange(Bsz) + 1)
    torch.testing.assert_close(y.float(), y_ref.float(), **_tol(dtype))


def test_conv_step_refuses_bad_inputs():
    x, w = torch.randn(2, 8), torch.randn(8, 4)
    with pytest.raises(ValueError, match="conv_state"):
        conv_step(x, torch.zeros(2, 4, 8), w)
    with pytest.raises(ValueError, match="activation"):
        conv_step(x, torch.zeros(2, 3, 8), w, activation="relu")
    with pytest.raises(TypeError, match="seqlen_offset"):
        conv_step(x, torch.zeros(2, 3, 8), w, seqlen_offset=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlen_offset"):
        conv_step(x, torch.zeros(2, 3, 8), w, seqlen_offset=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_scan_step_kernel(complex_, shared, dtype):
    """h = a h + b against the one-step ``linear_scan`` reference, real and complex, in place or not."""
    from seqblocks.ops.scan import linear_scan_ref

    g = torch.Generator().manual_seed(int(complex_) + 2 * int(shared))
    Bsz, S = 3, (5, 7)
    a_shape = S if shared else (Bsz, *S)
    if complex_:
        state = torch.randn(Bsz, *S, dtype=torch.complex64, generator=g)
        a = torch.polar(torch.rand(a_shape, generator=g), torch.randn(a_shape, generator=g))
        b = torch.randn(Bsz, *S, dtype=torch.complex64, generator=g)
    else:
        state = torch.randn(Bsz, *S, generator=g)
        a, b = torch.rand(a_shape, generator=g).to(dtype), torch.randn(Bsz, *S, generator=g).to(dtype)
    a_seq = a.unsqueeze(0).expand(Bsz, *S) if shared else a
    _, ref = linear_scan_ref(a_seq.unsqueeze(1), b.unsqueeze(1), state)
    fresh = linear_scan_step(state, a, b, inplace=False, backend="triton")
    assert fresh.data_ptr() != state.data_ptr()
    offset = torch.zeros(Bsz, dtype=torch.long)
    out = linear_scan_step(state, a, b, seqlen_offset=offset, backend="triton")
    assert out.data_ptr() == state.data_ptr()
    torch.testing.assert_close(state, ref.to(state.dtype), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh, state, atol=0, rtol=0)
    torch.testing.assert_close(offset, torch.ones(Bsz, dtype=torch.long))


def test_linear_scan_step_refuses_bad_inputs():
    with pytest.raises(ValueError, match="linear_scan_step"):
        linear_scan_step(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="complex state"):
        linear_scan_step(torch.zeros(2, 3), torch.zeros(3, dtype=torch.complex64), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="seqlen_offset"):
        linear_scan_step(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3), seqlen_offset=torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rglru_step_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    Bsz, E = 3, 150  # two blocks per row, the second masked
    state = torch.randn(Bsz, E, generator=g)
    x, ga, gi = (torch.randn(Bsz, E, generator=g).to(dtype) for _ in range(3))
    # a_param from decays near 1 (where sqrt(1 - a^2) needs care) to small ones.
    a_param = torch.linspace(-3.0, 9.0, E)
    ref_state, ref_off, off = state.clone(), torch.zeros(Bsz, dtype=torch.long), torch.zeros(Bsz, dtype=torch.long)
    rglru_step(ref_state, x, ga, gi, a_param, 8.0, seqlen_offset=ref_off, backend="torch")
    out = rglru_step(state, x, ga, gi, a_param, 8.0, seqlen_offset=off, backend="triton")
    assert out.data_ptr() == state.data_ptr()
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off, ref_off)
    torch.testing.assert_close(off, torch.ones(Bsz, dtype=torch.long))


def test_rglru_step_refuses_bad_inputs():
    s = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="a_param"):
        rglru_step(s, s, s, s, torch.zeros(5), 8.0)
    with pytest.raises(ValueError, match="gate_a"):
        rglru_step(s, s, torch.zeros(2, 3), s, torch.zeros(4), 8.0)
    with pytest.raises(TypeError, match="x must be real"):
        rglru_step(s, s.to(torch.complex64), s, s, torch.zeros(4), 8.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize(("with_residual", "residual_in_fp32"), [(True, True), (True, False), (False, False)])
def test_add_norm_kernel(dtype, is_rms, with_residual, residual_in_fp32):
    from seqblocks.ops.add_norm import add_norm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 37, generator=g).to(dtype)
    residual = torch.randn(3, 2, 37, generator=g).to(torch.float32 if residual_in_fp32 else dtype) \
        if with_residual else None
    weight = torch.randn(37, generator=g).to(dtype)
    bias = None if is_rms else torch.randn(37, generator=g).to(dtype)
    kw = {"eps": 1e-5, "is_rms": is_rms, "residual_in_fp32": residual_in_fp32, "prenorm": True}
    y_ref, r_ref = add_norm(x, residual, weight, bias, backend="torch", **kw)
    y, r = add_norm(x, residual, weight, bias, backend="triton", **kw)
    assert y.dtype == y_ref.dtype and r.dtype == r_ref.dtype
    # The same fp32 sum rounded once (the interpreter's bf16 rounding may land one ulp away).
    exact = r.dtype == torch.float32
    torch.testing.assert_close(r, r_ref, atol=0, rtol=0 if exact else 2 ** -7)
    torch.testing.assert_close(y.float(), y_ref.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "D"), [(5, 37), (16, 70)])
def test_s7_step_kernel(dtype, N, D):
    g = torch.Generator().manual_seed(N + D)
    Bsz = 3
    state = torch.randn(Bsz, N, generator=g)
    x = torch.randn(Bsz, D, generator=g).to(dtype)
    proj = (torch.randn(Bsz, 2 * N + 2 * N * D + D, generator=g) / D ** 0.5).to(dtype)
    lambda_base, d_base = torch.randn(N, generator=g), torch.randn(D, generator=g)
    ref_state, off, ref_off = state.clone(), torch.zeros(Bsz, dtype=torch.long), torch.zeros(Bsz, dtype=torch.long)
    y_ref = s7_step(ref_state, x, proj, lambda_base, d_base, seqlen_offset=ref_off, backend="torch")
    y = s7_step(state, x, proj, lambda_base, d_base, seqlen_offset=off, backend="triton")
    assert y.dtype == torch.float32 and y.shape == (Bsz, D)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off, ref_off)


def test_s7_step_refuses_bad_inputs():
    with pytest.raises(ValueError, match="proj must have shape"):
        s7_step(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="lambda_base"):
        s7_step(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 34), torch.zeros(4), torch.zeros(4))


STEP_OPS = {"selective_state_update", "conv_step", "linear_scan_step", "rglru_step", "s7_step", "add_norm"}
STEP_MODULES = ("seqblocks.ops.selective_scan", "seqblocks.ops.selective_scan.step", "seqblocks.ops.scan.step",
                "seqblocks.ops.add_norm")


@pytest.fixture
def triton_steps(monkeypatch):
    """Send every decode-step op's "auto" to its Triton kernel (on the CPU, through the interpreter)."""
    real = _backend.resolve_backend
    served: set[str] = set()

    def forced(backend, *tensors, op, has_kernel=True):
        if backend == "auto" and op in STEP_OPS and has_kernel:
            backend = "triton"
        chosen = real(backend, *tensors, op=op, has_kernel=has_kernel)
        if chosen == "triton":
            served.add(op)
        return chosen

    for module in STEP_MODULES:
        monkeypatch.setattr(importlib.import_module(module), "resolve_backend", forced)
    return served


def _decode_matches_full(mixer, dtype, T=6, Bsz=2):
    torch.manual_seed(0)
    x = torch.randn(Bsz, T, mixer.d_model).to(dtype)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.allocate_inference_cache(Bsz, T)
        ys = [mixer(x[:, :3], cache)]
        for t in range(3, T):
            ys.append(mixer(x[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(ys, 1).float(), full.float(), **_tol(dtype))
    torch.testing.assert_close(cache.seqlen_offset, torch.full((Bsz,), T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("discretization", ["mamba", "bilinear"])
def test_mamba_decodes_through_the_kernels(triton_steps, dtype, discretization):
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(1)
    mixer = Mamba(12, d_state=5, expand=2, discretization=discretization).to(dtype)
    _decode_matches_full(mixer, dtype)
    assert triton_steps == {"conv_step", "selective_state_update"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "kwargs", "ops"), [
    ("RGLRU", {}, {"conv_step", "rglru_step"}),
    ("S7", {"d_state": 6}, {"s7_step"}),
    ("S5", {"d_state": 6}, {"linear_scan_step"}),
    ("LRU", {"d_state": 6}, {"linear_scan_step"}),
])
def test_recurrent_mixers_decode_through_the_kernels(triton_steps, dtype, name, kwargs, ops):
    from seqblocks.registry import MIXERS

    torch.manual_seed(2)
    mixer = MIXERS.get(name)(12, **kwargs).to(dtype)
    _decode_matches_full(mixer, dtype)
    assert triton_steps == ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decodes_through_the_kernels(triton_steps, dtype):
    """A hybrid LM: logits of prefill + steps equal the full forward with every step op on its kernel."""
    from seqblocks import LRNNLMHeadModel

    torch.manual_seed(4)
    model = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=4, vocab_size=29, residual_in_fp32=True,
                            mixer_types=["mamba", "rglru", "s7", "lru"], dtype=dtype).eval()
    ids = torch.randint(0, 29, (2, 6))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.allocate_inference_cache(2, 6)
        outs = [model(ids[:, :2], inference_params=caches).logits]
        outs += [model.step(ids[:, t:t + 1], caches).logits for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), **_tol(dtype))
    assert triton_steps == STEP_OPS


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring).
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_interpreter"]:
        del globals()[_name]

    def _compile_sm90(fn, pointers, floats, constexprs):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
               for n in fn.arg_names}
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

    def test_kernels_compile_for_sm90():
        """The interpreter accepts code the compiler refuses: compile each step kernel for an H100 / H200
        (sm_90) on the host, down to a cubin (no GPU needed). add_norm's kernels have their own such test
        (tests/test_add_norm_triton.py)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        from seqblocks.ops.scan import step_triton as scan_step
        from seqblocks.ops.selective_scan import step_triton as ss_step

        bf = "*bf16"
        kernels = [
            (ss_step._conv_step_kernel, {"x_ptr": bf, "state_ptr": bf, "w_ptr": bf, "b_ptr": bf, "y_ptr": bf,
                                         "off_ptr": "*i64"}, (),
             {"W": 4, "WP": 4, "HAS_BIAS": True, "SILU": True, "ADVANCE": True, "BLOCK_E": 64}),
            (ss_step._ssu_kernel, {"state_ptr": "*fp32", "u_ptr": bf, "dt_ptr": bf, "a_ptr": "*fp32", "bm_ptr": bf,
                                   "cm_ptr": bf, "d_ptr": "*fp32", "z_ptr": bf, "bias_ptr": "*fp32", "da_ptr": bf,
                                   "y_ptr": bf}, (),
             {"METHOD": 1, "A_IS_LOG": True, "SOFTPLUS": True, "HAS_D": True, "HAS_Z": True, "HAS_BIAS": True,
              "HAS_DA": True, "BLOCK_E": 16, "BLOCK_N": 16}),
            (scan_step._linear_step_kernel, {"h_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": bf, "out_ptr": "*fp32",
                                             "off_ptr": "*i64"}, (), {"COMPLEX": True, "ADVANCE": True, "BLOCK": 256}),
            (scan_step._rglru_step_kernel, {"h_ptr": "*fp32", "x_ptr": bf, "ga_ptr": bf, "gi_ptr": bf,
                                            "p_ptr": "*fp32", "off_ptr": "*i64"}, ("c",),
             {"ADVANCE": True, "BLOCK": 128}),
            (scan_step._s7_step_kernel, {"h_ptr": "*fp32", "x_ptr": bf, "p_ptr": bf, "lb_ptr": "*fp32",
                                         "db_ptr": "*fp32", "y_ptr": "*fp32", "off_ptr": "*i64"}, (),
             {"ADVANCE": True, "BLOCK_D": 256, "BLOCK_N": 16}),
        ]
        for fn, pointers, floats, constexprs in kernels:
            assert _compile_sm90(fn, pointers, floats, constexprs).asm["cubin"], fn.__name__
