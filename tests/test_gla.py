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
from layouts import time_innermost

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

    def _launches(K: int, V: int, dtype: str):
        """(name, kernel, constexprs, warps, stages) of every launch of a call at B 8, H 16 (bf16 / fp32
        inputs, every feature on: packed, initial and final state), with ``gla_options``' defaults."""
        import triton

        from seqblocks.ops.gla import triton as kernels

        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        o = kernels.gla_options(K, V, dt)
        base = {"H": 16, "K": K, "V": V, "BT": 64, "BC": 16, "LOWP": dtype != "fp32", "CHUNK_RANGE": o.chunk_range,
                "BLOCK_RANGE": o.block_range}
        BK = max(16, triton.next_power_of_2(K))
        jobs = []
        for scalar in (False, True):
            o = kernels.gla_options(K, V, dt, scalar=scalar)
            tag = "scalar" if scalar else "gla"
            for strong in (False, True) if not scalar else (False,):
                name = f"{tag}{' strong' if strong else ''}"
                c = base | {"SCALAR": scalar, "STRONG": strong}
                warps = o.strong_warps if strong else None
                jobs.append((name, kernels._fwd_chunk, c | {"BK": o.fwd_bk}, warps or o.fwd_warps, o.fwd_stages))
                jobs.append((name, kernels._bwd_chunk, c | {"BK": o.bwd_bk, "BV": o.bwd_bv, "FUSE_DV": o.bwd_bk >= K},
                             warps or o.bwd_warps, o.bwd_stages))
        o = kernels.gla_options(K, V, dt)
        state = base | {"BK": BK, "BV": o.state_bv}
        jobs += [("gla", kernels._fwd_state, state | {"HAS_H0": True, "HAS_HT": True, "SAVE": True}, o.state_warps,
                  o.state_stages),
                 ("gla", kernels._bwd_dstate, state | {"HAS_DHT": True, "HAS_DH0": True}, o.state_warps,
                  o.state_stages),
                 ("gla", kernels._step_kernel, {"BK": BK, "BV": 32, "SCALAR": False}, 4, None)]
        if o.bwd_bk < K:
            jobs.append(("gla", kernels._bwd_dv, base | {"BK": o.bwd_bk, "BV": o.dv_bv}, o.dv_warps, None))
        return jobs

    def _fit(fn, constexprs, warps, stages, dtype, tmp_path):
        """cuobjdump's REG / STACK / ... of ``fn`` compiled for sm_90 (tests/sm90.py), or None."""
        from sm90 import compile_for_sm90, resource_usage

        consts = {n: v for n, v in constexprs.items() if n in fn.arg_names}
        index = ("slot_seq", "slot_chunk", "cu", "coff", "strong")
        data = ("q", "k", "v", "g", "o", "do", "qg", "kg", "A", "dq", "dk", "dv")  # in the inputs' dtype
        sig = {n: "constexpr" if n in consts else "i32" if n in ("N", "TT", "H", "K", "V") else "fp32"
               if n == "scale" else "*i32" if n in index else f"*{dtype}" if n in data else "*fp32"
               for n in fn.arg_names}
        return resource_usage(compile_for_sm90(fn, sig, consts, warps, num_stages=stages), str(tmp_path))

    @pytest.mark.skipif(not triton_available(), reason="needs Triton")
    def test_kernels_fit_sm90(tmp_path):
        """bf16, K = V = 128, the default launches: every kernel compiles for sm_90 without spills (the
        flagged-chunk backward, forms B and C, a rare path that may spill, is compiled by the slow test)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        for name, fn, consts, warps, stages in _launches(128, 128, "bf16"):
            if name == "gla strong" and fn.__name__ == "_bwd_chunk":
                continue
            res = _fit(fn, consts, warps, stages, "bf16", tmp_path)
            if res is None:
                pytest.skip("Triton's cuobjdump is not bundled: cannot read register use")
            assert res["REG"] <= 255 and res["STACK"] == 0, (name, fn.__name__, res)

    @pytest.mark.slow
    @pytest.mark.skipif(not triton_available(), reason="needs Triton")
    @pytest.mark.parametrize("dtype", ["bf16", "fp32"])
    @pytest.mark.parametrize(("K", "V"), [(64, 64), (128, 128), (256, 512)])
    def test_kernels_compile_for_sm90(K, V, dtype, tmp_path):
        """Every launch compiles to an sm_90 cubin (no GPU needed: Triton's own ptxas); in bf16 no chunk
        kernel spills but the flagged-chunk backward (the decode step, unchanged here, spills 80 B at
        K = 256)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        for name, fn, consts, warps, stages in _launches(K, V, dtype):
            res = _fit(fn, consts, warps, stages, dtype, tmp_path)
            exempt = (name == "gla strong" and fn.__name__ == "_bwd_chunk") or fn.__name__ == "_step_kernel"
            if res is not None and dtype == "bf16" and not exempt:
                assert res["STACK"] == 0, (name, fn.__name__, res)

    @pytest.mark.skipif(not triton_available(), reason="needs Triton")
    @pytest.mark.parametrize("bad, error, match", [
        ({"fwd_bk": 48}, ValueError, "fwd_bk must be a power of two"),
        ({"bwd_bv": 512}, ValueError, "bwd_bv must be a power of two"),
        ({"bwd_warps": 3}, ValueError, "bwd_warps must be one of"),
        ({"state_stages": 0}, ValueError, "state_stages must be in"),
        ({"chunk_range": 200.0}, ValueError, r"chunk_range must be in \[0, 128\]"),
        ({"block_range": True}, TypeError, "block_range must be a number"),
        ({"fwd_warps": 4.0}, TypeError, "fwd_warps must be an int"),
        ({"tile": 64}, ValueError, "unknown option 'tile'"),
    ])
    def test_options_raise(bad, error, match):
        from seqblocks.ops.gla.triton import gla_options

        with pytest.raises(error, match=match):
            gla_options(128, 128, **bad)

    @pytest.mark.skipif(not triton_available(), reason="needs Triton")
    def test_options_defaults_and_overrides():
        from seqblocks.ops.gla.triton import gla_options

        o = gla_options(128, 128)
        assert (o.fwd_bk, o.bwd_bk, o.state_bv, o.chunk_range) == (32, 64, 32, 128.0)
        assert gla_options(128, 128, torch.float32).bwd_bk == 16  # fp32 products: narrower key blocks
        assert (gla_options(128, 128, scalar=True).fwd_bk, gla_options(128, 128, scalar=True).bwd_bk) == (128, 128)
        assert gla_options(12, 20).fwd_bk == 16 and gla_options(12, 20).state_bv == 32
        assert gla_options(128, 128, bwd_bk=128, chunk_range=0).bwd_bk == 128

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

    # The score forms of the per-key kernels (seqblocks/ops/gla/triton.py): the defaults take form A
    # wherever a chunk decays by at most 128 nats; chunk_range 0 sends every decaying chunk to forms B / C,
    # block_range 0 every diagonal block to form C.
    FORMS = {"A": {}, "B": {"chunk_range": 0}, "C": {"chunk_range": 0, "block_range": 0}}
    CU = [0, 5, 70, 70, 150]  # odd lengths, an empty sequence, sequence ends inside chunks
    CU_SHORT = [0, 5, 40, 40, 90]  # form C sums columns one by one: slow under the interpreter
    # forms B / C may form huge products above the diagonal (replaced, never summed): numpy warns there
    overflow_ok = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

    def _gates(kind, shape):
        (_, _, _, g), _ = _inputs("gla", *shape[:3], shape[3], 1)
        if kind == "g=-8":  # 15 steps of -8 span 120 nats: form B's bound (128)
            g = torch.full_like(g, -8.0)
        elif kind == "mixed":  # a stretch of 40 tokens in one head, one chunk of another at -8, the rest as usual
            g = g.clone()
            g[:, 40:80, 0] = -8.0
            if shape[1] >= 134 and shape[2] > 1:
                g[:, 70:134, 1] = -8.0
        return g

    def _kernel(form):
        from seqblocks.ops.gla.triton import gla_options, gla_triton

        def fn(q, k, v, g, **kw):
            opts = gla_options(16, 16, q.dtype, **FORMS[form])
            return gla_triton(q, k, v, g, scale=q.shape[-1] ** -0.5, options=opts, **kw)
        return fn

    @overflow_ok
    @pytest.mark.parametrize("form, gate", [("A", "mild"), ("A", "mixed"), ("B", "g=-8"), ("B", "mixed"),
                                            ("C", "g=-8"), ("C", "mixed")])
    def test_triton_forms_equal_reference(form, gate):
        bounds, H = (CU_SHORT, 1) if form == "C" else (CU, 2)
        cu, T = torch.tensor(bounds), bounds[-1]
        (q, k, v, _), h0 = _inputs("gla", 1, T, H, 16, 16, N=4)
        g = _gates(gate, (1, T, H, 16))
        o, s, grads = _grads(_kernel(form), [q, k, v, g], h0, cu)
        o_r, s_r, grads_r = _grads(gla_ref, [t.double() for t in (q, k, v, g)], h0.double(), cu)
        assert all(torch.isfinite(t).all() for t in [o, s, *grads])
        assert_close(o.double(), o_r, atol=1e-4, rtol=1e-4)
        assert_close(s.double(), s_r, atol=1e-4, rtol=1e-4)
        for name, a, b in zip(["dq", "dk", "dv", "dh0"], [*grads[:3], grads[4]], [*grads_r[:3], grads_r[4]]):
            assert_close(a.double(), b, atol=5e-4, rtol=5e-4, msg=name)
        # dg: a difference of q dq and k dk, measured against their size (test_gla_gpu.py says why); the
        # kernels before the chunk-local dg measured 2.4e-7 .. 4.9e-6 here, these 1.4e-7 .. 4.9e-6
        terms = ((q * grads_r[0]).norm() + (k * grads_r[1]).norm()).item()
        assert (grads[3].double() - grads_r[3]).norm().item() / terms < 1e-5

    @overflow_ok
    def test_triton_forms_take_their_own_paths():
        # the flagged chunks' launch computes what form A does not reach: forms B and C round differently
        (q, k, v, _), h0 = _inputs("gla", 1, 20, 1, 16, 16)
        g = _gates("g=-8", (1, 20, 1, 16))
        runs = {f: _grads(_kernel(f), [q, k, v, g], h0) for f in ("B", "C")}
        assert not torch.equal(runs["B"][0], runs["C"][0])
        assert_close(runs["B"][0], runs["C"][0], atol=1e-5, rtol=1e-5)

    @overflow_ok
    @pytest.mark.parametrize("name", OPS)
    @pytest.mark.parametrize("form", ["A", "B"])
    def test_triton_bf16_forms(name, form):
        # bf16 inputs, packed, the per-key decay strong in one chunk: dq, dk, dv, dg in bf16 from the kernel
        cu = torch.tensor(CU)
        (q, k, v, g), h0 = _inputs(name, 1, 150, 2, 16, 16, dtype=torch.bfloat16, N=4)
        if name == "gla":
            g = _gates("mixed", (1, 150, 2, 16)).bfloat16()
            fn = _kernel(form)
        else:
            fn = lambda *a, **kw: simple_gla(*a, backend="triton", **kw)  # noqa: E731
        o, s, grads = _grads(fn, [q, k, v, g], h0, cu)
        assert all(d.dtype == torch.bfloat16 for d in grads[:4]) and grads[4].dtype == torch.float32
        o_r, s_r, grads_r = _grads(OPS[name][1], [t.double() for t in (q, k, v, g)], h0.double(), cu)
        assert_close(o.double(), o_r, atol=3e-2, rtol=3e-2)
        for a, b in zip(grads, grads_r):
            assert_close(a.double(), b, atol=5e-2, rtol=5e-2)


    @overflow_ok
    @pytest.mark.parametrize("name, T, case", [("gla", 90, "strong"), ("simple_gla", 20, "strong"),
                                               ("simple_gla", 90, "strong"), ("gla", 45, "strided"),
                                               ("simple_gla", 45, "strided")])
    def test_triton_partial_chunk_strong_decay_and_strided_inputs(name, T, case):
        """Forward and every gradient against the float64 reference where a sequence ends inside a chunk
        of 64 under decay of -4 .. -10 a step (padded rows must repeat the last valid cumulative decay,
        or exp of their differences overflows into NaN as in the delta rule's kernels), and with q, k,
        v, g as views with T innermost (which the kernels must not read as if contiguous)."""
        inputs, h0 = _inputs(name, 2, T, 2, 16, 16)
        if case == "strong":
            gen = torch.Generator().manual_seed(3)
            inputs[3] = -(torch.rand(inputs[3].shape, generator=gen) * 6 + 4)
        else:
            inputs = [time_innermost(t) for t in inputs]
        fast = OPS[name][0]
        o, s, grads = _grads(lambda *a, **kw: fast(*a, backend="triton", **kw), inputs, h0)
        o_r, s_r, grads_r = _grads(OPS[name][1], [t.double() for t in inputs], h0.double())
        assert_close(o.double(), o_r, atol=1e-4, rtol=1e-4)
        assert_close(s.double(), s_r, atol=1e-4, rtol=1e-4)
        for d, a, b in zip(["dq", "dk", "dv", "dg", "dh0"], grads, grads_r, strict=True):
            assert_close(a.double(), b, atol=5e-4, rtol=5e-4, msg=d)

    @pytest.mark.parametrize("name", OPS)
    def test_triton_packed_gradients_equal_separate_calls(name):
        # dg is summed inside chunks only: nothing leaks across a packed boundary
        cu = [0, 37, 37, 101, 130]
        (q, k, v, g), h0 = _inputs(name, 1, 130, 2, 16, 16, N=4)
        fast = OPS[name][0]
        _, _, packed = _grads(lambda *a, **kw: fast(*a, backend="triton", **kw), [q, k, v, g], h0, torch.tensor(cu))
        for n in range(4):
            s, e = cu[n], cu[n + 1]
            if s == e:
                continue
            part = [t[:, s:e] for t in (q, k, v, g)]
            leaves = [t.detach().clone().requires_grad_() for t in part]
            h = h0[n : n + 1].detach().clone().requires_grad_()
            o, st = fast(*leaves, initial_state=h, output_final_state=True, backend="triton")
            # the packed run's cotangents, restricted to this sequence
            gen = torch.Generator().manual_seed(1)
            do_all = torch.randn(1, 130, 2, 16, generator=gen)
            ds_all = torch.randn(4, 2, 16, 16, generator=gen)
            ((o * do_all[:, s:e]).sum() + (st * ds_all[n : n + 1]).sum()).backward()
            for a, b in zip([t.grad for t in leaves], packed[:4]):
                assert_close(a, b[:, s:e], atol=1e-5, rtol=1e-5)
            assert_close(h.grad, packed[4][n : n + 1], atol=1e-5, rtol=1e-5)

    @overflow_ok
    @pytest.mark.parametrize("name", OPS)
    def test_triton_split_key_and_value_blocks(name):
        # K = 32 in key blocks of 16 (the forward's loop over K, two _bwd_chunk programs a chunk, dv from
        # _bwd_dv, the scalar decay's dg summed over key blocks), V = 48 in blocks of 16 (masked lanes),
        # one chunk flagged strong
        from seqblocks.ops.gla.triton import gla_options, gla_triton

        cu = torch.tensor([0, 70, 100])
        (q, k, v, g), h0 = _inputs(name, 1, 100, 1, 32, 48, N=2)
        if name == "gla":
            g = g.clone()
            g[:, 64:100] = -8.0
        opts = gla_options(32, 48, fwd_bk=16, bwd_bk=16, state_bv=16, bwd_bv=16, dv_bv=16)

        def fn(*a, **kw):
            return gla_triton(*a, scale=32**-0.5, scalar=name == "simple_gla", options=opts, **kw)
        o, s, grads = _grads(fn, [q, k, v, g], h0, cu)
        o_r, s_r, grads_r = _grads(OPS[name][1], [t.double() for t in (q, k, v, g)], h0.double(), cu)
        assert_close(o.double(), o_r, atol=1e-4, rtol=1e-4)
        assert_close(s.double(), s_r, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads, grads_r):
            assert_close(a.double(), b, atol=5e-4, rtol=5e-4)
