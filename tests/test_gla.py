"""GLA and simple GLA: the chunked PyTorch path and the Triton kernels against the sequential
reference (the spec), forward and every input gradient, and the reference against fla's own naive
recurrences.

The Triton cases run under Triton's interpreter (``TRITON_INTERPRET=1``) in a child process
(``tests/interpreter.py`` says why); the PyTorch cases run in this process only.

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from interpreter import INTERPRETER, run_file_under_interpreter

from seqblocks.ops._backend import triton_available
from seqblocks.ops.gla import gla, gla_ref, gla_step, simple_gla, simple_gla_ref, simple_gla_step
from seqblocks.testing import assert_close

OPS = {"gla": (gla, gla_ref, gla_step), "simple_gla": (simple_gla, simple_gla_ref, simple_gla_step)}
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def _inputs(name, B, T, H, K, V, dtype=torch.float32, seed=0, state=True, N=None):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, T, H, K) * 0.5, r(B, T, H, K) * 0.5, r(B, T, H, V)
    gshape = (B, T, H) if name == "simple_gla" else (B, T, H, K)
    g = F.logsigmoid(r(*gshape) * 2 + 1)  # decays spread over (0, 1), some strong
    h0 = r(N or B, H, K, V) if state else None
    tensors = [t.to(dtype) for t in (q, k, v, g)]
    return tensors, h0


def _grads(fn, inputs, h0, cu=None, *, cot_seed=1, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    h = None if h0 is None else h0.detach().clone().requires_grad_()
    o, s = fn(*leaves, initial_state=h, output_final_state=True, cu_seqlens=cu, **kw)
    gen = torch.Generator().manual_seed(cot_seed)
    do, ds = torch.randn(o.shape, generator=gen).to(o.dtype), torch.randn(s.shape, generator=gen)
    (o.float() * do.float()).sum().add((s * ds).sum()).backward()
    grads = [t.grad for t in leaves] + ([] if h is None else [h.grad])
    return o, s, [torch.zeros_like(t) if d is None else d for t, d in zip([*leaves, h], grads)]  # T = 0: none


def _compare(name, inputs, h0, cu=None, atol=2e-4, **kw):
    fast, ref, _ = OPS[name]
    o, s, grads = _grads(fast, inputs, h0, cu, **kw)
    o_r, s_r, grads_r = _grads(ref, inputs, h0, cu)
    assert_close(o.float(), o_r.float(), atol=atol, rtol=atol)
    assert_close(s, s_r, atol=atol, rtol=atol)
    for a, b in zip(grads, grads_r, strict=True):
        assert_close(a.float(), b.float(), atol=atol * 5, rtol=atol * 5)


if not INTERPRETER:

    if triton_available():

        def test_kernels_under_interpreter():
            """Run this file's Triton cases in a child process under TRITON_INTERPRET=1."""
            run_file_under_interpreter(__file__)

    @pytest.mark.parametrize("name", OPS)
    @pytest.mark.parametrize("T, chunk", [(1, 4), (7, 4), (63, 16), (65, 16)])
    def test_chunked_equals_reference(name, T, chunk):
        inputs, h0 = _inputs(name, 2, T, 2, 8, 5)
        _compare(name, inputs, h0, chunk_size=chunk, backend="torch")

    @pytest.mark.parametrize("name", OPS)
    def test_chunked_bf16_and_no_initial_state(name):
        inputs, h0 = _inputs(name, 1, 23, 2, 8, 8, dtype=torch.bfloat16, state=False)
        _compare(name, inputs, h0, atol=3e-2, chunk_size=8, backend="torch")

    @pytest.mark.parametrize("name", OPS)
    def test_chunked_packed_sequences(name):
        cu = torch.tensor([0, 9, 9, 30], dtype=torch.int32)
        inputs, h0 = _inputs(name, 1, 30, 2, 4, 3, N=3)
        _compare(name, inputs, h0, cu, chunk_size=8, backend="torch")
        # each packed sequence equals its own call
        fast = OPS[name][0]
        o, s = fast(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        o2, s2 = fast(*(t[:, 9:] for t in inputs), initial_state=h0[2:], output_final_state=True)
        assert_close(o[:, 9:], o2, atol=1e-5)
        assert_close(s[2:], s2, atol=1e-5)
        assert_close(s[1], h0[1], atol=0)  # the empty sequence passes its state through

    def test_strong_per_key_decay_stays_finite():
        # 64 tokens at g = -30 decay the chunk by e^-1920: exp(b_i) exp(-b_j) would overflow, the
        # sub-block form does not.
        inputs, h0 = _inputs("gla", 1, 64, 1, 4, 4)
        inputs[3] = torch.full_like(inputs[3], -30.0)
        _compare("gla", inputs, h0, chunk_size=64, backend="torch")

    @pytest.mark.parametrize("name", OPS)
    def test_reference_equals_fla_naive(name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "gla":
                naive = pytest.importorskip("fla.ops.gla.naive").naive_recurrent_gla
            else:
                naive = pytest.importorskip("fla.ops.simple_gla.naive").naive_recurrent_simple_gla
        (q, k, v, g), h0 = _inputs(name, 2, 13, 3, 8, 6)
        o, s = OPS[name][1](q, k, v, g, initial_state=h0, output_final_state=True)
        if name == "gla":
            o_f, s_f = naive(q, k, v, g, initial_state=h0, output_final_state=True)
        else:
            o_f, s_f = naive(q, k, v, g, initial_state=h0, output_final_state=True)
        assert_close(o, o_f, atol=1e-5)
        assert_close(s, s_f, atol=1e-5)

    @pytest.mark.parametrize("name", OPS)
    def test_step_equals_one_token_sequence(name):
        fast, _, step = OPS[name]
        (q, k, v, g), h0 = _inputs(name, 2, 1, 3, 8, 6)
        o, s = fast(q, k, v, g, initial_state=h0, output_final_state=True, scale=0.3)
        state = h0.clone()
        o_step = step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], scale=0.3)
        assert_close(o_step, o[:, 0], atol=1e-6)
        assert_close(state, s, atol=1e-6)

    def test_float64_and_autocast():
        (q, k, v, g), h0 = _inputs("gla", 1, 9, 1, 4, 4)
        o, s = gla(q.double(), k.double(), v.double(), g.double(), initial_state=h0.double(), output_final_state=True)
        assert o.dtype == torch.float64 and s.dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o2, _ = gla(q, k, v, g, initial_state=h0)
        assert o2.dtype == torch.float32
        assert_close(o2, o.float(), atol=1e-5)

    @pytest.mark.parametrize("call, error, match", [
        (lambda q, k, v, g: gla(q[0], k, v, g), ValueError, r"q must have shape \[B, T, H, K\]"),
        (lambda q, k, v, g: gla(q, k[:, :, :1], v, g), ValueError, "k must have"),
        (lambda q, k, v, g: gla(q, k, v, g[..., 0]), ValueError, r"g must have shape \[B, T, H, K\]"),
        (lambda q, k, v, g: simple_gla(q, k, v, g), ValueError, r"g must have shape \[B, T, H\]"),
        (lambda q, k, v, g: gla(q, k, v.long(), g), TypeError, "v must be real floating point"),
        (lambda q, k, v, g: gla(q, k, v, g, scale="x"), TypeError, "scale"),
        (lambda q, k, v, g: gla(q, k, v, g, initial_state=torch.zeros(2, 2, 8, 4)), ValueError, "initial_state"),
        (lambda q, k, v, g: gla(q, k, v, g, cu_seqlens=torch.tensor([0, 5])), ValueError, "packed in a batch of 1"),
        (lambda q, k, v, g: gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 3])), ValueError,
         "rise from 0 to T"),
        (lambda q, k, v, g: gla(q, k, v, g, chunk_size=0), ValueError, "chunk_size"),
        (lambda q, k, v, g: gla(q, k, v, g, backend="cuda"), ValueError, "unknown backend"),
        (lambda q, k, v, g: gla_step(torch.zeros(2, 2, 8, 5), q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, :3]),
         ValueError, "g must have shape"),
        (lambda q, k, v, g: gla_step(torch.zeros(2, 2, 8, 5).bfloat16(), q[:, 0], k[:, 0], v[:, 0], g[:, 0]),
         TypeError, "fp32"),
    ])
    def test_bad_inputs_raise(call, error, match):
        (q, k, v, g), _ = _inputs("gla", 2, 5, 2, 8, 5)
        with pytest.raises(error, match=match):
            call(q, k, v, g)

    def test_triton_request_on_cpu_raises():
        (q, k, v, g), _ = _inputs("gla", 1, 5, 1, 16, 16)
        with pytest.raises(ValueError, match="CUDA tensors"):
            gla(q, k, v, g, backend="triton")
        (q, k, v, g), _ = _inputs("gla", 1, 5, 1, 257, 4)
        with pytest.raises(ValueError, match="no Triton kernel"):
            gla(q, k, v, g, backend="triton")

    @pytest.mark.slow
    @pytest.mark.skipif(not triton_available(), reason="needs Triton")
    @pytest.mark.parametrize("dtype", ["bf16", "fp32"])
    def test_kernels_compile_for_sm90(dtype):
        """Every kernel compiles to an sm_90 cubin at K = V = 128 (no GPU needed: Triton's own ptxas)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from seqblocks.ops.gla import triton as kernels

        ints = {"N", "H", "K", "V"}
        for scalar in (False, True):
            common = {"BT": 64, "BK": 128, "SCALAR": scalar}
            jobs = [(kernels._chunk_prepare, {}), (kernels._intra_scores, {"BC": 16, "LOWP": dtype == "bf16"}),
                    (kernels._fwd_state, {"BV": 32, "HAS_H0": True, "HAS_HT": True, "SAVE": True,
                                          "LOWP": dtype == "bf16"}),
                    (kernels._bwd_dstate, {"BV": 32, "HAS_DHT": True, "HAS_DH0": True, "LOWP": dtype == "bf16"}),
                    (kernels._bwd_inter, {"BV": 32, "LOWP": dtype == "bf16"}),
                    (kernels._bwd_intra, {"BC": 16, "LOWP": dtype == "bf16"}),
                    (kernels._step_kernel, {"BV": 32, "BT": None})]
            for fn, extra in jobs:
                consts = {k: v for k, v in {**common, **extra}.items() if v is not None and k in fn.arg_names}
                sig = {n: "constexpr" if n in consts else "i32" if n in ints else "fp32" if n == "scale"
                       else "*i32" if n in ("slot_seq", "slot_chunk", "cu", "coff")
                       else f"*{dtype}" if n in ("q", "k", "v", "o", "do", "qg", "kg") else "*fp32"
                       for n in fn.arg_names}
                where = {(fn.arg_names.index(k),): v for k, v in consts.items()}
                src = ASTSource(fn=fn, signature=sig, constexprs=where)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                assert compiled.asm["cubin"], fn

else:

    @pytest.mark.parametrize("name", OPS)
    @pytest.mark.parametrize("T", [0, 1, 7, 63, 65])
    def test_triton_equals_reference(name, T):
        inputs, h0 = _inputs(name, 1, T, 2, 16, 16)
        _compare(name, inputs, h0, atol=1e-3, backend="triton")

    @pytest.mark.parametrize("name", OPS)
    def test_triton_bf16_packed_no_state(name):
        cu = torch.tensor([0, 17, 17, 40], dtype=torch.int32)
        inputs, _ = _inputs(name, 1, 40, 1, 16, 32, dtype=torch.bfloat16, N=3)
        _compare(name, inputs, None, cu, atol=3e-2, backend="triton")

    @pytest.mark.parametrize("name", OPS)
    def test_triton_odd_widths_and_strong_decay(name):
        # K, V not powers of two (masked lanes), and a decay of e^-30 per step: e^-1920 over a chunk
        inputs, h0 = _inputs(name, 1, 40, 1, 12, 20)
        inputs[3] = torch.full_like(inputs[3], -30.0) if name == "gla" else inputs[3]
        _compare(name, inputs, h0, atol=1e-3, backend="triton")

    @pytest.mark.parametrize("name", OPS)
    def test_triton_step(name):
        fast, _, step = OPS[name]
        (q, k, v, g), h0 = _inputs(name, 2, 1, 2, 16, 32)
        o, s = OPS[name][1](q, k, v, g, initial_state=h0, output_final_state=True)
        state = h0.clone()
        o_step = step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], backend="triton")
        assert_close(o_step, o[:, 0], atol=1e-5)
        assert_close(state, s, atol=1e-5)

    @pytest.mark.parametrize("name", OPS)
    def test_triton_forward_without_gradients(name):
        # no per-chunk states are stored when nothing needs a gradient
        (q, k, v, g), h0 = _inputs(name, 1, 70, 2, 16, 16)
        o_r, s_r = OPS[name][1](q, k, v, g, initial_state=h0, output_final_state=True)
        with torch.no_grad():
            o, s = OPS[name][0](q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
        assert_close(o, o_r, atol=1e-4)
        assert_close(s, s_r, atol=1e-4)
