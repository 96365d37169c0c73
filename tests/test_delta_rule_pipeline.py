"""The chunk-64 pipeline of the Triton delta-rule kernels (``ops/delta_rule/triton.py``): the three-stage
forward and the backward (more backward paths: ``tests/test_delta_rule_bwd.py``).

Under Triton's interpreter (``tests/interpreter.py`` says why the cases run in a child process): the
blocked inversion ``_block_inverse`` against ``torch.linalg.inv``, stage 1's T, W and U' against the
chunked PyTorch form, and the whole op at chunk 64 (forward and every gradient, random cotangents)
against the sequential reference over lengths around the chunk (1, 63, 65, 130), packed sequences,
initial states, gated and ungated, the L2 norm, bf16 and a K = 128 head. Without the interpreter: the
forward's and the backward's kernels compiled for sm_90 on the host (no GPU, ``tests/sm90.py``) fit the
H200's shared memory and registers with no spills.

Shapes: B batch, T time, H heads, K key width, V value width, C chunk.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from seqblocks.ops.delta_rule import triton as dr  # noqa: E402

SM90_SHARED = 232448  # bytes of shared memory per block on an H200, as Triton measured it there


@triton.jit
def _inverse_kernel(a, out, C: tl.constexpr, MODE: tl.constexpr):
    r = tl.arange(0, C)
    A = tl.load(a + r[:, None] * C + r[None, :])
    tl.store(out + r[:, None] * C + r[None, :], dr._block_inverse(A, C, MODE))


if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

    def _fit(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, tmp_path) -> tuple[int, dict]:
        """(shared memory bytes, cuobjdump's REG / STACK / ...) of ``fn`` compiled for sm_90 (tests/sm90.py);
        ``types`` names the pointer and float arguments (others are i32), ``constexprs`` may hold other
        kernels' flags too."""
        from sm90 import compile_for_sm90, resource_usage

        constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
        sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        kernel = compile_for_sm90(fn, sig, constexprs, num_warps, num_stages=num_stages)
        res = resource_usage(kernel, str(tmp_path))
        if res is None:
            pytest.skip("Triton's cuobjdump is not bundled: cannot read register use")
        return kernel.metadata.shared, res

    @pytest.mark.parametrize(("K", "V"), [(64, 64), (128, 128), (256, 512)])
    def test_kernels_fit_sm90(K, V, tmp_path):
        """bf16 inputs, every feature on (gated, packed, L2 norm, initial / final state), the tiles the
        host picks for B 8 x H 16: the forward's three stages, the backward's recomputed stages 1-2 and its
        four kernels all within the H200's shared memory and 255 registers with no register spills."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        q = torch.empty(1, dtype=torch.bfloat16)
        N, H = 8, 16
        o = dr._backward_options(q, 64, K, V, N, H)  # the forward's options and the backward's own
        types = {n: "*bf16" for n in ("q", "k", "v", "g", "beta", "do", "o", "dq", "dk", "dvo", "dbeta", "dg",
                                      "Wbuf", "Ubuf", "Tbuf", "h", "vnew", "dvl", "dh", "dv", "dw", "dk3")}
        types |= {n: "*fp32" for n in ("Gbuf", "Rk", "Rq", "h0", "ht", "dht", "dh0", "rs", "dqs")}
        types |= {"chunk_table": "*i64", "cu_seqlens": "*i64", "chunk_offsets": "*i64", "scale": "fp32"}
        flags = {"H": H, "K": K, "V": V, "C": o["C"], "GATED": True, "VARLEN": True, "L2NORM": True, "EPS": 1e-6,
                 "MODE": 0, "HAS_H0": True, "STORE_DH0": True}
        nkb = triton.cdiv(K, o["BKQ"])
        state = {"BKS": o["BKS"], "NK": o["NK"], "BV": o["BVS"]}
        kernels = [  # (kernel, its tiles and flags, warps, stages), as _chunk_forward / _chunk_backward launch them
            (dr.chunk_wy_kernel, {"BK": o["BK"], "BV": o["BV"], "STORE_T": False}, 4, 2),
            (dr.chunk_state_kernel, state | {"STORE_HT": True, "STORE_V": True}, 4, o["STAGES"]),
            (dr.chunk_out_kernel, {"BK": o["BK"], "BV": o["BV"]}, 4, 2),
            (dr.chunk_wy_kernel, {"BK": o["BK"], "BV": o["BV"], "STORE_T": True}, 4, 2),
            (dr.chunk_state_kernel, state | {"STORE_HT": False, "STORE_V": True}, 4, o["STAGES"]),
            (dr.chunk_bwd_dv_local_kernel, {"BK": o["BK"], "BV": o["BV"]}, 4, 2),
            (dr.chunk_bwd_dh_kernel, state, o["WARPS_DH"], o["STAGES"]),
            (dr.chunk_bwd_dqk_kernel, {"BK": o["BKQ"], "BV": o["BVQ"], "FINISH_DQ": nkb == 1}, o["WARPS_Q"], 2),
            (dr.chunk_bwd_wy_kernel, {"BK": o["BKW"], "BV": o["BVW"], "NKB": nkb, "DQ_LEFT": nkb > 1},
             o["WARPS_WY"], 2),
        ]
        for fn, tiles, warps, stages in kernels:
            shared, res = _fit(fn, types, flags | tiles, warps, stages, tmp_path)
            assert shared <= SM90_SHARED, (fn.__name__, shared)
            assert res["REG"] <= 255 and res["STACK"] == 0, (fn.__name__, tiles, res)

else:
    from test_delta_rule_triton import _check
    from test_delta_rule_triton import _inputs as _raw_inputs

    def _inputs(*args, **kw):
        """test_delta_rule_triton's inputs with keys of norm ~1 at any K (its k / 3 suits K = 8: wider
        unnormalised keys make I - b k k^T expand and the recurrence blow up)."""
        t = _raw_inputs(*args, **kw)
        t["k"] = (t["k"].float() * 3 * t["k"].shape[-1] ** -0.5).to(t["k"].dtype)
        return t

    @pytest.mark.parametrize("C", [16, 32, 64])
    def test_block_inverse_equals_torch_inverse(C):
        gen = torch.Generator().manual_seed(C)
        k = torch.nn.functional.normalize(torch.randn(C, 8, generator=gen, dtype=torch.float64), dim=-1)
        beta = torch.rand(C, generator=gen, dtype=torch.float64)
        G = (-torch.rand(C, generator=gen, dtype=torch.float64) * 0.3).cumsum(0)
        A = (beta[:, None] * (k @ k.T) * (G[:, None] - G[None, :]).exp()).tril(-1)  # a chunk's A
        out = torch.empty(C, C)
        _inverse_kernel[(1,)](A.float(), out, C=C, MODE=1)
        want = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + A)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        assert (out.triu(1) == 0).all()  # exactly lower triangular: every product above it is of zeros

    @pytest.mark.parametrize(("gated", "l2"), [(True, False), (False, True)])
    def test_wy_stage_equals_torch(gated, l2):
        """Stage 1 alone at chunk 64 over 130 tokens (the last chunk of 2): G, the keys' norms, T, W and U'."""
        t = _inputs(1, 130, K=24, V=40, gated=gated)
        k, v, beta, g = t["k"], t["v"], t["beta"], t.get("g")
        offsets, table = dr._chunk_offsets(1, 130, 64, None, k.device)
        G, rk, Tm, W, U = dr._wy_stage(k, v, g, beta, None, table, l2, 64, 16, 32, 1, torch.float32, True)
        kn = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6) if l2 else k
        for c0 in (0, 64, 128):
            sl = slice(c0, min(c0 + 64, 130))
            n = sl.stop - c0
            Gc = g[0, sl].cumsum(0) if gated else torch.zeros(n, 2)  # [n, H]
            for h in range(2):
                kc, b = kn[0, sl, h], beta[0, sl, h]
                dec = (Gc[:, None, h] - Gc[None, :, h]).exp()
                A = (b[:, None] * (kc @ kc.T) * dec).tril(-1)
                Tw = torch.linalg.inv(torch.eye(n) + A)
                torch.testing.assert_close(Tm[0, sl, h, :n], Tw, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(W[0, sl, h], Tw @ ((b * Gc[:, h].exp())[:, None] * kc), atol=1e-5,
                                           rtol=1e-5)
                torch.testing.assert_close(U[0, sl, h], Tw @ (b[:, None] * v[0, sl, h]), atol=1e-5, rtol=1e-5)
            if gated:
                torch.testing.assert_close(G[0, sl], Gc)
        if l2:
            torch.testing.assert_close(rk, torch.rsqrt(k.square().sum(-1) + 1e-6))

    @pytest.mark.parametrize("gated", [False, True])
    @pytest.mark.parametrize("T", [1, 63, 65, 130])
    def test_chunk64_equals_reference(T, gated):
        _check(_inputs(1, T, H=1, K=32, V=32, gated=gated), 1e-4, chunk_size=64)

    @pytest.mark.parametrize("gated", [False, True])
    def test_chunk64_packed_sequences_l2norm_and_scale(gated):
        # sequences of 1, 63, 0, 66 and 9 tokens: one-token, partial, empty and two-chunk documents
        t = _inputs(1, 139, H=1, K=32, V=32, gated=gated, rows=5)
        _check(t, 1e-4, chunk_size=64, use_qk_l2norm=True, scale=0.4,
               cu_seqlens=torch.tensor([0, 1, 64, 64, 130, 139]))

    def test_chunk64_bf16():
        # bf16 W, U', chunk states and v_new (the interpreter multiplies the rounded values in fp32)
        _check(_inputs(1, 97, H=1, K=32, V=32, dtype=torch.bfloat16), 3e-2, chunk_size=64)

    def test_chunk64_wide_head():
        # K = 128: two 64-row state tiles in stage 2; the backward recomputes at chunk 32
        _check(_inputs(1, 70, H=1, K=128, V=64), 1e-4, chunk_size=64, use_qk_l2norm=True)

    def test_chunk64_keys_past_256():
        # K = 300: stage 2 takes three 128-row state tiles (the last one masked); the backward chunk 16
        _check(_inputs(1, 40, H=1, K=300, V=20), 1e-4, chunk_size=64)
