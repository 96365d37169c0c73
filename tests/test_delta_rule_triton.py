"""The Triton delta-rule kernels against the reference, forward and backward, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process. Tiny shapes keep the interpreter fast.

Shapes: B batch, T time, H heads, K key width, V value width.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter
from layouts import time_innermost

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops.delta_rule import (  # noqa: E402
    delta_rule,
    gated_delta_rule,
    gated_delta_rule_ref,
    gated_delta_rule_step,
)

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)

else:

    def _inputs(B, T, H=2, K=8, V=20, *, gated=True, rows=None, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        t = {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen) / 3,
             "v": torch.randn(B, T, H, V, generator=gen), "beta": torch.rand(B, T, H, generator=gen)}
        if gated:
            t["g"] = -torch.rand(B, T, H, generator=gen) * 0.5
        t = {n: x.to(dtype) for n, x in t.items()}
        t["initial_state"] = torch.randn(B if rows is None else rows, H, K, V, generator=gen)
        return t

    def _run(fn, t, **kw):
        args = [t[n] for n in ("q", "k", "v", "g", "beta") if n in t]
        return fn(*args, initial_state=t["initial_state"], output_final_state=True, **kw)

    def _check(t, atol, **kw):
        gated = "g" in t
        leaves = {n: x.clone().requires_grad_(True) for n, x in t.items()}
        wide = {n: x.detach().double().requires_grad_(True) for n, x in t.items()}
        o, final = _run(gated_delta_rule if gated else delta_rule, leaves, backend="triton", **kw)
        ref_kw = {n: v for n, v in kw.items() if n != "chunk_size"}
        o_ref, final_ref = gated_delta_rule_ref(wide["q"], wide["k"], wide["v"], wide.get("g"), wide["beta"],
                                                initial_state=wide["initial_state"], output_final_state=True, **ref_kw)
        assert o.dtype == t["q"].dtype and final.dtype == torch.float32
        torch.testing.assert_close(o.double(), o_ref, atol=atol, rtol=atol)
        torch.testing.assert_close(final.double(), final_ref, atol=atol, rtol=atol)
        gen = torch.Generator().manual_seed(2)
        go, gf = torch.randn(o.shape, generator=gen), torch.randn(final.shape, generator=gen)
        got = torch.autograd.grad((o, final), list(leaves.values()), (go.to(o.dtype), gf))
        want = torch.autograd.grad((o_ref, final_ref), list(wide.values()), (go.double(), gf.double()))
        for n, a, b in zip(leaves, got, want):
            torch.testing.assert_close(a.double(), b, atol=atol * 10, rtol=atol * 10,
                                       msg=lambda m, n=n: f"grad of {n}: {m}")

    @pytest.mark.parametrize("gated", [False, True])
    @pytest.mark.parametrize(("T", "chunk_size"), [(1, 16), (7, 16), (63, 16), (65, 16)])
    def test_chunk_kernel_equals_reference(T, chunk_size, gated):
        _check(_inputs(1, T, gated=gated), 1e-4, chunk_size=chunk_size)

    @pytest.mark.parametrize("gated", [False, True])
    def test_chunk_kernel_l2norm_scale_and_packed_sequences(gated):
        t = _inputs(1, 40, gated=gated, rows=4)
        _check(t, 1e-4, chunk_size=16, use_qk_l2norm=True, scale=0.7, cu_seqlens=torch.tensor([0, 5, 5, 22, 40]))

    def test_chunk_kernel_wide_keys_not_a_power_of_two():
        # K = 130 takes the 256-wide key tile and the smaller chunk; the K and V masks are exercised
        _check(_inputs(1, 37, K=130, V=40), 1e-4, chunk_size=64)

    def test_chunk_kernel_bf16_inputs():
        _check(_inputs(2, 33, dtype=torch.bfloat16), 3e-2, chunk_size=16)

    def test_chunk_kernel_reads_strided_inputs():
        """q, k and v as [B, T, H, K] views with T innermost (a short conv's transposed output, as the
        mixers' q / k / v are on the PyTorch conv): the kernels take contiguous copies. They used to read
        the views' memory as if contiguous (O(1) wrong outputs, seen replaying a GPU training step)."""
        t = _inputs(2, 21, H=2, K=8, V=12)
        for n in ("q", "k", "v"):
            t[n] = time_innermost(t[n])
        _check(t, 1e-4, chunk_size=16, use_qk_l2norm=True)

    @pytest.mark.parametrize("T", [20, 45])
    def test_chunk_kernel_strong_decay_in_a_partial_chunk(T):
        """A sequence end inside a chunk (T = 20 of 64; 45 = 16 + 16 + 13) with decay strong enough that
        G falls below -88 within the chunk: the padded rows used G = 0, so exp(G_i - G_j) of a padded
        row overflowed and its zeros became NaN in the backward's sums (MQAR at lr 1e-2 on the GPU)."""
        t = _inputs(2, T, H=2, K=8, V=12)
        t["g"] = -(torch.rand(2, T, 2, generator=torch.Generator().manual_seed(3)) * 6 + 4)  # -4 .. -10 a step
        _check(t, 1e-4, chunk_size=64 if T == 20 else 16, use_qk_l2norm=True)

    @pytest.mark.parametrize("gated", [False, True])
    @pytest.mark.parametrize("l2", [False, True])
    def test_step_kernel_equals_torch_step(gated, l2):
        t = _inputs(3, 1, K=12, V=40, gated=gated)
        args = [t[n][:, 0] for n in ("q", "k", "v")]
        g = t["g"][:, 0] if gated else None
        s_kernel, s_torch = t["initial_state"].clone(), t["initial_state"].clone()
        o_kernel = gated_delta_rule_step(s_kernel, *args, g, t["beta"][:, 0], use_qk_l2norm=l2, backend="triton")
        o_torch = gated_delta_rule_step(s_torch, *args, g, t["beta"][:, 0], use_qk_l2norm=l2, backend="torch")
        torch.testing.assert_close(o_kernel, o_torch, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_kernel, s_torch, atol=1e-5, rtol=1e-5)

    def test_float64_is_refused_by_the_kernel_and_served_by_auto():
        t = _inputs(1, 5, dtype=torch.float64)
        with pytest.raises(ValueError, match="no Triton kernel serves this call"):
            _run(gated_delta_rule, t, backend="triton")
        o, _ = _run(gated_delta_rule, t, backend="auto")
        assert o.dtype == torch.float64

    def test_chunk_kernel_nonfinite_rule_per_packed_sequence():
        t = _inputs(1, 30, rows=3)
        t["v"][0, 8, 1, 0] = float("nan")  # sequence 1 ([5, 20)), head 1
        t["q"][0, 25, 0, 0] = float("nan")  # sequence 2, one output of head 0
        cu = torch.tensor([0, 5, 20, 30])
        o, final = _run(gated_delta_rule, t, backend="triton", cu_seqlens=cu, chunk_size=16)
        o_ref, final_ref = _run(gated_delta_rule_ref, t, cu_seqlens=cu)
        torch.testing.assert_close(o, o_ref, equal_nan=True)
        torch.testing.assert_close(final, final_ref, equal_nan=True)
        assert torch.isnan(o[0, 8:20, 1, 0]).all() and torch.isfinite(o[0, 8:, 1, 1:]).all()
        assert torch.isfinite(o[0, 20:, 1]).all()
        assert torch.isnan(o[0, 25, 0]).all() and torch.isfinite(o[0, 26:, 0]).all()

    @pytest.mark.parametrize("where", ["k", "g", "beta", "v", "q"])
    def test_chunk_kernel_nonfinite_rule_and_gradients_match_torch_path(where):
        # The kernels read non-finite inputs as 0 and report each column's first bad index; the outputs,
        # the final state and every gradient (random cotangents on the finite outputs) equal the PyTorch
        # path's, whose zeroing is an autograd op.
        t = _inputs(2, 37, K=16, V=16)
        bad = {"k": (1, 20, 0, 3), "g": (1, 20, 1), "beta": (0, 5, 1), "v": (0, 33, 1, 2), "q": (1, 9, 0, 0)}[where]
        t[where][bad] = float("inf") if where == "g" else float("nan")
        grads = []
        for backend in ("triton", "torch"):
            leaves = {n: x.clone().requires_grad_(True) for n, x in t.items()}
            o, final = _run(gated_delta_rule, leaves, backend=backend, chunk_size=16, use_qk_l2norm=True)
            grads.append((o, final, leaves))
        (o, final, lv), (o_ref, final_ref, lv_ref) = grads
        torch.testing.assert_close(o, o_ref, equal_nan=True, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(final, final_ref, equal_nan=True, atol=2e-4, rtol=2e-4)
        assert torch.isnan(o).any() and torch.isfinite(o[:, :5]).all()
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(o.shape, generator=gen)
        dfin = torch.randn(final.shape, generator=gen)
        for out, fin, _ in grads:
            keep_o, keep_f = torch.isfinite(out), torch.isfinite(fin)
            torch.autograd.backward([out.masked_fill(~keep_o, 0.0), fin.masked_fill(~keep_f, 0.0)],
                                    [do * keep_o, dfin * keep_f])
        for n in lv:
            assert torch.isfinite(lv[n].grad).all(), n
            torch.testing.assert_close(lv[n].grad, lv_ref[n].grad, atol=3e-4, rtol=3e-4, msg=n)
